"""Task experts: fine-tuned copies of a compact executor that a single-task plan routes to.

One network shares its capacity across seven tasks, so a stage that gains on one task pays on
another. A task expert is the same network fine-tuned on its task alone (``fape train`` warm-
started from the base with ``'data.mix={noise=1}' data.mixture_prob=0``: ``data.mix`` is keyed
by degradation); :class:`TaskExperts` routes each image by its plan: the expert of the plan's
task when the plan names that task alone, the base model otherwise (mixtures, other tasks, no
plan). This is the plan-driven routing of the LoRA-MoE taken to whole networks: hard, per
image, and decided by the planner.

On disk an expert lives beside its base as ``experts/<task>/`` (``config.json`` +
``model.safetensors``), so a model folder with experts still loads, and trains, as its base.
A model in weights.toml has exactly the experts its file list names (each checked like any
other file); a model folder given as a path has those found on disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fapecli.errors import WeightsError, first_line
from fapecli.execution.compact import WEIGHTS_NAME, FapeS, FapeSConfig
from fapecli.planning.plan import Plan
from fapecli.tasks import TASK_NAMES

EXPERTS_DIR = "experts"


class TaskExperts(nn.Module):
    """A base compact executor and task experts; :meth:`for_plan` picks the network.

    Everything else (``forward``, ``plan_tokens``, ``multiple``, ``restore`` without a plan)
    is the base's, so code that knows nothing of experts gets the base model.
    """

    executor_kind = "compact"

    def __init__(self, base: FapeS, experts: Mapping[str, FapeS]) -> None:
        super().__init__()
        unknown = sorted(set(experts) - set(TASK_NAMES))
        if unknown:
            raise ValueError(f"no such task for an expert: {', '.join(unknown)}")
        self.base = base
        self.experts = nn.ModuleDict(dict(experts))

    def for_plan(self, plan: Plan | None) -> FapeS:
        """The expert of a single-task plan's task when there is one, else the base."""
        if plan is None or plan.secondary or plan.task not in self.experts:
            return self.base
        return self.experts[plan.task]

    def forward(self, x: torch.Tensor, plans: Plan | list[Plan] | None = None, *,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        """One plan: its network (:meth:`for_plan`); a batch of plans or tokens: the base."""
        net = self.for_plan(plans) if isinstance(plans, Plan) else self.base
        return net(x, plans, tokens=tokens)

    def plan_tokens(self, plans: Plan | list[Plan] | None) -> torch.Tensor | None:
        return self.base.plan_tokens(plans)

    @torch.no_grad()
    def restore(self, image: torch.Tensor, plan: Plan | None = None, **kw: Any) -> torch.Tensor:
        return self.for_plan(plan).restore(image, plan, **kw)

    @property
    def config(self) -> FapeSConfig:
        return self.base.config

    @property
    def multiple(self) -> int:
        return self.base.multiple

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def bytes_per_pixel(self) -> float:
        return self.base.bytes_per_pixel


def expert_task(name: str | Path) -> str | None:
    """The task of an expert's weights file named ``.../experts/<task>/model.safetensors``."""
    parts = Path(name).parts
    if len(parts) >= 3 and parts[-3] == EXPERTS_DIR and parts[-1] == WEIGHTS_NAME:
        return parts[-2]
    return None


def expert_folders(model_dir: Path) -> dict[str, Path]:
    """``experts/<task>/`` folders holding weights beside a model, keyed by task name
    (hidden folders, such as ``.ipynb_checkpoints``, and ``__pycache__`` are skipped)."""
    root = model_dir / EXPERTS_DIR
    if not root.is_dir():
        return {}
    found = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name.startswith((".", "__")):
            continue
        if not (folder / WEIGHTS_NAME).is_file():
            raise WeightsError(f"expert without {WEIGHTS_NAME}", folder)
        found[folder.name] = folder
    return found


def load_compact(path: str | Path, *, experts: Mapping[str, Path] | None = None,
                 dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> FapeS | TaskExperts:
    """A compact executor from a folder or weights file, with task experts: ``experts``
    (task -> folder) when given, else those found beside the weights (:func:`expert_folders`).
    """
    from safetensors import SafetensorError

    p = Path(path)
    base = FapeS.from_pretrained(p, dtype=dtype, device=device)
    folders = dict(experts) if experts is not None else expert_folders(
        p if p.is_dir() else p.parent)
    if not folders:
        return base
    loaded = {}
    for task, folder in sorted(folders.items()):
        if task not in TASK_NAMES:
            raise WeightsError(f"an expert folder must be named after a task "
                               f"({', '.join(TASK_NAMES)})", folder)
        try:
            loaded[task] = FapeS.from_pretrained(folder, dtype=dtype, device=device)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
            raise WeightsError(f"cannot load the {task} expert: {first_line(exc)}",
                               folder) from None
    return TaskExperts(base, loaded).eval()


__all__ = ["EXPERTS_DIR", "TaskExperts", "expert_folders", "expert_task", "load_compact"]
