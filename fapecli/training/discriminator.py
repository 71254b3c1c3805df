"""The multi-level discriminator: a backbone's features at several depths, one head per level.

FAPE-IR (SEED-NOTES sections 1 and 5): a frozen SigLIP-v2 image encoder; the token maps of
layers at about 25 / 50 / 100 % depth are reshaped to spatial maps, each passes a shallow
spectrally normalised conv path with anti-aliased (BlurPool) downsampling into a score map
averaged to a scalar, plus a head on the pooled token; the levels are averaged uniformly.

Here each level's logit is ``mean(score map) + pooled_head(mean token)`` (SigLIP has no class
token, so the "pooled token" is the mean of the level's tokens), and the discriminator's
output is the uniform mean over levels. Backbones:

* ``siglip``: a frozen ``SiglipVisionModel`` or ``Siglip2VisionModel`` (transformers), found
  locally through the model manifest (never downloaded). Inputs are resized to the tower's
  native size (SigLIP: ``image_size``; SigLIP-2 NaFlex: a square grid of ``num_patches``) and
  normalised to [-1, 1]; gradients flow through the frozen tower to the generator.
* ``conv``: a small trainable spectrally normalised conv net with BlurPool downsampling, whose
  stride-2/4/8 feature maps are the levels: the fallback when no SigLIP weights are found, and
  cheap enough for CPU training.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

DEPTHS = (0.25, 0.5, 1.0)


class BlurPool(nn.Module):
    """Anti-aliased stride-2 downsampling: a fixed binomial [1, 2, 1]^2 / 16 blur, then stride."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16.0
        self.register_buffer("kernel", k.expand(channels, 1, 3, 3).contiguous(), persistent=False)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.kernel.to(x.dtype), stride=2, groups=self.channels)


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


class LevelHead(nn.Module):
    """One level: SN conv -> BlurPool -> SN conv -> SN 1x1 score map, plus a pooled-token head."""

    def __init__(self, c_in: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            spectral_norm(nn.Conv2d(c_in, width, 3, padding=1)), _act(), BlurPool(width),
            spectral_norm(nn.Conv2d(width, width, 3, padding=1)), _act(),
            spectral_norm(nn.Conv2d(width, 1, 1)),
        )
        self.pooled = nn.Sequential(
            spectral_norm(nn.Linear(c_in, width)), _act(), spectral_norm(nn.Linear(width, 1))
        )

    def forward(self, fmap: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.conv(fmap).mean((1, 2, 3)) + self.pooled(pooled).squeeze(-1)


class ConvBackbone(nn.Module):
    """Trainable SN conv features at strides 2, 4, 8 (widths w, 2w, 4w)."""

    frozen = False

    def __init__(self, width: int = 32, levels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(spectral_norm(nn.Conv2d(3, width, 3, padding=1)), _act())
        chans = [width * 2**i for i in range(levels)]
        stages, c = [], width
        for c_out in chans:
            stages.append(nn.Sequential(
                BlurPool(c), spectral_norm(nn.Conv2d(c, c_out, 3, padding=1)), _act(),
                spectral_norm(nn.Conv2d(c_out, c_out, 3, padding=1)), _act(),
            ))
            c = c_out
        self.stages = nn.ModuleList(stages)
        self.channels = chans

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        f = self.stem(x * 2 - 1)
        out = []
        for stage in self.stages:
            f = stage(f)
            out.append((f, f.mean((2, 3))))
        return out


class SiglipBackbone(nn.Module):
    """A frozen SigLIP / SigLIP-2 vision tower; token maps of layers at ``depths`` of its depth."""

    frozen = True

    def __init__(self, tower: nn.Module, depths: tuple[float, ...] = DEPTHS) -> None:
        super().__init__()
        self.tower = tower.eval().requires_grad_(False)
        cfg = tower.config
        self.naflex = hasattr(cfg, "num_patches") and type(tower).__name__.startswith("Siglip2")
        self.patch = int(cfg.patch_size)
        if self.naflex:
            self.grid = math.isqrt(int(cfg.num_patches))
        else:
            self.grid = int(cfg.image_size) // self.patch
        n = int(cfg.num_hidden_layers)
        self.layers = sorted({max(1, min(n, round(d * n))) for d in depths})
        self.channels = [int(cfg.hidden_size)] * len(self.layers)

    def train(self, mode: bool = True) -> SiglipBackbone:  # the tower stays in eval mode
        super().train(mode)
        self.tower.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        side = self.grid * self.patch
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > side)
        x = (x * 2 - 1).to(next(self.tower.parameters()).dtype)
        b = x.shape[0]
        if self.naflex:
            p, g = self.patch, self.grid
            patches = x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, -1)
            mask = torch.ones(b, g * g, dtype=torch.long, device=x.device)
            shapes = torch.tensor([[g, g]] * b, dtype=torch.long, device=x.device)
            out = self.tower(pixel_values=patches, pixel_attention_mask=mask,
                             spatial_shapes=shapes, output_hidden_states=True)
        else:
            out = self.tower(pixel_values=x, output_hidden_states=True)
        feats = []
        for i in self.layers:
            tokens = out.hidden_states[i].float()  # (B, N, C)
            fmap = tokens.transpose(1, 2).reshape(b, -1, self.grid, self.grid)
            feats.append((fmap, tokens.mean(1)))
        return feats


class MultiLevelDiscriminator(nn.Module):
    """``D(x)``: (B,) logits for images in [0, 1], the uniform mean of the level logits."""

    def __init__(self, backbone: nn.Module, width: int = 32) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList([LevelHead(c, width) for c in backbone.channels])

    @property
    def kind(self) -> str:
        return "siglip" if isinstance(self.backbone, SiglipBackbone) else "conv"

    def level_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(levels, B) logits, one row per level."""
        feats = self.backbone(x)
        return torch.stack([h(f, p) for h, (f, p) in zip(self.heads, feats, strict=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.level_logits(x).float().mean(0)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps: everything but a frozen backbone's weights."""
        skip = "backbone." if getattr(self.backbone, "frozen", False) else None
        return {k: v for k, v in self.state_dict().items() if not (skip and k.startswith(skip))}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        frozen = getattr(self.backbone, "frozen", False)
        missing = [k for k in missing if not (frozen and k.startswith("backbone."))]
        if missing or unexpected:
            raise ValueError(f"discriminator state mismatch: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")


def load_siglip_tower(path: str | Path) -> nn.Module:
    """A SigLIP / SigLIP-2 vision tower from a local folder (a full model or a vision model)."""
    from transformers import AutoConfig, SiglipVisionModel

    folder = Path(path)
    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    if "siglip2" in cfg.model_type:
        from transformers import Siglip2VisionModel

        return Siglip2VisionModel.from_pretrained(folder, local_files_only=True)
    return SiglipVisionModel.from_pretrained(folder, local_files_only=True)


def build_discriminator(backbone: str = "auto", *, siglip_name: str = "siglip2-vision",
                        width: int = 32) -> tuple[MultiLevelDiscriminator, str]:
    """The discriminator for ``backbone`` (auto | siglip | conv) and a one-line report.

    ``auto`` uses the SigLIP tower named ``siglip_name`` in the model manifest when all its
    files are present, else the conv backbone; ``siglip`` raises WeightsError when they are not.
    """
    from fapecli.errors import WeightsError
    from fapecli.weights import find_file, get_model, locate

    if backbone in ("auto", "siglip"):
        try:
            entry = get_model(siglip_name)
            missing = [f.path for f in entry.files if find_file(entry, f) is None]
            reason = f"{missing[0]} missing" if missing else ""
        except WeightsError:
            entry, reason = None, f"{siglip_name!r} is not in the model manifest"
        if entry is not None and not reason:
            files = locate(entry)
            config = next((p for p in files.values() if p.name == "config.json"), None)
            if config is None:
                raise WeightsError(f"model {siglip_name!r} lists no config.json")
            disc = MultiLevelDiscriminator(SiglipBackbone(load_siglip_tower(config.parent)), width)
            return disc, f"discriminator=siglip ({siglip_name}, layers {disc.backbone.layers})"
        if backbone == "siglip":
            raise WeightsError(f"discriminator backbone siglip: {reason}")
        return (MultiLevelDiscriminator(ConvBackbone(width), width),
                f"discriminator=conv (siglip weights not found: {reason})")
    return MultiLevelDiscriminator(ConvBackbone(width), width), "discriminator=conv"
