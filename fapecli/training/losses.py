"""Training losses: pixel, perceptual (LPIPS or a documented fallback), adversarial, frequency.

Generator objective (SEED-NOTES sections 1 and 5)::

    L = l2 * MSE + l1 * L1 + perceptual * P(y, x) + adv * L_adv(D(y)) + freq * L_freq

* ``P`` is LPIPS-VGG (the paper's) only when its weights are on disk: the LPIPS linear heads
  (``LPIPS_v0.1_vgg-a78928a0.pth``, pyiqa's / richzhang's release) and torchvision's VGG-16
  (``vgg16-397923af.pth``), looked up through the model manifest (entries ``lpips-vgg`` /
  ``lpips``) and in torch hub's ``pyiqa/`` and ``checkpoints/`` folders. Nothing is downloaded:
  the network is built here from torchvision's architecture with random weights and filled
  from those files (``torch.load(weights_only=True)`` or ``.safetensors``). Without them the
  configured fallback is used and reported: ``fft`` (L1 between amplitude spectra, cheap and
  sensitive to lost texture and to ringing) or ``msssim`` (1 - MS-SSIM).
* ``L_adv``: ``ns``, the non-saturating "standard" GAN loss (``softplus(-D(y))`` for the
  generator, ``softplus(-D(x)) + softplus(D(y))`` for the discriminator), or ``hinge``
  (``-D(y)``; ``relu(1 - D(x)) + relu(1 + D(y))``).
* ``L_freq`` is :func:`fapecli.execution.moe.moe_regulariser` (out-of-band energy of the two
  experts' adapter outputs, summed over the MoE layers).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

LPIPS_FILES = {  # net -> (LPIPS linear heads, torchvision backbone)
    "vgg": ("LPIPS_v0.1_vgg-a78928a0.pth", "vgg16-397923af.pth"),
    "alex": ("LPIPS_v0.1_alex-df73285e.pth", "alexnet-owt-7be5be79.pth"),
}
LPIPS_MANIFEST_NAMES = ("lpips-vgg", "lpips", "torchvision-vgg16", "torchvision-alexnet")


# ------------------------------------------------------------------------------- metrics
def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of (B, 3, H, W) in [0, 1], in [16/255, 235/255] (MATLAB convention)."""
    w = x.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1) / 255.0
    return (x * w).sum(1, keepdim=True) + 16.0 / 255.0


def psnr(x: torch.Tensor, y: torch.Tensor, y_channel: bool = True) -> torch.Tensor:
    """Per-image PSNR (dB) of (B, 3, H, W) images in [0, 1]; on the Y channel by default."""
    if y_channel:
        x, y = rgb_to_y(x), rgb_to_y(y)
    mse = (x.float() - y.float()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gauss_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_parts(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean SSIM and contrast-structure term (valid 11x11 Gaussian window)."""
    c = x.shape[1]
    g = _gauss_window(device=x.device).to(x.dtype)
    kx = g.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = g.view(1, 1, -1, 1).expand(c, 1, -1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return (lum * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


def ssim(x: torch.Tensor, y: torch.Tensor, y_channel: bool = True) -> torch.Tensor:
    """Per-image SSIM (Gaussian 11x11, sigma 1.5) of images in [0, 1]; Y channel by default."""
    if y_channel:
        x, y = rgb_to_y(x), rgb_to_y(y)
    return _ssim_parts(x.float(), y.float())[0]


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image MS-SSIM with as many of the 5 standard scales as the size allows (>= 1)."""
    x, y = x.float(), y.float()
    levels = max(1, min(5, int(math.log2(min(x.shape[-2:]) / 11)) + 1))
    w = torch.tensor(MS_SSIM_WEIGHTS[:levels], device=x.device)
    w = w / w.sum()
    vals = []
    for i in range(levels):
        s, cs = _ssim_parts(x, y)
        vals.append((s if i == levels - 1 else cs).clamp_min(1e-6))
        if i < levels - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.prod(torch.stack(vals, 0) ** w.view(-1, 1), 0)


# --------------------------------------------------------------------------- perceptual
class FFTLoss(nn.Module):
    """Mean absolute difference of orthonormal 2-D amplitude spectra (per channel)."""

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        fy = torch.fft.rfft2(y.float(), norm="ortho").abs()
        fx = torch.fft.rfft2(x.float(), norm="ortho").abs()
        return (fy - fx).abs().mean()


class MSSSIMLoss(nn.Module):
    """``1 - MS-SSIM`` averaged over the batch (RGB channels together)."""

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 1.0 - ms_ssim(y.clamp(0, 1), x).mean()


class LPIPSLoss(nn.Module):
    """LPIPS (v0.1) on a frozen torchvision VGG-16 or AlexNet, built without downloading."""

    SLICES: ClassVar = {"vgg": (4, 9, 16, 23, 30), "alex": (2, 5, 8, 10, 12)}
    CHANNELS: ClassVar = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}

    def __init__(self, lin_path: str | Path, backbone_path: str | Path, net: str = "vgg") -> None:
        super().__init__()
        from torchvision import models

        trunk = (models.vgg16 if net == "vgg" else models.alexnet)(weights=None).features
        trunk.load_state_dict(_strip(_load_tensors(backbone_path), "features."), strict=True)
        bounds = (0, *self.SLICES[net])
        self.slices = nn.ModuleList(
            [nn.Sequential(*[trunk[j] for j in range(a, b)]) for a, b in itertools.pairwise(bounds)]
        )
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS[net]])
        lin_state = _load_tensors(lin_path)
        for i, conv in enumerate(self.lins):
            key = next((k for k in lin_state if re.search(rf"lin{i}\.model\.\d+\.weight$", k)),
                       None)
            if key is None:
                raise ValueError(f"{lin_path}: no lin{i} weights (not an LPIPS file?)")
            conv.weight.data.copy_(lin_state[key].view_as(conv.weight))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPSLoss:  # always frozen, always eval
        return super().train(False)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        fy = (y.float() * 2 - 1 - self.shift) / self.scale
        fx = (x.float() * 2 - 1 - self.shift) / self.scale
        total = y.new_zeros((), dtype=torch.float32)
        for block, lin in zip(self.slices, self.lins, strict=True):
            fy, fx = block(fy), block(fx)
            ny = fy / (fy.square().sum(1, keepdim=True).sqrt() + 1e-10)
            nx = fx / (fx.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((ny - nx).square()).mean()
        return total


def _load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from ``.safetensors`` or a ``.pth`` (tensors only, weights_only)."""
    p = str(path)
    if p.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(p)
    state = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("state_dict", "params", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _candidates(name: str) -> list[Path]:
    """Where a perceptual weight file may lie: manifest entries, $FAPE_WEIGHTS, torch hub."""
    import os

    from fapecli import weights as W

    dirs: list[Path] = []
    for model in LPIPS_MANIFEST_NAMES:
        try:
            dirs += W.search_dirs(W.get_model(model))
        except Exception:  # no manifest entry (or no manifest): fine, look elsewhere
            continue
    dirs += [Path(p) for p in os.environ.get(W.ENV_WEIGHTS, "").split(os.pathsep) if p]
    hub = W.torch_hub_dir()
    dirs += [hub / "pyiqa", hub / "checkpoints", W.fape_cache_dir() / "lpips"]
    stem = name.rsplit(".", 1)[0]
    return [d / n for d in dirs for n in (name, f"{stem}.safetensors")]


def find_lpips_weights(net: str = "vgg") -> tuple[Path, Path] | str:
    """(LPIPS heads, backbone) paths, or the name of the first file that was not found."""
    found = []
    for name in LPIPS_FILES[net]:
        path = next((c for c in _candidates(name) if c.is_file()), None)
        if path is None:
            return name
        found.append(path)
    return found[0], found[1]


@dataclass
class Perceptual:
    """The perceptual term in use and a one-line report for the log."""

    kind: str  # lpips | msssim | fft | none
    module: nn.Module | None
    report: str
    files: list[str] = field(default_factory=list)


def build_perceptual(kind: str, fallback: str = "fft") -> Perceptual:
    """The configured perceptual loss; LPIPS falls back (reported) when its weights are absent."""
    note = ""
    if kind == "lpips":
        missing = []
        for net in ("vgg", "alex"):
            found = find_lpips_weights(net)
            if not isinstance(found, str):
                module = LPIPSLoss(found[0], found[1], net)
                return Perceptual("lpips", module, f"perceptual=lpips-{net}",
                                  [str(p) for p in found])
            missing.append(found)
        kind, note = fallback, f" (lpips weights not found: {missing[0]})"
    modules: dict[str, nn.Module | None] = {"fft": FFTLoss(), "msssim": MSSSIMLoss(), "none": None}
    return Perceptual(kind, modules[kind], f"perceptual={kind}{note}")


# ---------------------------------------------------------------------------- adversarial
def g_adv_loss(fake_logits: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    """The generator's adversarial loss on the discriminator's logits for restored images."""
    return F.softplus(-fake_logits).mean() if kind == "ns" else (-fake_logits).mean()


def d_adv_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
               kind: str = "ns") -> torch.Tensor:
    """The discriminator's loss (real = ground truth, fake = restored)."""
    if kind == "ns":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


# ------------------------------------------------------------------------------ combined
PSNR_LOSS_EPS = 1e-4  # MSE floor of the PSNR loss: samples past 40 dB stop weighing more


def log_mse(out: torch.Tensor, gt: torch.Tensor, eps: float = PSNR_LOSS_EPS) -> torch.Tensor:
    """The PSNR loss: the batch mean of ``10 log10(MSE + eps)`` per sample (= -PSNR in dB).

    Its gradient is the MSE's divided by the sample's own MSE, so every sample counts by its
    relative error: in an all-in-one batch, small residuals (noise, SR) are not drowned by the
    large global ones (low light, haze) as they are under a plain L2.
    """
    mse = (out - gt).square().flatten(1).mean(1)
    return 10.0 * torch.log10(mse + eps).mean()


def generator_loss(
    out: torch.Tensor,
    gt: torch.Tensor,
    weights: dict[str, float],
    *,
    perceptual: nn.Module | None = None,
    fake_logits: torch.Tensor | None = None,
    adv_kind: str = "ns",
    model: nn.Module | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the terms whose weight is non-zero, and each term's (unweighted) value.

    ``weights`` has keys l2, psnr, l1, perceptual, adv, freq; ``fake_logits`` are D's logits
    for ``out`` (the adversarial term is skipped when None); ``model`` supplies the MoE layers.
    """
    out, gt = out.float(), gt.float()
    terms: dict[str, torch.Tensor] = {}
    if weights.get("l2", 0):
        terms["l2"] = F.mse_loss(out, gt)
    if weights.get("psnr", 0):
        terms["psnr"] = log_mse(out, gt)
    if weights.get("l1", 0):
        terms["l1"] = F.l1_loss(out, gt)
    if weights.get("perceptual", 0) and perceptual is not None:
        terms["perceptual"] = perceptual(out, gt)
    if weights.get("adv", 0) and fake_logits is not None:
        terms["adv"] = g_adv_loss(fake_logits.float(), adv_kind)
    if weights.get("freq", 0) and model is not None:
        from fapecli.execution.moe import moe_regulariser

        terms["freq"] = moe_regulariser(model).to(out.device)
    total = sum((weights[k] * v for k, v in terms.items()), out.new_zeros(()))
    return total, {k: float(v.detach()) for k, v in terms.items()}
