"""Memory and cost guards: refuse, before loading, a model the device cannot hold.

Large models (the FLUX executor, a Qwen planner) are checked before a single weight is read:
parameters are counted from the safetensors headers (or, without weight files, from a model
built on the ``meta`` device from its ``config.json``), multiplied by the bytes per parameter
of the chosen precision, an activation margin is added, and the sum is compared with the free
memory of the device (``torch.cuda.mem_get_info`` on CUDA, available RAM on the CPU). On the
CPU, models above :data:`CPU_PARAM_LIMIT` parameters are refused outright (they would thrash
or take minutes per image) unless ``$FAPE_ALLOW_LARGE_CPU=1`` or ``allow_large_cpu=True``.

Every refusal is one line with the numbers::

    flux.1-dev needs ~27.4 GiB at bf16 (11.90 B params = 22.2 GiB weights + 5.2 GiB
    activations) but cuda:0 has 20.0 GiB free; ...
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from fapecli.errors import FapeError

GIB = float(2**30)
CPU_PARAM_LIMIT = 2_000_000_000  # above this, the CPU path refuses unless overridden
ENV_ALLOW_LARGE_CPU = "FAPE_ALLOW_LARGE_CPU"
ENV_SKIP_GUARD = "FAPE_SKIP_MEMORY_CHECK"  # skip the free-memory comparison (not the CPU limit)

_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                      "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class MemoryGuardError(FapeError):
    """The model would not fit (or is too large for the CPU): a one-line error before loading."""


@dataclass(frozen=True)
class Estimate:
    """What a model needs: its parameters at a precision, plus working memory."""

    what: str  # a name for messages ("flux.1-dev", "qwen2.5-vl-7b")
    params: int
    dtype: torch.dtype
    activation_bytes: float = 0.0
    extra_bytes: float = 0.0  # adapters; in training their gradients, optimiser state, EMA

    @property
    def weight_bytes(self) -> float:
        return self.params * bytes_per_param(self.dtype)

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes + self.extra_bytes


def describe(parts: list[Estimate]) -> str:
    """``~27.4 GiB at bf16 (11.90 B params = 22.2 GiB weights + 5.2 GiB activations)``."""
    weights = sum(p.weight_bytes for p in parts)
    extra = sum(p.extra_bytes for p in parts)
    act = sum(p.activation_bytes for p in parts)
    terms = [f"{gib(weights)} weights"]
    terms += [f"{gib(extra)} adapters (+ training state)"] if extra else []
    terms += [f"{gib(act)} activations"] if act else []
    dtypes = "/".join(dict.fromkeys(dtype_name(p.dtype) for p in parts))
    return (f"~{gib(weights + extra + act)} at {dtypes} "
            f"({params_text(sum(p.params for p in parts))} params = {' + '.join(terms)})")


def gib(n: float) -> str:
    """Bytes as GiB (MiB below 0.1 GiB)."""
    return f"{n / GIB:.1f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.1f} MiB"


def params_text(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).removeprefix("torch."))


def bytes_per_param(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).bits / 8 if dtype.is_floating_point else torch.iinfo(dtype).bits / 8


# ------------------------------------------------------------------------------ counting
def safetensors_params(path: str | Path) -> int:
    """Number of elements in a .safetensors file, read from its JSON header only."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for d in info["shape"]:
            n *= int(d)
        total += n
    return total


def folder_params(folder: str | Path, model_class: type | None = None) -> int:
    """Parameters of a diffusers/transformers model folder: the safetensors headers when weight
    files are there, else a ``meta``-device model built from ``config.json`` by ``model_class``.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return sum(safetensors_params(f) for f in files)
    config = folder / "config.json"
    if model_class is None or not config.is_file():
        raise FileNotFoundError(f"no .safetensors files and no config.json in {folder}")
    return config_params(json.loads(config.read_text(encoding="utf-8")), model_class)


def config_params(config: dict, model_class: type) -> int:
    """Parameters of ``model_class.from_config(config)`` built on the meta device (no memory)."""
    with torch.device("meta"):
        if hasattr(model_class, "from_config"):
            model = model_class.from_config(config)
        else:
            model = model_class(**config)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- available
def available_bytes(device: torch.device | str) -> tuple[float, str]:
    """Free memory on ``device`` and how it was measured (for the message)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        name = f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"
        return float(free), f"{name} has {gib(free)} free"
    return float(_available_ram()), f"the machine has {gib(_available_ram())} of RAM available"


def _available_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------- guard
def check_fits(
    estimate: Estimate | Iterable[Estimate],
    device: torch.device | str,
    *,
    allow_large_cpu: bool | None = None,
    available: float | None = None,
    cpu_param_limit: int = CPU_PARAM_LIMIT,
) -> float:
    """Raise :class:`MemoryGuardError` unless ``estimate`` fits on ``device``; return its bytes.

    Several estimates (a transformer and its VAE) are summed and named together. ``available``
    replaces the measured free memory (tests, or a budget of your own). The CPU refuses more
    than ``cpu_param_limit`` parameters unless ``allow_large_cpu`` (default:
    ``$FAPE_ALLOW_LARGE_CPU``); ``$FAPE_SKIP_MEMORY_CHECK=1`` skips the free-memory test.
    """
    parts = [estimate] if isinstance(estimate, Estimate) else list(estimate)
    what = " + ".join(p.what for p in parts)
    params = sum(p.params for p in parts)
    need = sum(p.total_bytes for p in parts)  # per-part dtypes may differ
    dev = torch.device(device)
    allow = _env_true(ENV_ALLOW_LARGE_CPU) if allow_large_cpu is None else allow_large_cpu
    if dev.type == "cpu" and params > cpu_param_limit and not allow:
        raise MemoryGuardError(
            f"{what} has {params_text(params)} parameters, too many for the CPU (limit "
            f"{params_text(cpu_param_limit)}; it would need {gib(need)} of RAM and minutes per "
            f"image): use a CUDA GPU (--device cuda), or set {ENV_ALLOW_LARGE_CPU}=1 to try anyway"
        )
    if available is None and _env_true(ENV_SKIP_GUARD):
        return need
    if available is None:
        free, where = available_bytes(dev)
    else:
        free, where = float(available), f"{dev} has {gib(available)} available"
    if need > free:
        raise MemoryGuardError(
            f"{what} needs {describe(parts)} but {where}: use a GPU with more memory, a "
            f"smaller --tile or fewer models at once (or set {ENV_SKIP_GUARD}=1 if the "
            f"estimate is wrong)"
        )
    return need


__all__ = [
    "CPU_PARAM_LIMIT", "ENV_ALLOW_LARGE_CPU", "ENV_SKIP_GUARD", "Estimate", "MemoryGuardError",
    "available_bytes", "bytes_per_param", "check_fits", "config_params", "describe",
    "folder_params",
    "safetensors_params",
]
