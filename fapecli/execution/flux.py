"""The FLUX executor: a frozen FLUX transformer and VAE, the Frequency-Aware LoRA-MoE on its
attention projections, conditioned on the plan instead of T5, restoring in one step.

What runs (SEED-NOTES sections 1 and 5):

* **Adapters.** :func:`~fapecli.execution.moe.inject_lora_moe` (the module fape-s uses) wraps
  ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` of every double block
  (``transformer_blocks.*.attn``) and ``to_q``, ``to_k``, ``to_v`` of every single block
  (``single_transformer_blocks.*.attn``); ranks 8/8, Gaussian FIR k = 9 along the tokens,
  tau = 1/5. The base weights stay frozen.
* **Conditioning in place of T5/CLIP.** :class:`FluxConditioner` turns the plan into M = 4
  plan tokens (:class:`~fapecli.execution.conditioning.PlanEncoder`, width ``cond_dim``); when
  a Qwen planner supplies its hidden states (``[tokens, hidden_size]``), they are projected to
  ``cond_dim`` and appended. These tokens feed the MoE text routers, and through a projector
  become FLUX's ``encoder_hidden_states`` (width ``joint_attention_dim``, ``txt_ids`` zero) and,
  mean-pooled through a second projector, its ``pooled_projections``. The routers use
  ``text_mode="broadcast"`` (the pooled plan gates every token): with only a handful of plan
  tokens, the paper's right-padding would route only the first few image tokens by the plan.
* **One step.** The degraded image (padded to a multiple of 2 x the VAE factor) is encoded
  with the VAE (the posterior mean), normalised ``z = (latent - shift) * scale``, packed 2x2
  into tokens as diffusers' ``FluxPipeline`` does (``img_ids = (0, row, col)``), and enters
  the transformer at ``t = 0.3``. FLUX is a rectified-flow model: ``z_t = (1 - t) x0 + t eps``
  and the transformer predicts the velocity ``v = eps - x0``, so the output is read as the
  clean latent ``x0 = z_t - t * v``. It is unpacked, denormalised and decoded; the output is
  cropped back to the input size. Guidance-distilled bases (FLUX.1-dev) get ``guidance``
  (default 1.0) as their guidance embedding.
* **Large images.** ``fape restore`` tiles the whole pipeline (``tile``, default 1024 px,
  with the project's raised-cosine blending); inside a tile, diffusers' tiled VAE encode and
  decode take over above ``vae_tile`` pixels.

Adapters (LoRA experts, routers, fusion weights, conditioner) are saved alone, as
``adapters.safetensors`` plus ``adapter_config.json`` naming their base (a weights.toml name or
a folder holding ``transformer/`` and ``vae/``): tens of megabytes instead of 24 GB.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from fapecli.errors import FapeError
from fapecli.execution.compact import pad_to_multiple
from fapecli.execution.conditioning import PlanEncoder
from fapecli.execution.moe import (
    FrequencyAwareLoRAMoE,
    collect_moe_layers,
    inject_lora_moe,
    plan_context,
    set_plan_tokens,
)
from fapecli.planning.plan import Plan


class HiddenStateError(FapeError, ValueError):
    """Planner hidden states these adapters cannot take (one line for the CLI)."""


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
FORMAT_VERSION = 1
FLUX_TARGETS: tuple[str, ...] = (
    "transformer_blocks.*.attn.to_q",
    "transformer_blocks.*.attn.to_k",
    "transformer_blocks.*.attn.to_v",
    "transformer_blocks.*.attn.to_out.0",
    "single_transformer_blocks.*.attn.to_q",
    "single_transformer_blocks.*.attn.to_k",
    "single_transformer_blocks.*.attn.to_v",
)


@dataclass
class FluxAdapterConfig:
    """Everything besides the base weights that a FLUX executor needs (``adapter_config.json``)."""

    name: str = "fape-flux"
    base: str = "flux.1-dev"  # weights.toml name, or a folder with transformer/ and vae/
    moe_ranks: tuple[int, int] = (8, 8)  # (low, high); the paper's prior variant is (8, 16)
    moe_targets: tuple[str, ...] = FLUX_TARGETS
    moe_text_mode: str = "broadcast"
    moe_kernel_size: int = 9
    moe_sigma: float | None = None
    moe_tau: float = 0.2
    cond_dim: int = 64  # width of the plan tokens (and of the routers' input)
    hidden_dim: int | None = None  # Qwen hidden size for the hidden-state projector (None: off)
    proj_width: int = 256  # hidden width of the context / pooled projectors
    timestep: float = 0.3  # t at which the degraded latent enters (x0 = z_t - t * v)
    guidance: float = 1.0  # guidance embedding for guidance-distilled bases (FLUX.1-dev)
    tile: int = 1024  # default restore tile (pixels) of the whole pipeline
    vae_tile: int = 1024  # tiled VAE encode/decode above this many pixels (0: never)
    gradient_checkpointing: bool = True  # in training (transformer and VAE)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (training run, ...)

    def __post_init__(self) -> None:
        self.moe_ranks = tuple(int(r) for r in self.moe_ranks)  # type: ignore[assignment]
        self.moe_targets = tuple(self.moe_targets)
        if len(self.moe_ranks) != 2 or min(self.moe_ranks) < 1:
            raise ValueError(f"moe_ranks must be two positive ints, not {self.moe_ranks}")
        if not 0.0 < self.timestep <= 1.0:
            raise ValueError(f"timestep must lie in (0, 1], not {self.timestep}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FluxAdapterConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class FluxCondition(NamedTuple):
    """The conditioning of one forward: router tokens, context and pooled vector."""

    tokens: torch.Tensor  # (B, M, cond_dim): the MoE text routers' input
    context: torch.Tensor  # (B, M, joint_attention_dim): FLUX's encoder_hidden_states
    pooled: torch.Tensor  # (B, pooled_projection_dim): FLUX's pooled_projections

    def expand(self, batch: int) -> FluxCondition:
        if self.tokens.shape[0] == batch:
            return self
        if self.tokens.shape[0] != 1:
            raise ValueError(f"conditioning batch {self.tokens.shape[0]} does not match {batch}")
        return FluxCondition(*(t.expand(batch, *t.shape[1:]) for t in self))


def _mlp(d_in: int, width: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.GELU(approximate="tanh"),
                         nn.Linear(width, d_out))


class FluxConditioner(nn.Module):
    """Plan (and optional Qwen hidden states) -> :class:`FluxCondition`."""

    def __init__(self, cfg: FluxAdapterConfig, joint_dim: int, pooled_dim: int) -> None:
        super().__init__()
        self.plan = PlanEncoder(cfg.cond_dim)
        self.hidden = (nn.Sequential(nn.LayerNorm(cfg.hidden_dim),
                                     nn.Linear(cfg.hidden_dim, cfg.cond_dim))
                       if cfg.hidden_dim else None)
        self.context = _mlp(cfg.cond_dim, cfg.proj_width, joint_dim)
        self.pooled = _mlp(cfg.cond_dim, cfg.proj_width, pooled_dim)

    def forward(self, plans: Plan | Sequence[Plan],
                hidden: torch.Tensor | None = None) -> FluxCondition:
        tokens = self.plan(plans)  # (B, 4, cond_dim)
        if hidden is not None:
            if self.hidden is None:
                raise HiddenStateError("these adapters take no planner hidden states "
                                       "(hidden_dim unset)")
            hidden = hidden[None] if hidden.dim() == 2 else hidden
            width = self.hidden[0].normalized_shape[0]
            if hidden.shape[-1] != width:
                raise HiddenStateError(
                    f"the planner's hidden states are {hidden.shape[-1]} wide but these "
                    f"adapters were trained on {width}: use the Qwen planner they were trained "
                    "with (--planner-model) or --planner rules")
            ref = self.hidden[1].weight
            extra = self.hidden(hidden.to(device=ref.device, dtype=ref.dtype))
            if extra.shape[0] != tokens.shape[0]:
                extra = extra.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([tokens, extra], 1)
        return FluxCondition(tokens, self.context(tokens), self.pooled(tokens.mean(1)))


# ------------------------------------------------------------------------------ latents
def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 patches as tokens, as diffusers' FluxPipeline."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a (height, width) latent."""
    b, _, d = tokens.shape
    c = d // 4
    z = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(b, c, height, width)


def latent_image_ids(h2: int, w2: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h2 * w2, 3) position ids (0, row, col) of the packed tokens."""
    ids = torch.zeros(h2, w2, 3, device=device, dtype=dtype)
    ids[..., 1] += torch.arange(h2, device=device, dtype=dtype)[:, None]
    ids[..., 2] += torch.arange(w2, device=device, dtype=dtype)[None, :]
    return ids.reshape(h2 * w2, 3)


# -------------------------------------------------------------------------------- model
class FluxExecutor(nn.Module):
    """``executor(x, plans)`` restores (B, 3, H, W) images in [0, 1] in one FLUX step.

    Deep copies (the training EMA) share the frozen base tensors: only adapters are copied.
    """

    executor_kind = "flux"

    def __init__(self, transformer: nn.Module, vae: nn.Module,
                 config: FluxAdapterConfig | None = None) -> None:
        super().__init__()
        cfg = config or FluxAdapterConfig()
        self.config = cfg
        tc, vc = transformer.config, vae.config
        if tc.in_channels != 4 * vc.latent_channels * tc.patch_size**2:
            raise ValueError(f"transformer in_channels {tc.in_channels} does not match 2x2-packed "
                             f"VAE latents ({vc.latent_channels} channels)")
        self.transformer = transformer.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval()
        ref = next(transformer.parameters())
        self.cond = FluxConditioner(cfg, tc.joint_attention_dim, tc.pooled_projection_dim).to(
            device=ref.device, dtype=ref.dtype)
        self.moe_layers = inject_lora_moe(
            transformer, list(cfg.moe_targets), cfg.moe_ranks, cond_dim=cfg.cond_dim,
            kernel_size=cfg.moe_kernel_size, sigma=cfg.moe_sigma, tau=cfg.moe_tau,
            text_mode=cfg.moe_text_mode, freq_mode="1d", freeze_base=True)
        if not self.moe_layers:
            raise ValueError(f"no projection of the transformer matches {cfg.moe_targets}")
        self.vae_scale = 2 ** (len(vc.block_out_channels) - 1)
        self._configure_vae_tiling()

    # --------------------------------------------------------------------- properties
    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.x_embedder.weight.device

    @property
    def multiple(self) -> int:
        """Input sizes are padded to a multiple of this (VAE factor x 2x2 packing)."""
        return self.vae_scale * 2

    @property
    def default_tile(self) -> int:
        return max(self.multiple, self.config.tile // self.multiple * self.multiple)

    def _configure_vae_tiling(self) -> None:
        tile = self.config.vae_tile
        if tile and tile > 0:
            tile = max(self.multiple, tile // self.multiple * self.multiple)
            self.vae.enable_tiling()
            self.vae.tile_sample_min_size = tile
            self.vae.tile_latent_min_size = tile // self.vae_scale
        else:
            self.vae.disable_tiling()

    # ----------------------------------------------------------------------- adapters
    def adapter_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The trainable part: LoRA experts, routers, gate weights and the conditioner."""
        for name, p in self.cond.named_parameters():
            yield f"cond.{name}", p
        for layer, m in collect_moe_layers(self.transformer).items():
            for name, p in m.named_parameters():
                if not name.startswith("base."):
                    yield f"transformer.{layer}.{name}", p

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.adapter_named_parameters():
            yield p

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.adapter_named_parameters()}

    def set_adapter_dtype(self, dtype: torch.dtype) -> FluxExecutor:
        """Keep the adapters in ``dtype`` (fp32 for training under bf16 autocast)."""
        for p in self.adapter_parameters():
            p.data = p.data.to(dtype)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FluxExecutor:
        shared = [p for p in self.parameters() if not p.requires_grad]
        shared += list(self.buffers())
        for t in shared:
            memo[id(t)] = t
        for m in collect_moe_layers(self).values():  # forget per-forward graph tensors
            m._last, m._counts = {}, None
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    # ------------------------------------------------------------------------ forward
    def plan_tokens(self, plans: Plan | Sequence[Plan] | None,
                    hidden: torch.Tensor | None = None) -> FluxCondition:
        """The conditioning of ``plans`` (and the planner's hidden states, when given)."""
        if plans is None:
            from fapecli.execution.conditioning import plan_for_task

            plans = plan_for_task("none")
        return self.cond(plans, hidden)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> normalised VAE latents (posterior mean; no gradient)."""
        vc = self.vae.config
        with torch.no_grad():
            latent = self.vae.encode(x.to(self.vae.dtype) * 2 - 1).latent_dist.mode()
        return (latent - (vc.shift_factor or 0.0)) * vc.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in about [0, 1]."""
        vc = self.vae.config
        z = z / vc.scaling_factor + (vc.shift_factor or 0.0)
        return (self.vae.decode(z.to(self.vae.dtype)).sample + 1) / 2

    def denoise(self, z: torch.Tensor, cond: FluxCondition) -> torch.Tensor:
        """One transformer step: the degraded latent at t -> the clean latent x0 = z - t v."""
        b, _, h, w = z.shape
        dt, dev = self.dtype, z.device
        cond = cond.expand(b)
        tokens = pack_latents(z.to(dt))
        t = self.config.timestep
        timestep = torch.full((b,), t, device=dev, dtype=dt)
        guidance = (torch.full((b,), self.config.guidance, device=dev, dtype=dt)
                    if self.transformer.config.guidance_embeds else None)
        txt_ids = torch.zeros(cond.context.shape[1], 3, device=dev, dtype=dt)
        img_ids = latent_image_ids(h // 2, w // 2, dev, dt)
        # Gradient checkpointing re-runs the blocks during backward, after a `with` block
        # would have cleared the routers' plan tokens: in training they stay set (replaced by
        # the next forward) so the recomputation routes exactly as the forward did.
        recompute = torch.is_grad_enabled() and getattr(
            self.transformer, "is_gradient_checkpointing", False)
        context = nullcontext() if recompute else plan_context(self.transformer, cond.tokens)
        if recompute:
            set_plan_tokens(self.transformer, cond.tokens)
        with context:
            v = self.transformer(hidden_states=tokens, encoder_hidden_states=cond.context.to(dt),
                                 pooled_projections=cond.pooled.to(dt), timestep=timestep,
                                 img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                                 return_dict=False)[0]
        return unpack_latents(tokens - t * v, h, w)

    def forward(self, x: torch.Tensor, plans: Plan | Sequence[Plan] | None = None, *,
                tokens: FluxCondition | None = None,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Restore x (B, 3, H, W) in [0, 1]; ``plans`` (or a precomputed ``tokens``
        conditioning from :meth:`plan_tokens`) condition it. Returns x's dtype and size."""
        cond = tokens if tokens is not None else self.plan_tokens(plans, hidden)
        h, w = x.shape[-2:]
        xp = pad_to_multiple(x, self.multiple)
        out = self.decode(self.denoise(self.encode(xp), cond))
        return out[..., :h, :w].to(x.dtype)

    # -------------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write ``adapter_config.json`` and ``adapters.safetensors`` (the base is not saved)."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {}
        for k, v in self.adapter_state_dict().items():
            v = v.cpu()
            state[k] = (v.to(dtype) if dtype is not None else v).contiguous()
        stored = str(dtype or next(iter(state.values())).dtype).removeprefix("torch.")
        config = {"_class_name": type(self).__name__, "format_version": FORMAT_VERSION,
                  "torch_dtype": stored, **self.config.to_dict()}
        text = json.dumps(config, indent=2)
        (out / ADAPTER_CONFIG).write_text(text + "\n", encoding="utf-8")
        save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"config": text, "format": "pt"})
        return out

    def load_adapters(self, path: str | Path) -> FluxExecutor:
        """Load adapter weights (a folder or ``adapters.safetensors``); every key must match."""
        from safetensors.torch import load_file

        p = Path(path)
        weights = p / ADAPTER_WEIGHTS if p.is_dir() else p
        if not weights.is_file():
            raise FileNotFoundError(f"no adapter weights at {weights}")
        state = load_file(str(weights))
        params = dict(self.adapter_named_parameters())
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"adapters do not match this executor: {len(missing)} missing "
                             f"(e.g. {missing[:2]}), {len(unexpected)} unexpected "
                             f"(e.g. {unexpected[:2]})")
        with torch.no_grad():
            for k, v in state.items():
                if params[k].shape != v.shape:
                    raise ValueError(f"adapter {k}: shape {tuple(v.shape)}, expected "
                                     f"{tuple(params[k].shape)}")
                params[k].copy_(v.to(dtype=params[k].dtype))
        return self

    def frequency_layers(self) -> dict[str, FrequencyAwareLoRAMoE]:
        """The MoE wrappers by name (relative to the transformer)."""
        return collect_moe_layers(self.transformer)


def read_adapter_config(path: str | Path) -> FluxAdapterConfig:
    """The config of an adapters folder (or of the folder holding ``adapters.safetensors``)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    file = folder / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {folder}")
    return FluxAdapterConfig.from_dict(json.loads(file.read_text(encoding="utf-8")))


__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "FLUX_TARGETS", "FluxAdapterConfig", "FluxCondition",
    "FluxConditioner", "FluxExecutor", "latent_image_ids", "pack_latents", "read_adapter_config",
    "unpack_latents",
]
