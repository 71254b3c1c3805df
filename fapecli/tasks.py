"""The task vocabulary shared by planners, executors, degradations and benchmarks.

One place for each name: a restoration *task* (what the executor does), the *degradation*
that calls for it (what `fape degrade` synthesises), its frequency *band* (the expert rule
of FAPE-IR: streaks, flakes, grain, blur and missing resolution live in the high band; haze
and under-exposure are global, slowly varying corrections in the low band), and the token the
FAPE-IR planner writes for it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str  # restoration task, e.g. "derain"
    degradation: str  # what is wrong, e.g. "rain"
    band: str  # "high" or "low"
    token: str  # FAPE-IR planner token, e.g. "deraining"
    title: str  # human readable


TASKS: tuple[Task, ...] = (
    Task("derain", "rain", "high", "deraining", "rain streak removal"),
    Task("desnow", "snow", "high", "desnowing", "snow removal"),
    Task("dehaze", "haze", "low", "dehazing", "haze removal"),
    Task("deblur", "blur", "high", "deblur", "deblurring"),
    Task("denoise", "noise", "high", "denoise", "denoising"),
    Task("lowlight", "lowlight", "low", "light_enhancement", "low-light enhancement"),
    Task("sr", "lowres", "high", "super_resolution", "super-resolution"),
)

NONE = "none"
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
DEGRADATIONS: tuple[str, ...] = tuple(t.degradation for t in TASKS)
BANDS: tuple[str, ...] = ("high", "low")

_BY_ANY: dict[str, Task] = {}
for _t in TASKS:
    for _alias in (_t.name, _t.degradation, _t.token):
        _BY_ANY[_alias] = _t
_EXTRA_ALIASES = {
    "deraining": "derain",
    "desnowing": "desnow",
    "dehazing": "dehaze",
    "deblurring": "deblur",
    "denoising": "denoise",
    "low_light": "lowlight",
    "low-light": "lowlight",
    "light_enhancement": "lowlight",
    "enhancement": "lowlight",
    "super_resolution": "sr",
    "super-resolution": "sr",
    "superresolution": "sr",
    "upscale": "sr",
    "upscaling": "sr",
}
for _alias, _name in _EXTRA_ALIASES.items():
    _BY_ANY[_alias] = next(t for t in TASKS if t.name == _name)


def get_task(name: str) -> Task:
    """Look a task up by its name, degradation, FAPE-IR token or a common alias."""
    key = name.strip().lower().replace(" ", "_")
    if key in _BY_ANY:
        return _BY_ANY[key]
    raise KeyError(f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}")


def normalize_task(name: str) -> str:
    """Canonical task name for any alias; "none" (or "clean") stays "none"."""
    key = name.strip().lower()
    if key in (NONE, "clean", "nothing"):
        return NONE
    return get_task(key).name


def band_of(task: str) -> str:
    """Frequency band of a task by the expert rule ("none" for a clean image)."""
    return NONE if task == NONE else get_task(task).band
