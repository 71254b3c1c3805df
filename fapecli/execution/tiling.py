"""Tiled inference with smooth blending and bounded memory.

Tiles overlap by ``overlap`` pixels. Along each axis a tile's weight is 1, except on a side
that borders another tile, where it is ~0 for the outer ``(1 - blend) / 2`` of the overlap
(the part a model's limited receptive field can corrupt), then rises as a raised cosine over
the middle ``blend * overlap`` pixels (1 - cos, Hann-like), then stays 1. Sides on the image
border keep weight 1, so borders are always covered, and a small ``floor`` keeps every
weight positive. Weighted outputs and weights are accumulated in float32 on the CPU and
normalised at the end, so memory is the output + a one-channel weight map + one batch of
tiles, whatever the image size.

For a model whose receptive field reaches R pixels, the result equals whole-image inference
up to float rounding (and ``floor`` times the edge error) once
``R <= (1 - blend) / 2 * overlap`` (with the default ``blend=0.5``: ``overlap >= 4 R``).
Channel attention, FFTs and other global operations make a model non-local: then tiling is an
approximation whose error shrinks with larger tiles and overlaps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

TileFn = Callable[[torch.Tensor], torch.Tensor]


class TiledOutput(NamedTuple):
    image: torch.Tensor  # (1, C, H, W) float32 on out_device
    tiles: int  # tiles processed by the pass that succeeded
    tile: int  # the tile size that pass used (after any OOM halving)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``length`` with tiles of ``tile`` overlapping by >= ``overlap``."""
    if tile >= length:
        return [0]
    stride = max(1, tile - overlap)
    starts = [0]
    while starts[-1] + tile < length:
        starts.append(min(starts[-1] + stride, length - tile))
    return starts


def ramp_weights(size: int, overlap: int, lead: bool, trail: bool, *, blend: float = 0.5,
                 floor: float = 1e-5) -> torch.Tensor:
    """1-D window of a tile: raised-cosine ramps on the sides that border other tiles."""
    w = torch.ones(size, dtype=torch.float64)
    ramp_len = max(1, round(blend * overlap))
    margin = max(0, (overlap - ramp_len) // 2)
    t = (torch.arange(ramp_len, dtype=torch.float64) + 0.5) / ramp_len
    ramp = 0.5 - 0.5 * torch.cos(math.pi * t)  # rises from ~0 to ~1
    full = torch.cat([torch.zeros(margin, dtype=torch.float64), ramp])[:size]
    if lead:
        w[: full.numel()] = torch.minimum(w[: full.numel()], full)
    if trail:
        w[size - full.numel():] = torch.minimum(w[size - full.numel():], full.flip(0))
    return w.clamp_min(floor).float()


def auto_tile(height: int, width: int, *, bytes_per_pixel: float, budget_bytes: float,
              batch: int = 1, multiple: int = 8, min_tile: int = 64,
              max_tile: int = 4096) -> int:
    """Largest tile (a multiple of ``multiple``) whose batch fits ``budget_bytes``."""
    side = math.isqrt(max(1, int(budget_bytes / max(1.0, bytes_per_pixel * batch))))
    if side >= max(height, width):
        return max(height, width)
    side = max(min_tile, min(max_tile, side))
    return max(multiple, side // multiple * multiple)


def default_budget(device: torch.device | str | None) -> float:
    """Bytes tiles may use: half the free CUDA memory, else 2 GiB."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(dev)
        return 0.5 * free
    return 2.0 * 2**30


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)  # == torch.OutOfMemoryError


def restore_tiled(
    fn: TileFn,
    image: torch.Tensor,
    *,
    tile: int | None = None,
    overlap: int = 32,
    batch: int = 1,
    blend: float = 0.5,
    floor: float = 1e-5,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    out_device: torch.device | str = "cpu",
    multiple: int = 8,
    bytes_per_pixel: float = 4096.0,
    memory_budget: float | None = None,
    on_oom: bool = True,
    min_tile: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> TiledOutput:
    """Run ``fn`` (B, C, h, w) -> (B, C', h, w) over overlapping tiles of ``image`` (1, C, H, W).

    ``tile=None`` picks the size from ``memory_budget`` bytes (default: half the free CUDA
    memory, or 2 GiB) and ``bytes_per_pixel`` of ``fn``'s working memory, rounded to
    ``multiple``. Tiles go to ``device`` (default: the image's) as ``dtype`` (default: the
    image's), ``batch`` at a time. With ``on_oom``, a CUDA out-of-memory error halves the batch
    (or, at batch 1, the tile) and restarts, down to ``min_tile``. ``progress(done, total)``
    is called after each batch. Returns the float32 image, the tile count and the tile size.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected a (1, C, H, W) image, got {tuple(image.shape)}")
    _, _, height, width = image.shape
    device = torch.device(device) if device is not None else image.device
    if tile is None:
        budget = memory_budget if memory_budget is not None else default_budget(device)
        tile = auto_tile(height, width, bytes_per_pixel=bytes_per_pixel, budget_bytes=budget,
                         batch=batch, multiple=multiple, min_tile=min_tile)
    while True:
        try:
            out, count = _run(fn, image, tile, overlap, batch, blend, floor, device, dtype,
                              torch.device(out_device), progress)
            return TiledOutput(out, count, tile)
        except Exception as exc:
            if not (on_oom and _is_oom(exc)):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if batch > 1:
                batch //= 2
                continue
            smaller = max(multiple, tile // 2 // multiple * multiple)
            if smaller < min_tile or smaller >= tile:
                raise
            tile = smaller


def _run(fn: TileFn, image: torch.Tensor, tile: int, overlap: int, batch: int, blend: float,
         floor: float, device: torch.device, dtype: torch.dtype | None,
         out_device: torch.device,
         progress: Callable[[int, int], None] | None) -> tuple[torch.Tensor, int]:
    _, _, height, width = image.shape
    th, tw = min(tile, height), min(tile, width)
    ov_h, ov_w = min(overlap, th // 2), min(overlap, tw // 2)  # stride >= half a tile
    ys, xs = tile_starts(height, th, ov_h), tile_starts(width, tw, ov_w)
    boxes = [(y, x) for y in ys for x in xs]
    # per-position windows (they depend only on which sides border another tile)
    row_w = {y: ramp_weights(th, ov_h, y > 0, y + th < height, blend=blend, floor=floor)
             for y in ys}
    col_w = {x: ramp_weights(tw, ov_w, x > 0, x + tw < width, blend=blend, floor=floor)
             for x in xs}
    acc: torch.Tensor | None = None
    weight = torch.zeros(1, 1, height, width, dtype=torch.float32, device=out_device)
    for i in range(0, len(boxes), batch):
        group = boxes[i : i + batch]
        crops = torch.cat([image[:, :, y : y + th, x : x + tw] for y, x in group])
        crops = crops.to(device=device, dtype=dtype or image.dtype)
        result = fn(crops)
        if result.shape[-2:] != (th, tw):
            raise ValueError(f"fn changed the tile size {(th, tw)} to {tuple(result.shape[-2:])}")
        result = result.to(device=out_device, dtype=torch.float32)
        if acc is None:
            acc = torch.zeros(1, result.shape[1], height, width, dtype=torch.float32,
                              device=out_device)
        for j, (y, x) in enumerate(group):
            w = (row_w[y][:, None] * col_w[x][None, :]).to(out_device)
            acc[0, :, y : y + th, x : x + tw].addcmul_(result[j], w)
            weight[0, 0, y : y + th, x : x + tw].add_(w)
        del result, crops
        if progress is not None:
            progress(min(i + batch, len(boxes)), len(boxes))
    assert acc is not None
    return acc.div_(weight), len(boxes)
