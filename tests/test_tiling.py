from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from fapecli.execution.compact import create_model
from fapecli.execution.conditioning import plan_for_task
from fapecli.execution.tiling import auto_tile, ramp_weights, restore_tiled, tile_starts


def _local_model() -> nn.Module:
    """Three 3x3 convs: receptive radius 3."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.GELU(), nn.Conv2d(8, 3, 3, padding=1)).eval()


def test_tile_starts_cover_and_overlap() -> None:
    assert tile_starts(100, 128, 16) == [0]
    starts = tile_starts(130, 64, 16)
    assert starts == [0, 48, 66]
    assert all(b - a <= 64 - 16 for a, b in itertools.pairwise(starts))


def test_ramp_weights_partition_of_unity() -> None:
    a = ramp_weights(64, 16, False, True, floor=0.0)
    b = ramp_weights(64, 16, True, False, floor=0.0)
    assert a[:48].eq(1).all() and b[16:].eq(1).all()
    torch.testing.assert_close(a[48:] + b[:16], torch.ones(16))  # exact stride: sums to one
    assert ramp_weights(10, 4, False, False).eq(1).all()  # image borders keep full weight
    assert ramp_weights(64, 16, True, True, floor=1e-3).min() == pytest.approx(1e-3)


def test_tiled_equals_untiled_for_local_model() -> None:
    model = _local_model()
    img = torch.rand(1, 3, 70, 90)
    with torch.no_grad():
        full = model(img)
        result = restore_tiled(model, img, tile=32, overlap=16)
    assert result.tiles == len(tile_starts(70, 32, 16)) * len(tile_starts(90, 32, 16))
    torch.testing.assert_close(result.image, full, rtol=0, atol=1e-5)


def test_tiled_close_for_fape_tiny() -> None:
    torch.manual_seed(0)
    model = create_model("fape-tiny").eval()
    tokens = model.plan_tokens(plan_for_task("denoise"))
    img = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        full = model(img, tokens=tokens)
        tiled = restore_tiled(lambda t: model(t, tokens=tokens), img, tile=48, overlap=16)
    diff = (tiled.image - full).abs()
    assert tiled.tiles == 6
    assert diff.mean() < 0.05  # global attention/FFT: close, not equal


def _seam_ratio(out: torch.Tensor, tile: int, overlap: int) -> float:
    """Steepest step inside tile overlaps / steepest step elsewhere (rows and columns)."""
    ratios = []
    for dim in (-1, -2):
        g = out.diff(dim=dim).abs().mean(tuple(d for d in range(4) if d != out.dim() + dim))
        seam = torch.zeros_like(g, dtype=torch.bool)
        for s in tile_starts(out.shape[dim], tile, overlap)[1:]:
            seam[s : s + overlap] = True
        ratios.append((g[seam].max() / g[~seam].max()).item())
    return max(ratios)


def test_no_seams_on_smooth_image() -> None:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 160), indexing="ij")
    img = (0.4 + 0.2 * xx + 0.1 * yy)[None, None].repeat(1, 3, 1, 1)

    def global_op(t: torch.Tensor) -> torch.Tensor:  # each tile gets its own offset
        return t + (t.mean((1, 2, 3), keepdim=True) - 0.5)

    blended = restore_tiled(global_op, img, tile=64, overlap=32, floor=0.0).image
    hard = restore_tiled(global_op, img, tile=64, overlap=32, floor=0.0, blend=0.01).image
    assert _seam_ratio(hard, 64, 32) > 8  # the measure sees a hard seam ...
    assert _seam_ratio(blended, 64, 32) < 5  # ... and the raised-cosine window spreads it


def test_batched_tiles_match_single() -> None:
    model = _local_model()
    img = torch.rand(1, 3, 50, 70)
    with torch.no_grad():
        one = restore_tiled(model, img, tile=32, overlap=8).image
        many = restore_tiled(model, img, tile=32, overlap=8, batch=4).image
    torch.testing.assert_close(one, many, rtol=0, atol=1e-6)


def test_oom_retry_halves_tiles() -> None:
    calls: list[int] = []

    def fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape[-1])
        if t.shape[-1] > 40:
            raise torch.cuda.OutOfMemoryError("simulated")
        return t * 2

    img = torch.rand(1, 3, 100, 100)
    result = restore_tiled(fn, img, tile=128, overlap=8, min_tile=16)
    assert result.tile == 32 and calls[:2] == [100, 64]
    torch.testing.assert_close(result.image, img * 2)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        restore_tiled(fn, img, tile=128, overlap=8, min_tile=64)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        restore_tiled(fn, img, tile=128, overlap=8, on_oom=False)


def test_oom_halves_batch_first() -> None:
    def fn(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return t

    img = torch.rand(1, 3, 64, 64)
    result = restore_tiled(fn, img, tile=32, overlap=8, batch=4)
    assert result.tile == 32
    torch.testing.assert_close(result.image, img)


def test_auto_tile_from_budget() -> None:
    assert auto_tile(300, 400, bytes_per_pixel=100, budget_bytes=1e9) == 400  # fits whole
    t = auto_tile(4000, 6000, bytes_per_pixel=4096, budget_bytes=256 * 2**20, multiple=16)
    assert t % 16 == 0 and t * t * 4096 <= 256 * 2**20
    img = torch.rand(1, 3, 40, 50)
    result = restore_tiled(lambda x: x, img, tile=None, memory_budget=1e9)
    assert result.tiles == 1


def test_rejects_size_changing_fn() -> None:
    with pytest.raises(ValueError):
        restore_tiled(lambda x: x[..., :-1], torch.rand(1, 3, 20, 20), tile=16, overlap=4)
