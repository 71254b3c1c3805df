"""The one cached model loader: device and dtype resolution, and models by name.

Every command that needs a network (restore, score, plan with Qwen, train) goes through
`load_model`, so the device rule, the weight lookup and the cache live in one place.
Builders register per manifest ``kind``; a model is built once per (name, device, dtype)
and process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fapecli.errors import UsageError, WeightsError
from fapecli.weights import ModelEntry, get_model, locate

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
Builder = Callable[[ModelEntry, dict[str, Path], "torch.device", "torch.dtype"], Any]

_BUILDERS: dict[str, Builder] = {}
_CACHE: dict[tuple[str, str, str], Any] = {}
_LOCK = threading.Lock()


def resolve_device(spec: str | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, then Apple MPS, else the CPU; others are checked."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(
            f"--device {spec!r} is not a device (use auto, cpu, cuda, cuda:N or mps)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA GPU is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError("--device mps was asked for but Apple MPS is not available")
    elif device.type != "cpu":
        raise UsageError(f"--device {spec!r} is not supported (use auto, cpu, cuda, cuda:N or mps)")
    return device


def resolve_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA GPUs that support it (fp16 on older ones), fp32 elsewhere."""
    import torch

    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def register_builder(kind: str) -> Callable[[Builder], Builder]:
    """Decorator: ``@register_builder("executor")`` makes `load_model` able to build that kind."""

    def deco(fn: Builder) -> Builder:
        _BUILDERS[kind] = fn
        return fn

    return deco


def _ensure_builders() -> None:
    """Import the modules that register builders (lazily: they import torch and friends)."""
    import importlib

    modules = ("fapecli.execution.registry", "fapecli.scoring.metrics", "fapecli.planning.qwen")
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def path_kind(path: Path) -> str:
    """The builder kind of a model given as a path, from the files it holds."""
    if (path / "adapter_config.json").is_file() or path.name == "adapters.safetensors":
        return "flux-executor"  # trained FLUX adapters (fapecli.execution.flux)
    if (path / "transformer" / "config.json").is_file() and (path / "vae").is_dir():
        return "flux-base"  # a diffusers FLUX snapshot: transformer/ + vae/
    if _is_qwen_folder(path):
        return "planner"  # a transformers Qwen2.5-VL checkpoint (fapecli.planning.qwen)
    return "executor"


def _is_qwen_folder(path: Path) -> bool:
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "qwen2_5_vl"


def load_model(
    name: str | Path,
    *,
    device: str | torch.device | None = "auto",
    precision: str | torch.dtype | None = "auto",
) -> Any:
    """Build (once per process) the model `name` from weights.toml, or a model folder path.

    A path (a folder holding ``config.json`` + ``model.safetensors``, or the ``.safetensors``
    file itself) loads an executor checkpoint directly, bypassing the manifest; a folder of
    FLUX adapters or a FLUX base folder is recognised by its files (see `path_kind`).
    """
    import torch

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = precision if isinstance(precision, torch.dtype) else resolve_dtype(precision, dev)
    key = (str(name), str(dev), str(dtype))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        _ensure_builders()
        path = Path(name)
        if (
            isinstance(name, Path)
            or path.exists()
            or "/" in str(name)
            or str(name).endswith(".safetensors")
        ):
            if not path.exists():
                raise WeightsError("model path does not exist", path)
            entry = ModelEntry(name=str(path), kind=path_kind(path), source=str(path))
            files = {"": path}
        else:
            entry = get_model(str(name))
            files = locate(entry)
        builder = _BUILDERS.get(entry.kind)
        if builder is None:
            raise WeightsError(f"no loader for model kind {entry.kind!r} (model {entry.name!r})")
        model = builder(entry, files, dev, dtype)
        _CACHE[key] = model
        return model


def clear_cache() -> None:
    """Forget every loaded model (tests, or to free memory)."""
    with _LOCK:
        _CACHE.clear()
