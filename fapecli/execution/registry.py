"""Loader builders for executor checkpoints (``kind = "executor"`` in weights.toml)."""

from __future__ import annotations

from pathlib import Path

import torch

from fapecli.errors import WeightsError
from fapecli.loader import register_builder
from fapecli.weights import ModelEntry


@register_builder("executor")
def build_executor(
    entry: ModelEntry, files: dict[str, Path], device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """A compact executor from its folder (config.json + model.safetensors) or weights file."""
    from fapecli.execution.compact import FapeS

    weights = next((p for name, p in files.items() if name.endswith(".safetensors")), None)
    path = weights if weights is not None else next(iter(files.values()))
    try:
        return FapeS.from_pretrained(path, dtype=dtype, device=device)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"cannot load executor {entry.name!r}: {first}", path) from None
