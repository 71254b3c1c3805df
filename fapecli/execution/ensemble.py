"""Test-time self-ensemble: run the executor on flipped and transposed copies of the input,
undo each transform on the output and average (the "x8" of EDSR+ and BasicSR).

Noise, blur, low light and low resolution have no preferred direction, so all eight symmetries
of the square are used. Rain falls, snow drifts down and haze thickens towards the horizon: an
upside-down or transposed copy is an image the executor never saw in training (with fape-s v2,
eight passes cost 0.65 dB on two Rain100L images and 0.84 dB on two CBSD68 haze images, where
the two mirrors gained 0.11 and 0.09 dB), so plans with a weather task use the identity and the
left-right mirror only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fapecli.planning.plan import Plan

TileFn = Callable[[torch.Tensor], torch.Tensor]

# tasks whose degradations have an up and a down: only left-right mirroring keeps them natural
ORIENTED_TASKS = frozenset({"derain", "desnow", "dehaze"})

# transform t: bit 0 flips left-right, bit 1 flips up-down, bit 2 transposes (applied in this
# order; undone in reverse)
ALL_TRANSFORMS = tuple(range(8))
MIRROR_TRANSFORMS = (0, 1)


def transforms_for(plan: Plan | None) -> tuple[int, ...]:
    """The transforms that keep ``plan``'s degradations natural (see the module docstring)."""
    if plan is not None and ORIENTED_TASKS.intersection(plan.tasks):
        return MIRROR_TRANSFORMS
    return ALL_TRANSFORMS


def apply_transform(x: torch.Tensor, t: int) -> torch.Tensor:
    """Transform ``t`` (0-7) of a (..., H, W) tensor."""
    if t & 1:
        x = x.flip(-1)
    if t & 2:
        x = x.flip(-2)
    if t & 4:
        x = x.transpose(-1, -2)
    return x


def invert_transform(x: torch.Tensor, t: int) -> torch.Tensor:
    """Undo :func:`apply_transform` with the same ``t``."""
    if t & 4:
        x = x.transpose(-1, -2)
    if t & 2:
        x = x.flip(-2)
    if t & 1:
        x = x.flip(-1)
    return x


def self_ensemble(fn: TileFn, transforms: tuple[int, ...] = ALL_TRANSFORMS) -> TileFn:
    """``fn`` averaged over ``transforms`` of its input (outputs accumulated in float32)."""
    if not transforms:
        raise ValueError("self_ensemble needs at least one transform")

    def run(x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for t in transforms:
            y = invert_transform(fn(apply_transform(x, t).contiguous()), t).float()
            total = y if total is None else total + y
        assert total is not None
        return (total / len(transforms)).to(x.dtype)

    return run
