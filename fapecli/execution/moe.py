"""Frequency-Aware LoRA-MoE: two band experts on a frozen projection, routed by plan and spectrum.

A :class:`FrequencyAwareLoRAMoE` wraps an ``nn.Linear`` (tokens ``B x N x d_in``) or a 1x1
``nn.Conv2d`` (a linear map over channels whose tokens are the pixels in raster order) and
adds a low-band and a high-band LoRA expert:

    y = W0 x + c_low * s_low * B_low A_low x_low + c_high * s_high * B_high A_high x_high

Which choices come from where (SEED-NOTES sections 1 and 5):

* Paper: text router = plan tokens right-padded/truncated to the executor's token count N, a
  token-wise linear layer and a softmax over experts (``text_mode="pad"``); FIR spectral router
  = normalised odd 1-D Gaussian, depthwise along the token axis, ``H_low = G * H``,
  ``H_high = H - H_low``, per-token energies, relative energies ``r = e / (e_low + e_high +
  eps)``, ``g_freq = softmax(r / tau)``; fused gate ``g = a g_text + b g_freq`` with
  non-negative learnable ``a, b`` (softplus here); top-1 routing; W0 frozen; ranks 8/8 default,
  8/16 available; frequency regulariser ``||(I - G) y_low||^2 + ||G y_high||^2``.
* Authors' code: Gaussian kernel 9 and ``sigma = max(2, k / 6)``; "temperature 5" which we
  read as a logit *multiplier*, i.e. ``tau = 1/5``: ``r`` lies in [0, 1], so dividing by 5 would
  make the gate almost uniform (logit gap <= 0.2), while multiplying by 5 gives a decisive
  gate (logit gap up to 5); band-fed experts (the low expert sees ``H_low``, the high expert
  ``H_high``).
* Ours: straight-through top-1 (``c = c_hard + g - g.detach()``) in training, hard at
  inference; LoRA ``A`` Kaiming-uniform and ``B`` zero so a fresh wrapper equals its base;
  scale ``alpha / r`` with ``alpha = r`` by default; replicate padding for the Gaussian (keeps
  constants in the low band); energies and gates in float32; the regulariser acts on each
  expert's unmasked adapter output; with no plan tokens the text gate is left out (routing by
  spectrum only).
* Image layers (1x1 conv): the faithful reading is the 1-D Gaussian along the raster token
  axis (``freq_mode="1d"``), which mixes the end of one row with the start of the next and sees
  no vertical frequencies; the default for conv wrappers is ``freq_mode="2d"``, a separable
  2-D Gaussian (a spatial low-pass), the natural reading for images. Linear wrappers use
  ``"1d"``.
* Text routing for image layers: padding a length-M plan to N = H*W tokens (the paper's
  formula) gives the plan's route to the first M pixels of the top row only and the constant
  zero-pad route (the router bias) to all others, and that split moves with the image size.
  Conv wrappers therefore default to ``text_mode="broadcast"``: the plan tokens are mean-pooled
  and the resulting gate applies to every pixel; the spectral router keeps the per-pixel
  decision. Linear wrappers (FLUX-style token sequences) default to the paper's ``"pad"``.

Plan tokens reach the wrappers through a context set on the modules
(:func:`set_plan_tokens` / :func:`plan_context`), because projections called deep inside other
code (diffusers' ``to_q``/``to_k``/``to_v``/``to_out.0``) cannot receive extra forward
arguments; ``forward(x, plan_tokens=...)`` is also accepted when the caller owns the call::

    names = inject_lora_moe(transformer, ["to_q", "to_k", "to_v", "to_out.0"], cond_dim=d_t)
    with plan_context(transformer, tokens):  # tokens: (B or 1) x M x d_t
        out = transformer(...)
    loss = ... + 1e-3 * moe_regulariser(transformer)  # expert outputs are kept when grad is on
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

EXPERTS: tuple[str, str] = ("low", "high")  # expert index 0 = low band, 1 = high band
LOW, HIGH = 0, 1

Target = str | Sequence[str] | Callable[[str, nn.Module], bool] | None


def gaussian_kernel(kernel_size: int = 9, sigma: float | None = None) -> torch.Tensor:
    """Normalised, symmetric 1-D Gaussian of odd length; ``sigma`` defaults to max(2, k/6)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, not {kernel_size}")
    sigma = max(2.0, kernel_size / 6.0) if sigma is None else float(sigma)
    x = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (g / g.sum()).float()


def lowpass(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Depthwise Gaussian low-pass with replicate padding, in x's dtype.

    ``x`` is channels-first: ``(B, C, N)`` filtered along N for ``"1d"``; ``(B, C, H, W)``
    filtered along the raster order for ``"1d"`` or separably along H and W for ``"2d"``.
    """
    k = kernel.numel()
    p = k // 2
    c = x.shape[1]
    w = kernel.to(device=x.device, dtype=x.dtype)
    if mode == "1d":
        shape = x.shape
        flat = x.reshape(shape[0], c, -1)
        flat = F.pad(flat, (p, p), mode="replicate")
        out = F.conv1d(flat, w.view(1, 1, k).expand(c, 1, k).contiguous(), groups=c)
        return out.reshape(shape)
    if mode == "2d":
        if x.dim() != 4:
            raise ValueError("freq_mode '2d' needs (B, C, H, W) input")
        xp = F.pad(x, (p, p, p, p), mode="replicate")
        out = F.conv2d(xp, w.view(1, 1, 1, k).expand(c, 1, 1, k).contiguous(), groups=c)
        return F.conv2d(out, w.view(1, 1, k, 1).expand(c, 1, k, 1).contiguous(), groups=c)
    raise ValueError(f"unknown freq_mode {mode!r}; expected '1d' or '2d'")


def _inv_softplus(y: float) -> float:
    return math.log(math.expm1(y))


class FrequencyAwareLoRAMoE(nn.Module):
    """A frozen ``nn.Linear`` or 1x1 ``nn.Conv2d`` plus low/high-band LoRA experts.

    Args:
        base: the layer to wrap (kept as ``self.base``; its state-dict keys gain ``base.``).
        ranks: LoRA ranks of the (low, high) experts.
        cond_dim: width d_t of the plan tokens; ``None`` disables the text router.
        alphas: LoRA alphas (scale ``alpha / rank``); default ``alpha = rank``.
        kernel_size, sigma: the Gaussian FIR (default 9 and max(2, k/6), authors' code).
        tau: spectral softmax temperature, ``g_freq = softmax(r / tau)`` (default 1/5).
        text_mode: ``"pad"`` (paper), ``"broadcast"`` (pooled plan) or ``"auto"``.
        freq_mode: ``"1d"`` (paper, along tokens), ``"2d"`` (conv only) or ``"auto"``.
        freeze_base: set ``requires_grad=False`` on the base parameters.
        eps: energy floor in the relative energies.
    """

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d,
        ranks: tuple[int, int] = (8, 8),
        *,
        cond_dim: int | None = None,
        alphas: tuple[float, float] | None = None,
        kernel_size: int = 9,
        sigma: float | None = None,
        tau: float = 0.2,
        text_mode: str = "auto",
        freq_mode: str = "auto",
        freeze_base: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            self.is_conv = False
            d_in, d_out = base.in_features, base.out_features
        elif isinstance(base, nn.Conv2d):
            if base.kernel_size != (1, 1) or base.stride != (1, 1) or base.groups != 1:
                raise ValueError("only 1x1, stride-1, groups=1 Conv2d layers can be wrapped")
            self.is_conv = True
            d_in, d_out = base.in_channels, base.out_channels
        else:
            raise TypeError(f"cannot wrap {type(base).__name__}; need nn.Linear or 1x1 Conv2d")
        if len(ranks) != 2 or min(ranks) < 1:
            raise ValueError(f"ranks must be two positive ints, not {ranks}")
        self.base = base
        self.in_features, self.out_features = d_in, d_out
        self.ranks = (int(ranks[0]), int(ranks[1]))
        alphas = alphas if alphas is not None else (float(ranks[0]), float(ranks[1]))
        self.scales = (alphas[0] / ranks[0], alphas[1] / ranks[1])
        if text_mode == "auto":
            text_mode = "broadcast" if self.is_conv else "pad"
        if freq_mode == "auto":
            freq_mode = "2d" if self.is_conv else "1d"
        self.text_mode, self.freq_mode = text_mode, freq_mode
        if self.text_mode not in ("pad", "broadcast"):
            raise ValueError(f"text_mode must be 'pad', 'broadcast' or 'auto', not {text_mode!r}")
        if self.freq_mode not in ("1d", "2d") or (self.freq_mode == "2d" and not self.is_conv):
            raise ValueError(f"freq_mode {freq_mode!r} is not available for this layer")
        self.tau = float(tau)
        self.eps = float(eps)

        ref = base.weight
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(r, d_in, **kw)) for r in self.ranks]
        )
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(d_out, r, **kw)) for r in self.ranks]
        )
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.text_router = nn.Linear(cond_dim, 2, **kw) if cond_dim else None
        self.cond_dim = cond_dim
        # non-negative fusion weights a (text) and b (spectral): softplus of raw values, init 1
        self.gate_raw = nn.Parameter(torch.full((2,), _inv_softplus(1.0), device=ref.device))
        self.register_buffer("fir", gaussian_kernel(kernel_size, sigma), persistent=False)
        if freeze_base:
            for p in self.base.parameters():
                p.requires_grad_(False)

        self.plan_tokens: torch.Tensor | None = None  # context set by set_plan_tokens
        self.record_outputs: bool | None = None  # None: keep expert outputs when grad is on
        self._last: dict[str, torch.Tensor] = {}
        self._counts: torch.Tensor | None = None  # tokens per expert since the last reset

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that inspects ``layer.weight`` keeps working)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    # ----------------------------------------------------------------------------- routing
    def _tokens_first(self, t: torch.Tensor) -> torch.Tensor:
        """Expert inputs in channels-first layout for the FIR: (B,C,H,W) or (B,C,N)."""
        return t if self.is_conv else t.transpose(1, 2)

    def _split_bands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = lowpass(self._tokens_first(x), self.fir, self.freq_mode)
        low = low if self.is_conv else low.transpose(1, 2)
        return low, x - low

    def _energy(self, t: torch.Tensor) -> torch.Tensor:
        """Per-token energy ||t||^2 over channels (float32), as a map: (B,1,H,W) or (B,N,1)."""
        dim = 1 if self.is_conv else -1
        return torch.linalg.vector_norm(t, dim=dim, keepdim=True, dtype=torch.float32).square()

    def _as_map(self, g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B, N or 1) token values -> the map layout of ``like``."""
        if not self.is_conv:
            return g.unsqueeze(-1)
        if g.shape[1] == 1:
            return g.view(g.shape[0], 1, 1, 1)
        return g.view(like.shape)

    def _flat(self, m: torch.Tensor) -> torch.Tensor:
        """A map (B,1,H,W) or (B,N,1) -> (B, N)."""
        return m.flatten(1) if self.is_conv else m.squeeze(-1)

    def _text_gate(self, batch: int, n: int, tokens: torch.Tensor | None) -> torch.Tensor | None:
        """g_text as (B, N, E) float32 ((B, 1, E) when broadcast), or None without a plan."""
        if tokens is None or self.text_router is None:
            return None
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(0)
        if tokens.shape[0] not in (1, batch):
            raise ValueError(f"plan tokens batch {tokens.shape[0]} does not match input {batch}")
        tokens = tokens.to(self.text_router.weight.dtype)
        if self.text_mode == "broadcast":
            logits = self.text_router(tokens.mean(1)).unsqueeze(1)  # (Bt, 1, E)
        else:
            m = min(tokens.shape[1], n)
            logits = self.text_router(tokens[:, :m])  # (Bt, m, E)
            if m < n:  # right-padding with zero tokens gives the bias as logits
                pad = self.text_router.bias.view(1, 1, -1).expand(tokens.shape[0], n - m, -1)
                logits = torch.cat([logits, pad.to(logits.dtype)], 1)
        return torch.softmax(logits.float(), -1).expand(batch, -1, -1)

    def gate_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The non-negative fusion scalars (a, b) for the text and spectral gates."""
        ab = F.softplus(self.gate_raw.float())
        return ab[0], ab[1]

    def _gates(self, x: torch.Tensor, tokens: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Band inputs and the fused gate of each expert as float32 maps."""
        x_low, x_high = self._split_bands(x)
        e_low, e_high = self._energy(x_low), self._energy(x_high)
        den = e_low + e_high + self.eps
        # softmax over two experts of r / tau == sigmoid((r_high - r_low) / tau)
        gf_high = torch.sigmoid((e_high - e_low) / (den * self.tau))
        a, b = self.gate_weights()
        out = {"x_low": x_low, "x_high": x_high, "r_high": e_high / den, "gf_high": gf_high}
        bsz = x.shape[0]
        n = x.shape[-2] * x.shape[-1] if self.is_conv else x.shape[1]
        g_text = self._text_gate(bsz, n, tokens)
        if g_text is None:
            total = b
            g_high = b * gf_high
        else:
            gt_high = self._as_map(g_text[..., 1], e_low)
            out["gt_high"] = gt_high
            total = a + b
            g_high = a * gt_high + b * gf_high
        out["g_high"], out["g_low"] = g_high, total - g_high
        return out

    def route(
        self, x: torch.Tensor, plan_tokens: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Routing only, for diagnostics and tests, on a (B, N, d) or (B, C, H, W) input.

        Returns ``x_low``, ``x_high``, ``g_freq``, ``g_text`` (absent without plan tokens), the
        fused ``g`` (all (B, N, E) float32, experts in :data:`EXPERTS` order) and the top-1
        ``index`` (B, N).
        """
        tokens = plan_tokens if plan_tokens is not None else self.plan_tokens
        gt = self._gates(x, tokens)
        n = gt["gf_high"][0].numel()

        def pair(high: torch.Tensor, total: float | torch.Tensor = 1.0) -> torch.Tensor:
            high = self._flat(high).expand(x.shape[0], n)
            return torch.stack([total - high, high], -1)

        out = {"x_low": gt["x_low"], "x_high": gt["x_high"], "g_freq": pair(gt["gf_high"]),
               "g": torch.stack([self._flat(gt["g_low"]), self._flat(gt["g_high"])], -1)}
        if "gt_high" in gt:
            out["g_text"] = pair(gt["gt_high"])
        out["index"] = (out["g"][..., 1] > out["g"][..., 0]).long()
        return out

    # ----------------------------------------------------------------------------- experts
    def _expert(self, e: int, t: torch.Tensor) -> torch.Tensor:
        """One expert's (unmasked) adapter output s_e * B_e A_e t."""
        a, b = self.lora_A[e], self.lora_B[e] * self.scales[e]
        if self.is_conv:
            return F.conv2d(F.conv2d(t, a[:, :, None, None]), b[:, :, None, None])
        return F.linear(F.linear(t, a), b)

    def _experts(self, x_low: torch.Tensor, x_high: torch.Tensor, c_low: torch.Tensor,
                 c_high: torch.Tensor) -> torch.Tensor:
        """Gated sum of both experts. A token's gate commutes with the token-wise maps, so it is
        applied in the rank space (c B A x = B (c A x)), then one stacked B for both experts."""
        a_low, a_high = self.lora_A[LOW], self.lora_A[HIGH]
        b = torch.cat([self.lora_B[LOW] * self.scales[LOW],
                       self.lora_B[HIGH] * self.scales[HIGH]], 1)
        if self.is_conv:
            h = torch.cat([F.conv2d(x_low, a_low[:, :, None, None]) * c_low,
                           F.conv2d(x_high, a_high[:, :, None, None]) * c_high], 1)
            return F.conv2d(h, b[:, :, None, None])
        h = torch.cat([F.linear(x_low, a_low) * c_low, F.linear(x_high, a_high) * c_high], -1)
        return F.linear(h, b)

    def forward(self, x: torch.Tensor, plan_tokens: torch.Tensor | None = None) -> torch.Tensor:
        lead = None
        if not self.is_conv and x.dim() != 3:  # (N, d) or (..., N, d): fold into a batch
            lead = x.shape[:-2]
            x = x.reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x.unsqueeze(0)
        tokens = plan_tokens if plan_tokens is not None else self.plan_tokens
        y = self.base(x)
        gt = self._gates(x, tokens)
        g_high, g_low = gt["g_high"], gt["g_low"]
        mask = g_high > g_low  # top-1: the high expert where its fused gate wins
        c_high = mask.to(g_high.dtype)
        c_low = 1.0 - c_high
        if self.training and torch.is_grad_enabled():  # straight-through: one-hot forward,
            c_high = c_high + g_high - g_high.detach()  # gradient to the fused gate
            c_low = c_low + g_low - g_low.detach()
        x_low, x_high = gt["x_low"], gt["x_high"]
        y = y + self._experts(x_low, x_high, c_low.to(x.dtype), c_high.to(x.dtype))
        keep = torch.is_grad_enabled() if self.record_outputs is None else self.record_outputs
        outputs = (self._expert(LOW, x_low), self._expert(HIGH, x_high)) if keep else None
        self._remember(mask, outputs)
        if lead is not None:
            y = y.reshape(*lead, *y.shape[-2:]) if len(lead) else y.squeeze(0)
        return y

    def _remember(self, mask: torch.Tensor,
                  outputs: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        n_high = mask.sum().double()  # stays on the device: no synchronisation per call
        counts = torch.stack([mask.numel() - n_high, n_high])
        self._counts = counts if self._counts is None else self._counts + counts
        choice = mask.squeeze(1) if self.is_conv else mask.squeeze(-1)
        self._last = {"choice": choice.detach().to(torch.uint8), "counts": counts}
        if outputs is not None:
            self._last["y_low"], self._last["y_high"] = outputs

    # ------------------------------------------------------------------------ diagnostics
    def frequency_regulariser(self) -> torch.Tensor:
        """``mean((I - G) y_low)^2 + mean(G y_high)^2`` on the last forward's expert outputs.

        Zero (a 0-dim tensor) when no outputs were kept (no forward yet, or under no_grad).
        """
        y_low, y_high = self._last.get("y_low"), self._last.get("y_high")
        if y_low is None or y_high is None:
            return torch.zeros((), device=self.gate_raw.device)
        lo = self._tokens_first(y_low)
        hi = self._tokens_first(y_high)
        out_of_band_low = lo - lowpass(lo, self.fir, self.freq_mode)
        out_of_band_high = lowpass(hi, self.fir, self.freq_mode)
        return out_of_band_low.float().square().mean() + out_of_band_high.float().square().mean()

    def routing_stats(self, cumulative: bool = False) -> dict[str, float]:
        """Share of tokens sent to each expert by the last forward (or since the last reset)."""
        counts = self._counts if cumulative else self._last.get("counts")
        counts = [0.0, 0.0] if counts is None else counts.tolist()
        total = sum(counts)
        if total == 0:
            return {name: 0.0 for name in EXPERTS} | {"tokens": 0}
        shares = {name: counts[i] / total for i, name in enumerate(EXPERTS)}
        return shares | {"tokens": int(total)}

    def reset_routing_stats(self) -> None:
        self._counts = None

    def choice_map(self) -> torch.Tensor | None:
        """Last per-token expert index (0 low, 1 high): (B, H, W) for conv, (B, N) for linear."""
        return self._last.get("choice")

    def extra_repr(self) -> str:
        return (f"ranks={self.ranks}, text_mode={self.text_mode!r}, freq_mode={self.freq_mode!r}, "
                f"kernel={self.fir.numel()}, tau={self.tau:g}")


# ------------------------------------------------------------------------------- helpers
def target_matcher(target: Target) -> Callable[[str, nn.Module], bool]:
    """A predicate (name, module) -> bool from a name, suffix, fnmatch pattern, list or None."""
    if callable(target):
        return target
    if target is None:
        return lambda name, module: True
    patterns = [target] if isinstance(target, str) else list(target)

    def match(name: str, module: nn.Module) -> bool:
        for p in patterns:
            if any(ch in p for ch in "*?["):
                if fnmatch.fnmatchcase(name, p):
                    return True
            elif name == p or name.endswith("." + p):
                return True
        return False

    return match


def _wrappable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
            and module.stride == (1, 1) and module.groups == 1)


def inject_lora_moe(
    model: nn.Module,
    target: Target = None,
    ranks: tuple[int, int] = (8, 8),
    **kwargs,
) -> list[str]:
    """Replace matching ``nn.Linear`` / 1x1 ``nn.Conv2d`` modules by MoE wrappers, in place.

    ``target``: a module name or suffix (``"to_q"``, ``"to_out.0"``), an fnmatch pattern
    (``"blocks.*.proj"``), a list of those, a predicate ``(name, module) -> bool``, or ``None``
    for every wrappable layer. Layers already inside a wrapper are skipped. ``kwargs`` go to
    :class:`FrequencyAwareLoRAMoE` (``cond_dim``, ``tau``, ``freq_mode``, ...). Returns the
    replaced names.
    """
    match = target_matcher(target)
    inside: set[str] = set()
    chosen: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, FrequencyAwareLoRAMoE):
            inside.add(name)
            continue
        if not name or any(name.startswith(w + ".") for w in inside if w):
            continue
        if _wrappable(module) and match(name, module):
            chosen.append(name)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FrequencyAwareLoRAMoE(getattr(parent, child), ranks, **kwargs))
    return chosen


def collect_moe_layers(model: nn.Module) -> dict[str, FrequencyAwareLoRAMoE]:
    """All MoE wrappers in ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FrequencyAwareLoRAMoE)}


def set_plan_tokens(model: nn.Module, tokens: torch.Tensor | None) -> None:
    """Set (or clear, with ``None``) the plan tokens (B x M x d_t) seen by every wrapper."""
    for m in collect_moe_layers(model).values():
        m.plan_tokens = tokens


@contextlib.contextmanager
def plan_context(model: nn.Module, tokens: torch.Tensor | None) -> Iterator[None]:
    """Plan tokens for the duration of a ``with`` block; cleared afterwards."""
    set_plan_tokens(model, tokens)
    try:
        yield
    finally:
        set_plan_tokens(model, None)


def moe_regulariser(model: nn.Module) -> torch.Tensor:
    """Sum over wrappers of their frequency regulariser (the paper's L_freq)."""
    terms = [m.frequency_regulariser() for m in collect_moe_layers(model).values()]
    if not terms:
        return torch.zeros(())
    return torch.stack([t.to(terms[0].device) for t in terms]).sum()


def reset_routing_stats(model: nn.Module) -> None:
    for m in collect_moe_layers(model).values():
        m.reset_routing_stats()


def routing_summary(model: nn.Module, cumulative: bool = False) -> dict[str, object]:
    """Token shares per expert over all wrappers (token-weighted) and per layer."""
    layers = {n: m.routing_stats(cumulative) for n, m in collect_moe_layers(model).items()}
    total = sum(s["tokens"] for s in layers.values())
    overall = {
        e: (sum(s[e] * s["tokens"] for s in layers.values()) / total if total else 0.0)
        for e in EXPERTS
    }
    return {"overall": overall, "tokens": total, "layers": layers}


def routing_maps(model: nn.Module) -> dict[str, torch.Tensor]:
    """Last per-token expert index maps of every wrapper that has run (for ``--explain``)."""
    maps = {n: m.choice_map() for n, m in collect_moe_layers(model).items()}
    return {n: v for n, v in maps.items() if v is not None}


def routing_heatmap(model: nn.Module, size: tuple[int, int]) -> torch.Tensor | None:
    """Share of image-layer wrappers that chose the high expert, per pixel: (B, H, W) in [0, 1].

    Each conv wrapper's last choice map is resized (nearest) to ``size`` and averaged; token
    (linear) wrappers are skipped. ``None`` when no conv wrapper has run.
    """
    maps = [m for m in routing_maps(model).values() if m.dim() == 3]
    if not maps:
        return None
    acc = None
    for m in maps:
        up = F.interpolate(m[:, None].float(), size=size, mode="nearest")[:, 0]
        acc = up if acc is None else acc + up.to(acc.device)
    return acc / len(maps)
