"""Loader builders for executors: fape-s checkpoints (``kind = "executor"`` in weights.toml),
FLUX bases (``"flux-base"``) and trained FLUX adapters (``"flux-executor"``)."""

from __future__ import annotations

from pathlib import Path

import torch

from fapecli.errors import WeightsError, first_line
from fapecli.loader import register_builder
from fapecli.weights import ModelEntry


@register_builder("executor")
def build_executor(
    entry: ModelEntry, files: dict[str, Path], device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """A compact executor from its folder (config.json + model.safetensors) or weights file,
    with its task experts (`fapecli.execution.experts`): for a weights.toml model, those its
    file list names; for a folder given as a path, those on disk beside it."""
    from safetensors import SafetensorError

    from fapecli.execution.experts import expert_task, load_compact

    experts = {t: p.parent for name, p in files.items() if (t := expert_task(name))}
    weights = next((p for name, p in files.items()
                    if name.endswith(".safetensors") and not expert_task(name)), None)
    path = weights if weights is not None else next(iter(files.values()))
    try:
        return load_compact(path, experts=None if "" in files else experts, dtype=dtype,
                            device=device)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise WeightsError(f"cannot load executor {entry.name!r}: {first_line(exc)}",
                           path) from None


def _flux(entry: ModelEntry, device: torch.device, dtype: torch.dtype, **kw) -> torch.nn.Module:
    """Build a FLUX executor; one-line errors for unreadable configs or weights."""
    from fapecli.execution.flux_load import build_flux_executor as build

    try:
        return build(device=device, dtype=dtype, **kw)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise WeightsError(f"cannot load FLUX executor {entry.name!r}: {first_line(exc)}") from None


@register_builder("flux-base")
def build_flux_base(
    entry: ModelEntry, files: dict[str, Path], device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """A FLUX base (a weights.toml ``flux-base`` or a folder with transformer/ and vae/) with
    freshly initialised, untrained adapters: FLUX's own one-step reading, for smoke tests."""
    if "" in files:
        base: str | Path = files[""]
    else:
        base = entry.name
    return _flux(entry, device, dtype, base=base)


@register_builder("flux-executor")
def build_flux_adapters(
    entry: ModelEntry, files: dict[str, Path], device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """Trained FLUX adapters (adapter_config.json + adapters.safetensors) on their base."""
    from fapecli.execution.flux import ADAPTER_CONFIG

    folder = files[""] if "" in files else files[ADAPTER_CONFIG].parent
    return _flux(entry, device, dtype, adapters=folder)
