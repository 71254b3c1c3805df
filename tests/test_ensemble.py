"""Test-time self-ensemble: transforms, their inverses and the averaging."""

from __future__ import annotations

import pytest
import torch

from fapecli.execution.conditioning import plan_for_task
from fapecli.execution.ensemble import (
    ALL_TRANSFORMS,
    MIRROR_TRANSFORMS,
    apply_transform,
    invert_transform,
    self_ensemble,
    transforms_for,
)


@pytest.mark.parametrize("t", ALL_TRANSFORMS)
def test_every_transform_is_undone(t: int) -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    y = apply_transform(x, t)
    assert torch.equal(invert_transform(y, t), x)
    assert (y.shape[-2:] == (5, 4)) == bool(t & 4)


def test_the_eight_transforms_are_distinct() -> None:
    x = torch.rand(1, 1, 6, 6)
    outs = [apply_transform(x, t) for t in ALL_TRANSFORMS]
    assert all(not torch.equal(outs[i], outs[j]) for i in range(8) for j in range(i))


def test_an_equivariant_function_is_unchanged() -> None:
    x = torch.rand(1, 3, 8, 12)
    assert torch.allclose(self_ensemble(lambda t: 2 * t + 1)(x), 2 * x + 1, atol=1e-6)


def test_a_directional_function_is_averaged_over_the_transforms() -> None:
    """Adding a left-to-right ramp is undone by its mirror: the mirror pair averages to the
    mean ramp; over all eight, rows and columns both get it."""
    x = torch.zeros(1, 1, 4, 4)

    def ramp(t: torch.Tensor) -> torch.Tensor:
        return t + torch.arange(t.shape[-1], dtype=t.dtype)

    mirrored = self_ensemble(ramp, MIRROR_TRANSFORMS)(x)
    assert torch.allclose(mirrored, torch.full_like(x, 1.5))
    assert torch.allclose(self_ensemble(ramp)(x), torch.full_like(x, 1.5))
    single = self_ensemble(ramp, (0,))(x)
    assert torch.equal(single, ramp(x))


def test_weather_plans_keep_up_and_down() -> None:
    assert transforms_for(None) == ALL_TRANSFORMS
    assert transforms_for(plan_for_task("denoise")) == ALL_TRANSFORMS
    assert transforms_for(plan_for_task("sr", scale=4)) == ALL_TRANSFORMS
    for task in ("derain", "desnow", "dehaze"):
        assert transforms_for(plan_for_task(task)) == MIRROR_TRANSFORMS
    with pytest.raises(ValueError):
        self_ensemble(lambda t: t, ())
