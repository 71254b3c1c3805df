"""The one upsampling that comes before the executor for super-resolution.

The network restores at output resolution, so a low-resolution input is first enlarged to the
target size. Training (`fapecli.training.degrade.add_lowres` with ``keep_size`` and SR pairs in
`fapecli.training.data`) and inference (`fapecli.execution.compact.prepare_input`) use this
same function, so the executor sees the kind of input it was trained on. OpenCV's Lanczos
(8x8 taps) is sharper than bicubic, and the executor restores SR better from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

INTERPOLATION = cv2.INTER_LANCZOS4


def upsample(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """H x W [x C] image resized to ``hw`` = (rows, columns); float images stay in [0, 1].

    uint8 saturates in OpenCV; float32 is clipped (Lanczos overshoots at edges).
    """
    if image.shape[:2] == tuple(hw):
        return image
    out = cv2.resize(image, (int(hw[1]), int(hw[0])), interpolation=INTERPOLATION)
    if image.ndim == 3 and out.ndim == 2:  # OpenCV drops a single channel axis
        out = out[..., None]
    if out.dtype.kind == "f":
        np.clip(out, 0.0, 1.0, out=out)
    return out


def upsample_tensor(batch: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, C, H, W) tensor enlarged ``scale`` times by `upsample`; same device and dtype."""
    import torch

    h, w = batch.shape[-2:]
    hw = (h * scale, w * scale)
    frames = [upsample(x.permute(1, 2, 0).float().cpu().numpy(), hw) for x in batch]
    out = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()
    return out.to(device=batch.device, dtype=batch.dtype)
