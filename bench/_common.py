"""Shared helpers of the benchmark scripts: thread limits, the model's files, the machine,
Markdown tables."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class BenchError(Exception):
    """A problem the user can fix (missing model, data folder, ...): one line, exit 2."""


def limit_threads(n: int) -> None:
    """Run torch, OpenCV and BLAS on ``n`` threads (env vars for children, setters here)."""
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    import cv2
    import torch

    torch.set_num_threads(n)
    cv2.setNumThreads(n)


@dataclass(frozen=True)
class ModelRef:
    """The model a benchmark runs: what the user named and where its weights are."""

    name: str  # as given (a manifest name or a folder)
    weights: Path  # the .safetensors file
    sha256: str
    experts: dict[str, str] = field(default_factory=dict)  # task expert -> its sha256
    expert_weights: dict[str, Path] = field(default_factory=dict)  # task expert -> its file

    @property
    def label(self) -> str:
        path = Path(self.name)
        return path.name if path.exists() else self.name


def resolve_model(name: str) -> ModelRef:
    """Find a model's weights (a manifest name or a checkpoint folder) or raise BenchError."""
    from fapecli.errors import WeightsError
    from fapecli.execution.experts import expert_folders, expert_task
    from fapecli.weights import get_model, locate, sha256_file

    path = Path(name)
    hint = ("pass --model DIR, a checkpoint folder holding config.json + model.safetensors "
            "(e.g. written by `fape train` or FapeS.save_pretrained)")
    if path.exists() or "/" in name or name.endswith(".safetensors"):
        weights = path / "model.safetensors" if path.is_dir() else path
        if not weights.is_file():
            raise BenchError(f"model {name!r}: no weights at {weights}; {hint}")
        try:  # a folder: the experts on disk beside it
            listed = {t: f / "model.safetensors" for t, f in expert_folders(weights.parent).items()}
        except WeightsError as exc:
            raise BenchError(f"model {name!r}: {exc}") from None
    else:
        try:
            files = locate(get_model(name))
        except WeightsError as exc:
            raise BenchError(f"model {name!r} is not available ({exc}); {hint}") from None
        found = [p for rel, p in files.items()
                 if rel.endswith(".safetensors") and not expert_task(rel)]
        if not found:
            raise BenchError(f"model {name!r} has no .safetensors file in weights.toml; {hint}")
        weights = found[0]
        listed = {t: p for rel, p in files.items() if (t := expert_task(rel))}  # as listed
    listed = dict(sorted(listed.items()))
    experts = {t: sha256_file(f) for t, f in listed.items()}
    return ModelRef(name, weights, sha256_file(weights), experts, listed)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, object]:
    """Facts about the machine and software a result depends on."""
    import cv2
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "nproc": usable,
        "cpu": cpu_model(),
        "load_average": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opencv": cv2.__version__,
        "platform": platform.platform(),
    }


def command_line() -> str:
    """How this script was run, as a shell line relative to the repository."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(REPO))
    except ValueError:
        shown = str(script)
    return shlex.join([".venv/bin/python", shown, *sys.argv[1:]])


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table (numbers already formatted by the caller)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table, "–" when missing."""
    if value is None:
        return "–"
    return f"{value:.{digits}f}"
