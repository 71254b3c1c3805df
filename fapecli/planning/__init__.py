"""Planning: read label-free statistics of an image and decide what to restore.

`plan` is the library entry point: an image (array, `fapecli.io.Image` or path) in, a
`Plan` out. The rule planner applies the FAPE-IR expert rule to the feature pool; the Qwen
planner (when its weights are present) asks a vision-language model with the same pool as
hints (`fapecli.planning.qwen`; its `QwenPlanner.run` also returns the answer's hidden states).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fapecli.planning.plan import Plan

if TYPE_CHECKING:
    import numpy as np
    import torch

    from fapecli.io import Image

PLANNERS = ("rules", "qwen")
DEFAULT_QWEN_MODEL = "qwen2.5-vl-3b"

__all__ = ["DEFAULT_QWEN_MODEL", "PLANNERS", "Plan", "plan"]


def plan(
    image: Image | np.ndarray | str | Path,
    *,
    planner: str = "rules",
    model: str | Path | None = None,
    device: str | torch.device | None = "auto",
    precision: str | torch.dtype | None = "auto",
) -> Plan:
    """Plan the restoration of one image with the named planner.

    ``model`` (Qwen only): a weights.toml planner name or a Qwen2.5-VL folder (default
    ``qwen2.5-vl-3b``); ``device`` and ``precision`` as for `fapecli.loader.load_model`.
    When the Qwen answer is unusable the rule plan is returned with ``fallback`` set and a
    `fapecli.planning.qwen.PlannerWarning` is issued.
    """
    from fapecli.errors import UsageError
    from fapecli.io import Image, read_image
    from fapecli.planning.rules import plan_image

    if planner not in PLANNERS:
        raise UsageError(f"unknown planner {planner!r}; choose one of {', '.join(PLANNERS)}")
    if isinstance(image, (str, Path)):
        image = read_image(image)
    if planner == "qwen":
        from fapecli.planning.qwen import load_planner

        qwen = load_planner(model or DEFAULT_QWEN_MODEL, device=device, precision=precision)
        return qwen.run(image).plan
    if isinstance(image, Image):
        return plan_image(image.rgb, size=(image.height, image.width))
    return plan_image(image)
