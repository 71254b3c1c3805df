"""The Plan: the interface between any planner (rules, Qwen) and any executor.

A plan is the FAPE-IR tuple (task, band, pipeline, rationale) plus what the rule planner
measured to reach it. It serialises to JSON (for `fape plan --json` and `fape restore --plan`)
and to the paper's one-line form ``Task: ..., Focus: ..., Rationale: ..., Pipeline: a -> b``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from fapecli.tasks import BANDS, NONE, band_of, get_task, normalize_task

PLAN_SCHEMA_VERSION = 1


@dataclass
class Plan:
    """What is wrong with an image, which frequency band to work in, and how to fix it."""

    task: str  # a name from fapecli.tasks.TASK_NAMES, or "none" for a clean image
    band: str  # "high", "low", or "none" when task is "none"
    pipeline: list[str] = field(default_factory=list)  # ordered restoration steps
    rationale: str = ""  # one sentence citing the measured cues
    scores: dict[str, float] = field(default_factory=dict)  # per-task evidence in [0, 1]
    secondary: list[str] = field(default_factory=list)  # further tasks for a mixture
    features: dict[str, float] = field(default_factory=dict)  # raw feature-pool values
    source: str = "rules"  # which planner produced it: "rules" or "qwen"
    raw: str | None = None  # the planner's raw answer, when it was a language model
    # why a language-model planner's answer was not used (the plan is then the rule plan)
    fallback: str | None = None
    scale: int | None = None  # super-resolution factor, when task is "sr"

    def __post_init__(self) -> None:
        self.task = normalize_task(self.task)
        if self.band not in (*BANDS, NONE):
            raise ValueError(f"band must be high, low or none, not {self.band!r}")
        self.secondary = [normalize_task(t) for t in self.secondary]

    @property
    def tasks(self) -> list[str]:
        """The dominant task followed by the secondary ones (empty for a clean image)."""
        return [] if self.task == NONE else [self.task, *self.secondary]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema"] = PLAN_SCHEMA_VERSION
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "task" not in kwargs:
            raise ValueError("a plan needs a 'task'")
        kwargs.setdefault("band", band_of(normalize_task(kwargs["task"])))
        return cls(**kwargs)

    def to_line(self) -> str:
        """The FAPE-IR planner's one-line answer form."""
        token = NONE if self.task == NONE else get_task(self.task).token
        rationale = self.rationale.replace(",", ";")
        return (
            f"Task: {token}, Focus: {self.band}, Rationale: {rationale}, "
            f"Pipeline: {' -> '.join(self.pipeline)}"
        )

    @classmethod
    def from_line(cls, line: str, source: str = "rules") -> Plan:
        """Parse the one-line form; raises ValueError when no known task can be read."""
        fields = parse_line(line)
        if "task" not in fields:
            raise ValueError(f"no 'Task:' field in {line!r}")
        task = normalize_task(fields["task"])
        band = fields.get("focus", "").lower()
        if band not in BANDS:
            band = band_of(task)
        pipeline = [s.strip() for s in re.split(r"\s*(?:->|→|=>)\s*", fields.get("pipeline", ""))]
        return cls(
            task=task,
            band=NONE if task == NONE else band,
            pipeline=[s for s in pipeline if s],
            rationale=fields.get("rationale", ""),
            source=source,
            raw=line,
        )


_FIELD_RE = re.compile(r"\b(task|focus|rationale|pipeline)\s*[:=]\s*", re.IGNORECASE)


def parse_line(text: str) -> dict[str, str]:
    """Split ``Task: a, Focus: b, Rationale: c, Pipeline: d`` into lower-cased keys.

    Tolerates any field order, case, extra text before or after, and missing fields.
    """
    matches = list(_FIELD_RE.finditer(text))
    out: dict[str, str] = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        value = text[m.end() : end].strip().strip(",;").strip()
        key = m.group(1).lower()
        if key not in out:
            out[key] = value.splitlines()[0].strip() if key != "rationale" else value
    if "task" in out:
        out["task"] = re.split(r"[\s,;.]", out["task"].strip("*`'\" "), maxsplit=1)[0]
    if "focus" in out:
        out["focus"] = re.split(r"[\s,;.]", out["focus"].strip("*`'\" "), maxsplit=1)[0]
    return out
