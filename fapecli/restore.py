"""Restoration of one image: plan, prepare, run the executor tile by tile, check, carry metadata.

`restore_image` is the library entry point (an `Image` in, a `Restored` out); `restore_file`
adds reading and the atomic write. Both are what `fape restore` calls for every input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fapecli.errors import FapeError
from fapecli.io import Image, read_image, write_image
from fapecli.planning.plan import Plan
from fapecli.tasks import NONE, normalize_task

EXPLAIN_SIZE = 512  # long side of the preview on which --explain records the routing map


@dataclass
class Restored:
    """A restored image and how it was made."""

    image: Image
    plan: Plan
    seconds: float
    tiles: int = 0
    skipped: str | None = None  # "clean" when the plan found nothing to restore
    expert: str | None = None  # the task expert that restored it (None: the base model)
    routing: np.ndarray | None = None  # high-band expert share per pixel (preview size)
    routing_summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. the Qwen planner fell back


Planner = Any  # "rules", or a loaded planner with ``run(image)`` (`fapecli.planning.qwen`)


@dataclass
class Planned:
    """A plan with what its planner produced beside it."""

    plan: Plan
    hidden: torch.Tensor | None = None  # the planner's hidden states (Qwen), if any
    warnings: list[str] = field(default_factory=list)


def make_plan(
    image: Image,
    *,
    plan: Plan | None = None,
    task: str | None = None,
    scale: int | None = None,
    planner: Planner = "rules",
) -> Plan:
    """The given plan, a forced ``task``'s plan, or the planner's; ``scale`` forces SR by it.

    ``planner``: a planner name for `fapecli.planning.plan` or a loaded planner object
    (`fapecli.planning.qwen.QwenPlanner`); see `plan_with` for its hidden states too.
    """
    return plan_with(image, plan=plan, task=task, scale=scale, planner=planner).plan


def plan_with(
    image: Image,
    *,
    plan: Plan | None = None,
    task: str | None = None,
    scale: int | None = None,
    planner: Planner = "rules",
) -> Planned:
    """`make_plan` keeping the planner's hidden states and warnings (a Qwen fallback)."""
    from fapecli.execution.conditioning import plan_for_task
    from fapecli.planning import plan as plan_image

    planned = Planned(plan) if plan is not None else None
    if planned is None and task is not None and normalize_task(task) != NONE:
        forced = plan_for_task(task, scale=scale)
        forced.source, forced.rationale = "user", f"task forced by the user ({forced.task})"
        planned = Planned(forced)
    elif planned is None and isinstance(planner, str):
        planned = Planned(plan_image(image, planner=planner))
    elif planned is None:
        answer = planner.run(image, warn=False)
        planned = Planned(answer.plan, answer.hidden, list(answer.warnings))
    plan = planned.plan
    if scale and scale > 1:
        if plan.task == NONE:
            plan = plan_for_task("sr", scale=scale)
            plan.source, plan.rationale = "user", f"upscaling x{scale} asked by the user"
        elif "sr" not in plan.tasks:
            plan.secondary = [*plan.secondary, "sr"]
        plan.scale = scale
    elif "sr" in plan.tasks and not plan.scale:
        plan.scale = 2
    planned.plan = plan
    return planned


EXECUTORS = ("compact", "flux")
DEFAULT_MODELS = {"compact": "fape-s", "flux": "fape-flux-adapters"}


def load_executor(
    model: str | Path = "fape-s",
    executor: str = "compact",
    *,
    device: str | torch.device | None = "auto",
    precision: str | torch.dtype | None = "auto",
) -> torch.nn.Module:
    """The executor `model` through the shared loader, checked to be of kind `executor`.

    With ``executor="flux"`` the compact default model name stands for the FLUX default
    (``fape-flux-adapters``); a FLUX base name or folder gets fresh, untrained adapters.
    """
    from fapecli.errors import UsageError
    from fapecli.loader import load_model

    if executor not in EXECUTORS:
        raise UsageError(f"--executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    if str(model) == DEFAULT_MODELS["compact"]:
        model = DEFAULT_MODELS[executor]
    net = load_model(model, device=device, precision=precision)
    kind = getattr(net, "executor_kind", "compact")
    if kind != executor:
        raise UsageError(f"--model {model} is a {kind} executor; pass --executor {kind} "
                         f"or a {executor} model")
    return net


def takes_hidden(model: torch.nn.Module) -> bool:
    """Whether the executor's plan encoder projects planner hidden states (FLUX adapters)."""
    return getattr(getattr(model, "cond", None), "hidden", None) is not None


def _to_tensor(rgb: np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    """(1, 3, H, W) float32 on the model's device; a view of ``rgb`` on the CPU (no copy)."""
    x = torch.from_numpy(rgb.astype(np.float32, copy=False)).permute(2, 0, 1)[None]
    return x.to(device=model.device)


def _check(out: np.ndarray, src: np.ndarray, where: str | None) -> None:
    if not np.isfinite(out).all():
        raise FapeError("restoration produced NaN/inf values (try --precision fp32)", where)
    if out.max() < 1.0 / 255 and src.max() > 4.0 / 255:
        raise FapeError("restoration produced an all-black image (try --precision fp32)", where)


def restore_image(
    image: Image,
    model: torch.nn.Module,
    *,
    plan: Plan | None = None,
    task: str | None = None,
    scale: int | None = None,
    tile: int | None = None,
    overlap: int = 32,
    explain: bool = False,
    planner: Planner = "rules",
    hidden: torch.Tensor | None = None,
    ensemble: bool = False,
) -> Restored:
    """Restore one image with an executor (see `fapecli.loader.load_model`).

    ``planner`` plans the image when neither ``plan`` nor ``task`` is given: "rules" or a
    loaded Qwen planner, whose hidden states condition executors that take them (the FLUX
    executor with a hidden-state projector). ``hidden`` passes such states directly. Tiles
    default to the executor's ``default_tile`` when it has one. ``ensemble`` averages the
    executor over flips and transpositions (`fapecli.execution.ensemble`): 2-8x slower, a
    little better.
    """
    from fapecli.execution.compact import prepare_input
    from fapecli.execution.ensemble import self_ensemble, transforms_for
    from fapecli.execution.tiling import restore_tiled

    start = time.perf_counter()
    planned = plan_with(image, plan=plan, task=task, scale=scale, planner=planner)
    plan, notes = planned.plan, planned.warnings
    if hidden is None and takes_hidden(model):
        hidden = planned.hidden
    if plan.task == NONE:
        return Restored(image.with_pixels(image.pixels), plan, time.perf_counter() - start,
                        skipped="clean", warnings=notes)
    expert = None
    if hasattr(model, "for_plan"):  # task experts: the plan picks the network
        chosen = model.for_plan(plan)
        expert = None if chosen is model.base else plan.task
        model = chosen
    x = prepare_input(_to_tensor(image.rgb, model), plan)
    tokens = model.plan_tokens(plan) if hidden is None else model.plan_tokens(plan, hidden)
    tile = tile or getattr(model, "default_tile", None)

    def run(t: torch.Tensor) -> torch.Tensor:
        return model(t, tokens=tokens)

    with torch.inference_mode():
        result = restore_tiled(
            self_ensemble(run, transforms_for(plan)) if ensemble else run,
            x,
            tile=tile,
            overlap=overlap,
            multiple=model.multiple,
        )
        out = result.image.clamp_(0, 1)[0].permute(1, 2, 0).numpy()  # a view, no copy
    _check(out, image.pixels, image.source)
    if image.is_grey:
        out = out.mean(axis=2, keepdims=True)
    restored = Restored(image.with_pixels(out), plan, time.perf_counter() - start,
                        tiles=result.tiles, expert=expert, warnings=notes)
    if explain:
        restored.routing, restored.routing_summary = routing_preview(model, x, tokens)
    return restored


def routing_preview(
    model: torch.nn.Module, x: torch.Tensor, tokens: torch.Tensor | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Where the high-band expert won: the share of MoE layers choosing it, per pixel.

    Computed on a preview whose long side is at most `EXPLAIN_SIZE` (the routing of a whole
    24-megapixel image would not fit in memory); each layer's choice map is resized to the
    preview and the maps are averaged.
    """
    import torch.nn.functional as F

    from fapecli.execution.moe import reset_routing_stats, routing_maps, routing_summary

    h, w = x.shape[-2:]
    s = min(1.0, EXPLAIN_SIZE / max(h, w))
    preview = F.interpolate(x, scale_factor=s, mode="area") if s < 1 else x
    reset_routing_stats(model)
    with torch.inference_mode():
        model(preview, tokens=tokens)
    size = preview.shape[-2:]
    maps = [
        F.interpolate(m[:1, None].float(), size=size, mode="nearest")[0, 0]
        for m in routing_maps(model).values()
        if m.dim() == 3
    ]
    share = torch.stack(maps).mean(0) if maps else torch.zeros(size)
    return share.cpu().numpy().astype(np.float32), routing_summary(model)


def restore_file(
    source: str | Path,
    target: str | Path,
    model: torch.nn.Module,
    *,
    plan: Plan | None = None,
    quality: int = 95,
    explain: bool = False,
    **options: Any,
) -> tuple[Restored, Path]:
    """Read `source`, restore it, write `target` atomically (and the routing map with explain)."""
    image = read_image(source)
    restored = restore_image(image, model, plan=plan, explain=explain, **options)
    written = write_image(restored.image, target, quality=quality)
    if restored.routing is not None and str(target) != "-":
        from fapecli.io import from_array

        routing_path = written.with_name(written.stem + ".routing.png")
        write_image(from_array((restored.routing * 255).round().astype(np.uint8)), routing_path)
    return restored, written
