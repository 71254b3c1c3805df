"""Plan tokens: a plan compiled into a few learnable vectors for the executor's routers.

FAPE-IR encodes the planner's decision into "understanding tokens"; the compact executor uses a
small learnable encoder instead: embeddings of the task (7 tasks + none) and of the band
(high/low/none), plus the plan's normalised feature-pool evidence (per-task ``scores`` in
``TASK_NAMES`` order, and the super-resolution factor) and a multi-hot of ``plan.tasks`` (the
dominant task and the secondary ones), each projected linearly. That makes M = 4 tokens of
width ``dim``, each with a learnable token-type offset, layer-normalised. The encoder lives
inside the model, so its weights are saved with it. A forced task (``--task``) is simply a plan
with that task (:func:`plan_for_task`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fapecli.planning.plan import Plan
from fapecli.tasks import BANDS, NONE, TASK_NAMES, band_of, normalize_task

TASK_VOCAB: tuple[str, ...] = (*TASK_NAMES, NONE)  # 8 task ids
BAND_VOCAB: tuple[str, ...] = (*BANDS, NONE)  # 3 band ids
NUM_PLAN_TOKENS = 4  # task, band, scores (+ scale), multi-hot tasks
MAX_LOG2_SCALE = 3.0  # x8 super-resolution maps to 1.0


def plan_for_task(task: str, scale: int | None = None) -> Plan:
    """The plan a forced ``--task`` stands for (full evidence for that task)."""
    name = normalize_task(task)
    scores = {} if name == NONE else {name: 1.0}
    return Plan(task=name, band=band_of(name), scores=scores,
                scale=scale if name == "sr" else None)


def plan_features(plans: Sequence[Plan]) -> dict[str, torch.Tensor]:
    """Plain tensors from plans: ``task`` and ``band`` ids (B,), ``scores`` (B, 8) and
    ``tasks`` multi-hot (B, 7). Scores are clamped to [0, 1] (missing = 0); the eighth score
    column is log2 of the super-resolution factor / 3 (0 when not SR)."""
    n = len(TASK_NAMES)
    task_ids, band_ids = [], []
    scores = torch.zeros(len(plans), n + 1)
    multi = torch.zeros(len(plans), n)
    for i, p in enumerate(plans):
        task_ids.append(TASK_VOCAB.index(p.task))
        band_ids.append(BAND_VOCAB.index(p.band if p.task != NONE else NONE))
        for j, name in enumerate(TASK_NAMES):
            v = float(p.scores.get(name, 0.0) or 0.0)
            scores[i, j] = min(1.0, max(0.0, v)) if math.isfinite(v) else 0.0
        if "sr" in p.tasks and p.scale and p.scale > 1:
            scores[i, n] = min(1.0, math.log2(p.scale) / MAX_LOG2_SCALE)
        for t in p.tasks:
            multi[i, TASK_NAMES.index(t)] = 1.0
    return {"task": torch.tensor(task_ids, dtype=torch.long),
            "band": torch.tensor(band_ids, dtype=torch.long), "scores": scores, "tasks": multi}


class PlanEncoder(nn.Module):
    """Plans -> plan tokens (B x M x dim), M = :data:`NUM_PLAN_TOKENS`."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.dim = dim
        self.task = nn.Embedding(len(TASK_VOCAB), dim)
        self.band = nn.Embedding(len(BAND_VOCAB), dim)
        self.scores = nn.Linear(len(TASK_NAMES) + 1, dim)
        self.tasks = nn.Linear(len(TASK_NAMES), dim)
        self.token_type = nn.Parameter(torch.zeros(NUM_PLAN_TOKENS, dim))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.task.weight, std=1.0)
        nn.init.normal_(self.band.weight, std=1.0)
        nn.init.normal_(self.token_type, std=0.02)

    def forward(self, plans: Plan | Sequence[Plan]) -> torch.Tensor:
        plans = [plans] if isinstance(plans, Plan) else list(plans)
        if not plans:
            raise ValueError("need at least one plan")
        ref = self.task.weight
        f = {k: v.to(ref.device) for k, v in plan_features(plans).items()}
        tokens = torch.stack(
            [
                self.task(f["task"]),
                self.band(f["band"]),
                self.scores(f["scores"].to(ref.dtype)),
                self.tasks(f["tasks"].to(ref.dtype)),
            ],
            1,
        )
        return self.norm(tokens + self.token_type)


def plan_tokens(plans: Plan | Sequence[Plan], encoder: PlanEncoder) -> torch.Tensor:
    """Plan tokens (B x M x d_t) of ``plans`` under ``encoder`` (the model's own encoder)."""
    return encoder(plans)
