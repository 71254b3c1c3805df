"""fape-s: the compact, CPU-friendly executor (an AnyIR-style U-Net with a Frequency-Aware
LoRA-MoE on its 1x1 projections, conditioned on the plan).

Network (SEED-NOTES section 2): a pixel-unshuffle stem (``stem=2``: the U-Net's top level runs
at half resolution on 4x the channels; with only light blocks on that level, this is what
makes <= 1 s per megapixel on two CPU threads possible) and a 3x3 patch embedding, a U-Net of
``len(channels)`` levels (pixel-unshuffle down, pixel-shuffle up, skip concat + 1x1 reduce),
refinement blocks, a 3x3 output conv with pixel-shuffle back to full resolution, and a global
residual (output = input + predicted residual). Activations are channels-last (NHWC), much
faster on CPUs. Each block:

* norm, then the interleaved ("skip") channel split: odd channels to multi-Dconv-head transposed
  (channel) attention, even channels to GatedDA (1x1 expand to (alpha, beta, gamma) =
  (1/4, 1/4, 1/2) of hidden as in AnyIR's best setting, depthwise conv on alpha scaled by
  ``1 + tau * sigmoid(mean + std)`` (statistics of alpha, per channel), ``gelu(gamma) *
  [beta, alpha']``, 1x1, residual, 1x1);
* spatial-frequency fusion: ``lambda * [a * sigmoid(g), g * sigmoid(a)] + (1 - lambda) * F``
  with F from the spectrum of ``a + g``. AnyIR's literal frequency path ``irfft2(rfft2(a) +
  rfft2(g))`` equals ``a + g`` by linearity; with ``fourier_unit=True`` (default) a 1x1
  conv + GELU mixes the real/imaginary channels in the spectrum, so the path is a true global
  operator; ``False`` keeps the literal form (repeated to C channels). Then a 1x1 projection
  and the residual;
* norm + gated depthwise FFN + residual.

Channel norms are per-pixel LayerNorms over channels (local, so tiling stays close); the
attention and the FFT path are global, so tiled inference is only approximately equal to whole
image inference (see :mod:`fapecli.execution.tiling`).

The MoE wraps the layers named in ``moe_targets`` (the field's default: each block's fusion
projection ``fuse_proj`` and FFN output ``ffn.project_out``, the two projections that write into
the residual stream, like FLUX's ``to_out``; the fape-s preset keeps them on the blocks of the
two deepest levels, where they cost least); any name suffix or fnmatch pattern works. Super-
resolution: the network works at output resolution; :func:`prepare_input` upsamples first
(Lanczos, :mod:`fapecli.resample`). Inputs of any size are reflect-padded to a multiple of
``stem * 2 ** (levels - 1)`` (16 for fape-s) and cropped back. Checkpoints are diffusers-like:
``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fapecli.execution.conditioning import PlanEncoder
from fapecli.execution.moe import inject_lora_moe, plan_context, target_matcher
from fapecli.planning.plan import Plan
from fapecli.resample import upsample_tensor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
OUT_INIT_SCALE = 0.1  # a fresh model restores almost nothing rather than adding random residue


@dataclass
class FapeSConfig:
    """Everything needed to rebuild a compact executor (saved as ``config.json``)."""

    name: str = "fape-s"
    in_channels: int = 3
    stem: int = 2  # pixel-unshuffle factor of the input: the U-Net's top level runs at 1/stem
    channels_last: bool = True  # NHWC activations (much faster CPU convolutions)
    channels: tuple[int, ...] = (16, 32, 64, 160)
    blocks: tuple[int, ...] = (1, 1, 4, 8)  # encoder blocks per level; the last is the latent
    decoder_blocks: tuple[int, ...] | None = None  # per level 0..L-2; default blocks[:-1]
    refine_blocks: int = 0
    # light (NAFNet-style, local: no attention or FFT) blocks on the top level, before its
    # downsampling and after its decoder; they start as the identity (zero layer scales)
    light_blocks: tuple[int, int] = (0, 0)
    # a refinement head on the top level (see RefineHead): its width (0 = none) and its light
    # blocks; it starts as the identity, so it can grow onto a trained model
    head_channels: int = 0
    head_blocks: int = 0
    heads: tuple[int, ...] = (1, 1, 2, 4)
    ffn_expansion: float = 1.5
    gate_expansion: float = 2.0  # GatedDA hidden = gate_expansion * C/2
    fourier_unit: bool = True
    moe_ranks: tuple[int, int] = (8, 8)
    moe_targets: tuple[str, ...] = ("fuse_proj", "ffn.project_out")
    moe_text_mode: str = "broadcast"
    moe_freq_mode: str = "2d"
    moe_kernel_size: int = 9
    moe_sigma: float | None = None
    moe_tau: float = 0.2
    cond_dim: int = 32
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (training run, ...)

    def __post_init__(self) -> None:
        for f in ("channels", "blocks", "heads", "moe_ranks", "moe_targets", "decoder_blocks",
                  "light_blocks"):
            v = getattr(self, f)
            if v is not None:
                setattr(self, f, tuple(v))
        n = len(self.channels)
        if len(self.blocks) != n or len(self.heads) != n:
            raise ValueError("channels, blocks and heads need one entry per level")
        if self.decoder_blocks is not None and len(self.decoder_blocks) != n - 1:
            raise ValueError("decoder_blocks needs one entry per level except the last")
        if len(self.light_blocks) != 2 or min(self.light_blocks) < 0:
            raise ValueError("light_blocks needs two counts: (encoder, decoder) of the top level")
        if self.head_channels < 0 or self.head_blocks < 0:
            raise ValueError("head_channels and head_blocks must not be negative")
        if self.head_blocks and not self.head_channels:
            raise ValueError("head_blocks needs head_channels >= 1 (the head's width)")
        for c, h in zip(self.channels, self.heads, strict=True):
            if c % 4 or (c // 2) % h:
                raise ValueError(f"channels {c} must be a multiple of 4 and C/2 of heads {h}")

    @property
    def levels(self) -> int:
        return len(self.channels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FapeSConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# the Frequency-Aware LoRA-MoE of the default preset sits on the two residual-writing
# projections of the blocks of the two deepest levels (levels 0-1 stay plain: cheap)
DEEP_MOE_TARGETS = tuple(f"{stage}.*.{layer}" for stage in ("encoders.2", "decoders.2", "latent")
                         for layer in ("fuse_proj", "ffn.project_out"))

# the default (v8 to v15): ~1.4 M parameters, ~26 GFLOPs/MP. Its full blocks sit at the cheap
# low-resolution levels: the half-resolution top level has three light (NAFNet-style) blocks
# each way, level 1 one full block each way (see bench/results/speed.md)
_FAPE_S = FapeSConfig(name="fape-s", blocks=(0, 1, 2, 4), decoder_blocks=(0, 1, 2),
                      light_blocks=(3, 3), moe_targets=DEEP_MOE_TARGETS)

PRESETS: dict[str, FapeSConfig] = {
    "fape-s": _FAPE_S,
    # the defaults v3 to v7: one light block each way (22 GFLOPs/MP)
    "fape-s-v3": replace(_FAPE_S, name="fape-s-v3", light_blocks=(1, 1)),
    # the second default: no light blocks (0.84 s/MP on 2 EPYC threads)
    "fape-s-v2": replace(_FAPE_S, name="fape-s-v2", light_blocks=(0, 0)),
    # the first default (2.7 M parameters, 40 GFLOPs/MP; 1.7-1.8 s/MP on 2 EPYC threads)
    "fape-s-v1": FapeSConfig(name="fape-s-v1"),
    # a larger variant for GPUs (still <= 8 M parameters)
    "fape-m": FapeSConfig(name="fape-m", channels=(32, 64, 128, 256), blocks=(2, 3, 3, 6),
                          heads=(1, 2, 4, 8), refine_blocks=2, ffn_expansion=2.66),
    # small presets for tests and quick experiments
    "fape-xs": FapeSConfig(name="fape-xs", channels=(12, 24, 48, 64), blocks=(1, 1, 1, 2),
                           heads=(1, 1, 2, 2), moe_ranks=(4, 4), cond_dim=16),
    "fape-tiny": FapeSConfig(name="fape-tiny", channels=(8, 16, 16, 32), blocks=(1, 1, 1, 1),
                             heads=(1, 1, 1, 2), moe_ranks=(2, 2), cond_dim=8),
}


def get_config(name: str = "fape-s", **overrides: Any) -> FapeSConfig:
    """A preset's config with field overrides (``get_config("fape-s", moe_ranks=(8, 16))``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return replace(copy.deepcopy(PRESETS[name]), **overrides)


def create_model(name: str = "fape-s", **overrides: Any) -> FapeS:
    """A freshly initialised compact executor from a preset name (timm-style factory)."""
    return FapeS(get_config(name, **overrides))


# ------------------------------------------------------------------------------- blocks
class ChannelNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, H, W), per pixel."""

    def __init__(self, c: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` in channels-last layout when ``ref`` is channels-minor (NHWC-like strides)."""
    if ref.dim() == 4 and ref.stride(1) < ref.stride(3):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def conv1x1(c_in: int, c_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, bias=bias)


def dwconv3x3(c: int) -> nn.Conv2d:
    return nn.Conv2d(c, c, 3, padding=1, groups=c)


class ChannelAttention(nn.Module):
    """Multi-Dconv-head transposed attention: attention across channels, per head."""

    def __init__(self, c: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = conv1x1(c, 3 * c)
        self.qkv_dw = dwconv3x3(3 * c)
        self.project_out = conv1x1(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv_dw(self.qkv(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.unbind(1)
        q = F.normalize(q.float(), dim=-1)
        k = F.normalize(k.float(), dim=-1)
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.temperature.float(), -1)
        out = (attn.to(v.dtype) @ v).reshape(b, c, h, w)
        return self.project_out(_like(out, x))


class GatedDA(nn.Module):
    """AnyIR's gated degradation adaptation on (already normalised) features."""

    def __init__(self, c: int, expansion: float = 2.0) -> None:
        super().__init__()
        hidden = max(4, round(c * expansion / 4) * 4)
        self.q = hidden // 4  # alpha and beta get a quarter each, gamma a half
        self.expand = conv1x1(c, hidden)
        self.tau = nn.Parameter(torch.ones(1, self.q, 1, 1))
        self.dw = dwconv3x3(self.q)
        self.gate = conv1x1(2 * self.q, c)
        self.proj = conv1x1(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, beta, gamma = self.expand(x).split([self.q, self.q, 2 * self.q], 1)
        af = alpha.float()
        stats = af.mean((2, 3), keepdim=True) + af.std((2, 3), keepdim=True, correction=0)
        delta = torch.sigmoid(stats)  # AnyIR's temperature adjustment
        alpha = self.dw(alpha) * (1 + self.tau * delta).to(alpha.dtype)
        gated = F.gelu(gamma) * torch.cat([beta, alpha], 1)
        return self.proj(self.gate(gated) + x)


class FourierUnit(nn.Module):
    """rfft2 -> 1x1 conv + GELU over (real, imag) channels -> irfft2 (a global operator)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.c_out = c_out
        self.mix = conv1x1(2 * c_in, 2 * c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        z = torch.fft.rfft2(x.float(), norm="ortho")
        zz = _like(torch.cat([z.real, z.imag], 1).to(x.dtype), x)
        zz = F.gelu(self.mix(zz)).float()
        re, im = zz.split(self.c_out, 1)
        out = torch.fft.irfft2(torch.complex(re, im), s=(h, w), norm="ortho").to(x.dtype)
        return _like(out, x)


class SpatialFrequencyFusion(nn.Module):
    """``lambda * spatial cross-gating + (1 - lambda) * frequency path`` -> C channels."""

    def __init__(self, half: int, fourier_unit: bool = True) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.tensor(0.5))
        self.freq = FourierUnit(half, 2 * half) if fourier_unit else None

    def forward(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        spatial = torch.cat([a * torch.sigmoid(g), g * torch.sigmoid(a)], 1)
        s = a + g  # == irfft2(rfft2(a) + rfft2(g)), AnyIR's literal frequency fusion
        freq = self.freq(s) if self.freq is not None else torch.cat([s, s], 1)
        lam = self.lam.to(a.dtype)
        return lam * spatial + (1 - lam) * freq


class GatedFFN(nn.Module):
    """Gated depthwise-conv feed-forward: 1x1 -> dw3x3 -> gelu(x1) * x2 -> 1x1."""

    def __init__(self, c: int, expansion: float) -> None:
        super().__init__()
        hidden = max(1, int(c * expansion))
        self.project_in = conv1x1(c, 2 * hidden)
        self.dw = dwconv3x3(2 * hidden)
        self.project_out = conv1x1(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dw(self.project_in(x)).chunk(2, 1)
        return self.project_out(F.gelu(x1) * x2)


class FapeBlock(nn.Module):
    """Degradation-adaptation block: skip-split attention | GatedDA, fusion, FFN."""

    def __init__(self, c: int, heads: int, cfg: FapeSConfig) -> None:
        super().__init__()
        half = c // 2
        self.norm1 = ChannelNorm(c)
        self.attn = ChannelAttention(half, heads)
        self.gate = GatedDA(half, cfg.gate_expansion)
        self.fusion = SpatialFrequencyFusion(half, cfg.fourier_unit)
        self.fuse_proj = conv1x1(c, c)
        self.norm2 = ChannelNorm(c)
        self.ffn = GatedFFN(c, cfg.ffn_expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        a = self.attn(y[:, 1::2])  # odd channels (1-based: the 2k-1-th) -> attention
        g = self.gate(y[:, 0::2])  # even channels -> GatedDA
        x = x + self.fuse_proj(self.fusion(a, g))
        return x + self.ffn(self.norm2(x))


def _stage(c: int, n: int, heads: int, cfg: FapeSConfig) -> nn.Sequential:
    return nn.Sequential(*[FapeBlock(c, heads, cfg) for _ in range(n)])


class SimpleGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class LightBlock(nn.Module):
    """A NAFNet-style block, cheap enough for the top (half-resolution) level: norm, 1x1 to 2C,
    depthwise 3x3, simple gate (x1 * x2), 1x1, then norm + gated 1x1 FFN. Both branches are
    scaled by per-channel factors that start at zero, so a new block is the identity (a warm
    start from a model without it begins exactly where that model was)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm1 = ChannelNorm(c)
        self.expand = conv1x1(c, 2 * c)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.gate = SimpleGate()
        self.project = conv1x1(c, c)
        self.norm2 = ChannelNorm(c)
        self.ffn_in = conv1x1(c, 2 * c)
        self.ffn_out = conv1x1(c, c)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.beta * self.project(self.gate(self.dw(self.expand(self.norm1(x)))))
        return x + self.gamma * self.ffn_out(self.gate(self.ffn_in(self.norm2(x))))


class RefineHead(nn.Module):
    """A correction of the predicted residual on the top level (pixel-unshuffled, before the
    output's pixel shuffle), from the decoder's features, the input and that residual: 1x1 to
    ``c``, light blocks, 3x3 to the residual's channels. Its output conv starts at zero, so a
    model grown with a head restores exactly as it did; trained alone (``model.train_params =
    "head"``) it adds full-detail capacity without retraining the rest."""

    def __init__(self, c_feat: int, c_res: int, c: int, blocks: int) -> None:
        super().__init__()
        self.project_in = conv1x1(c_feat + 2 * c_res, c)
        self.blocks = nn.Sequential(*[LightBlock(c) for _ in range(blocks)])
        self.project_out = nn.Conv2d(c, c_res, 3, padding=1)
        nn.init.zeros_(self.project_out.weight)
        nn.init.zeros_(self.project_out.bias)

    def forward(self, feat: torch.Tensor, image: torch.Tensor,
                residual: torch.Tensor) -> torch.Tensor:
        x = self.project_in(torch.cat([feat, image, residual], 1))
        return residual + self.project_out(self.blocks(x))


class Down(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.PixelUnshuffle(2), conv1x1(4 * c_in, c_out, bias=False))


class Up(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(conv1x1(c_in, 4 * c_out, bias=False), nn.PixelShuffle(2))


def pad_to_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    """Reflect-pad the bottom/right of (B, C, H, W) to multiples of m (replicate if too small)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if not ph and not pw:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


# -------------------------------------------------------------------------------- model
class FapeS(nn.Module):
    """The compact executor. ``model(x, plans)`` restores (B, 3, H, W) images in [0, 1]."""

    def __init__(self, config: FapeSConfig | None = None) -> None:
        super().__init__()
        cfg = config or FapeSConfig()
        self.config = cfg
        ch, n = cfg.channels, cfg.levels
        dec = cfg.decoder_blocks if cfg.decoder_blocks is not None else cfg.blocks[:-1]
        s = cfg.stem
        self.embed = nn.Sequential(nn.PixelUnshuffle(s),
                                   nn.Conv2d(cfg.in_channels * s * s, ch[0], 3, padding=1))
        self.encoders = nn.ModuleList(
            [_stage(ch[i], cfg.blocks[i], cfg.heads[i], cfg) for i in range(n - 1)])
        self.downs = nn.ModuleList([Down(ch[i], ch[i + 1]) for i in range(n - 1)])
        self.latent = _stage(ch[-1], cfg.blocks[-1], cfg.heads[-1], cfg)
        self.ups = nn.ModuleList([Up(ch[i + 1], ch[i]) for i in range(n - 1)])
        self.reduces = nn.ModuleList([conv1x1(2 * ch[i], ch[i]) for i in range(n - 1)])
        self.decoders = nn.ModuleList(
            [_stage(ch[i], dec[i], cfg.heads[i], cfg) for i in range(n - 1)])
        self.refine = _stage(ch[0], cfg.refine_blocks, cfg.heads[0], cfg)
        self.light_enc = nn.Sequential(*[LightBlock(ch[0]) for _ in range(cfg.light_blocks[0])])
        self.light_dec = nn.Sequential(*[LightBlock(ch[0]) for _ in range(cfg.light_blocks[1])])
        self.out = nn.Sequential(nn.Conv2d(ch[0], cfg.in_channels * s * s, 3, padding=1),
                                 nn.PixelShuffle(s))
        with torch.no_grad():  # start close to the identity (output = input + small residual)
            self.out[0].weight.mul_(OUT_INIT_SCALE)
            self.out[0].bias.zero_()
        c_res = cfg.in_channels * s * s
        self.head = (RefineHead(ch[0], c_res, cfg.head_channels, cfg.head_blocks)
                     if cfg.head_channels else None)
        self.cond = PlanEncoder(cfg.cond_dim)
        match = target_matcher(list(cfg.moe_targets))
        self.moe_layers = inject_lora_moe(
            self, lambda n, m: not n.startswith("cond.") and match(n, m), cfg.moe_ranks,
            cond_dim=cfg.cond_dim,
            kernel_size=cfg.moe_kernel_size, sigma=cfg.moe_sigma, tau=cfg.moe_tau,
            text_mode=cfg.moe_text_mode, freq_mode=cfg.moe_freq_mode, freeze_base=False,
        )

    @property
    def multiple(self) -> int:
        """Spatial sizes are padded to a multiple of this."""
        return self.config.stem * 2 ** (self.config.levels - 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed[1].weight.device

    @property
    def bytes_per_pixel(self) -> float:
        """Rough peak inference memory per input pixel, for automatic tile sizes (about 48
        level-0 feature maps; fape-s measured ~0.5 KB/pixel in fp32 on CPU)."""
        elem = torch.finfo(self.dtype).bits / 8
        return 48.0 * elem * self.config.channels[0] / self.config.stem**2 + 64.0

    def plan_tokens(self, plans: Plan | list[Plan] | None) -> torch.Tensor | None:
        """Plan tokens (B x 4 x cond_dim) from the model's own plan encoder."""
        return None if plans is None else self.cond(plans)

    def forward(self, x: torch.Tensor, plans: Plan | list[Plan] | None = None, *,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Restore x (B, C, H, W); ``plans`` (or precomputed ``tokens``) condition the MoE.

        With neither, the MoE routes on the spectrum alone. Returns x's dtype and size.
        """
        if tokens is None:
            tokens = self.plan_tokens(plans)
        h, w = x.shape[-2:]
        xp = pad_to_multiple(x, self.multiple)
        with plan_context(self, tokens):
            fmt = torch.channels_last if self.config.channels_last else torch.contiguous_format
            residual = self._body(xp.to(self.dtype).contiguous(memory_format=fmt))
        return (xp + residual.to(x.dtype))[..., :h, :w]

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        unshuffled = self.embed[0](x)
        f = self.light_enc(self.embed[1](unshuffled))
        skips = []
        for enc, down in zip(self.encoders, self.downs, strict=True):
            f = enc(f)
            skips.append(f)
            f = down(f)
        f = self.latent(f)
        for i in reversed(range(len(skips))):
            f = self.ups[i](f)
            f = self.decoders[i](self.reduces[i](torch.cat([f, skips[i]], 1)))
        f = self.refine(self.light_dec(f))
        residual = self.out[0](f)
        if self.head is not None:
            residual = self.head(f, unshuffled, residual)
        return self.out[1](residual)

    @torch.no_grad()
    def restore(self, image: torch.Tensor, plan: Plan | None = None, *, tile: int | None = None,
                overlap: int = 32, **tiling: Any) -> torch.Tensor:
        """Prepare (SR upsampling), restore tile by tile, clamp to [0, 1]; (1, 3, H', W')."""
        from fapecli.execution.tiling import restore_tiled

        x = prepare_input(image, plan)
        tokens = self.plan_tokens(plan)
        tiling.setdefault("bytes_per_pixel", self.bytes_per_pixel)
        tiling.setdefault("device", self.device)
        result = restore_tiled(lambda t: self(t, tokens=tokens), x, tile=tile, overlap=overlap,
                               multiple=self.multiple, **tiling)
        return result.image.clamp_(0, 1)

    # ---------------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (optionally stored as ``dtype``)."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {}
        for k, v in self.state_dict().items():
            v = v.detach().cpu()
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            state[k] = v.contiguous()
        stored = str(dtype or self.dtype).removeprefix("torch.")
        config = {"_class_name": type(self).__name__, "format_version": FORMAT_VERSION,
                  "torch_dtype": stored, **self.config.to_dict()}
        text = json.dumps(config, indent=2)
        (out / CONFIG_NAME).write_text(text + "\n")
        save_file(state, str(out / WEIGHTS_NAME), metadata={"config": text, "format": "pt"})
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> FapeS:
        """Rebuild from a directory (config.json + model.safetensors) or a .safetensors file
        (config from the file's metadata, or a config.json beside it)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        p = Path(path)
        weights = p / WEIGHTS_NAME if p.is_dir() else p
        if not weights.is_file():
            raise FileNotFoundError(f"no weights at {weights}")
        config_file = weights.parent / CONFIG_NAME
        if config_file.is_file():
            data = json.loads(config_file.read_text())
        else:
            with safe_open(str(weights), framework="pt") as f:
                meta = f.metadata() or {}
            if "config" not in meta:
                raise FileNotFoundError(f"no {CONFIG_NAME} beside {weights} and none inside it")
            data = json.loads(meta["config"])
        model = cls(FapeSConfig.from_dict(data))
        state = load_file(str(weights))
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True)
        return model.to(device=device, dtype=dtype).eval()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def prepare_input(image: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
    """Upsampling by ``plan.scale`` (`fapecli.resample`) when the plan includes SR."""
    if plan is None or "sr" not in plan.tasks or not plan.scale or plan.scale <= 1:
        return image
    return upsample_tensor(image, int(plan.scale))


def flops_per_megapixel(model: FapeS, size: int = 256) -> float:
    """Forward FLOPs per megapixel counted on a ``size`` x ``size`` input."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, model.config.in_channels, size, size, dtype=model.dtype,
                   device=model.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() * 1e6 / (size * size)


def seconds_per_megapixel(model: FapeS, size: int = 1024, threads: int | None = 2,
                          repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of one forward on a ``size`` x ``size`` input, per MP."""
    import time

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        x = torch.rand(1, model.config.in_channels, size, size, device=model.device)
        with torch.inference_mode():
            model(x[..., : min(size, 128), : min(size, 128)])  # warm-up
            best = math.inf
            for _ in range(repeats):
                t = time.perf_counter()
                model(x)
                best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return best * 1e6 / (size * size)


__all__ = [
    "PRESETS", "FapeS", "FapeSConfig", "count_parameters", "create_model", "flops_per_megapixel",
    "get_config", "prepare_input", "seconds_per_megapixel",
]
