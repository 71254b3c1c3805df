"""Planning: read label-free statistics of an image and decide what to restore.

`plan` is the library entry point: an image (array, `fapecli.io.Image` or path) in, a
`Plan` out. The rule planner applies the FAPE-IR expert rule to the feature pool; the Qwen
planner (when its weights are present) asks a vision-language model with the same pool as hints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fapecli.planning.plan import Plan

if TYPE_CHECKING:
    import numpy as np

    from fapecli.io import Image

PLANNERS = ("rules",)

__all__ = ["PLANNERS", "Plan", "plan"]


def plan(image: Image | np.ndarray | str | Path, *, planner: str = "rules") -> Plan:
    """Plan the restoration of one image with the named planner."""
    from fapecli.errors import UsageError
    from fapecli.io import Image, read_image
    from fapecli.planning.rules import plan_image

    if planner not in PLANNERS:
        raise UsageError(f"unknown planner {planner!r}; choose one of {', '.join(PLANNERS)}")
    if isinstance(image, (str, Path)):
        image = read_image(image)
    if isinstance(image, Image):
        return plan_image(image.rgb, size=(image.height, image.width))
    return plan_image(image)
