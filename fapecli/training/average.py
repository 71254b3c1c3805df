"""Weight averages of exported models (a "model soup" of stages fine-tuned from one parent).

:func:`mean_tensor` is the arithmetic shared by ``model.warm_start=A,B`` (average, then
train on) and :func:`average_models` (`fape weights average`: write the average itself as a
model folder). Means are taken in float64 and stored back in each tensor's own dtype, so an
average of float16 models is a float16 model of the same size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import torch

from fapecli.errors import FapeError, UsageError
from fapecli.execution.compact import CONFIG_NAME, WEIGHTS_NAME, FapeS, FapeSConfig

_MODEL_FILES = (WEIGHTS_NAME, CONFIG_NAME)  # all that a replaceable output folder may hold


def weights_file(source: str | Path, what: str = "model") -> Path:
    """The safetensors file of a model folder (or the file itself); a clear error if absent."""
    path = Path(source)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"{what}: no model weights here", str(file))
    return file


def check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Mixing weights for ``count`` models: 1 each by default, else finite, non-negative and
    not all zero (``0.3,0.7`` and ``3,7`` are the same mix)."""
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise UsageError(f"{len(weights)} weights for {count} models")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise UsageError("weights must be finite, non-negative and not all zero")
    return [float(w) for w in weights]


def mean_tensor(values: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weighted mean ``sum(w v) / sum(w)`` of same-shaped tensors in float64, cast to
    ``dtype`` (default: the first tensor's). Integer tensors (counters, indices) must agree
    and are kept as they are."""
    first = values[0]
    if not first.is_floating_point():
        if any(not torch.equal(v, first) for v in values[1:]):
            raise ValueError("integer tensors differ between the models")
        return first.clone()
    mix = check_weights(weights, len(values))
    total = sum(w * v.double() for w, v in zip(mix, values, strict=True))
    return (total / sum(mix)).to(dtype or first.dtype)


def average_models(sources: Sequence[str | Path], out: str | Path, *,
                   weights: Sequence[float] | None = None, overwrite: bool = False) -> Path:
    """Write the (weighted) average of model folders ``sources`` to the folder ``out``.

    The models must hold the same tensors with the same shapes, and their ``config.json`` must
    agree on everything but ``extra`` and ``torch_dtype`` (see :func:`_comparable`). ``out``
    gets their ``config.json`` with ``extra.average_of`` listing each source (its path, share
    of the mix and training record), and a ``model.safetensors`` whose metadata carries that
    config, like ``save_pretrained``. The folder is written under a temporary name beside
    ``out`` and renamed into place. ``out`` may not be one of the sources; an existing ``out``
    is replaced only with ``overwrite``, and only when it holds nothing but a model's two
    files.
    """
    from safetensors import safe_open

    if len(sources) < 2:
        raise UsageError("averaging needs at least two models")
    mix = check_weights(weights, len(sources))
    files = [weights_file(s) for s in sources]
    target = Path(out)
    if any(target.resolve() in (f.resolve(), f.parent.resolve()) for f in files):
        raise UsageError("the output would overwrite one of the models averaged", str(target))
    if target.exists():
        if not overwrite:
            raise UsageError("already exists (--overwrite replaces it)", str(target))
        if not target.is_dir():
            raise UsageError("exists and is not a folder", str(target))
        foreign = sorted(p.name for p in target.iterdir() if p.name not in _MODEL_FILES)
        if foreign:
            raise UsageError(f"holds more than a model ({', '.join(foreign[:3])}); "
                             "not replacing it", str(target))

    configs = [_read_config(f) for f in files]
    core = [_comparable(c) for c in configs]
    for file, c in zip(files[1:], core[1:], strict=True):
        if c != core[0]:
            if not c or not core[0]:
                raise UsageError(f"only one of it and {files[0]} has a {CONFIG_NAME}", str(file))
            diff = sorted(k for k in set(c) | set(core[0]) if c.get(k) != core[0].get(k))
            more = ", ..." if len(diff) > 4 else ""
            raise UsageError(f"config differs from {files[0]} in {', '.join(diff[:4])}{more}",
                             str(file))

    states = [load_weights(f) for f in files]
    for file, state in zip(files[1:], states[1:], strict=True):
        _check_same_tensors(states[0], state, file, files[0])
    averaged = {}
    for name in states[0]:
        values = [s[name] for s in states]
        try:
            averaged[name] = mean_tensor(values, mix).contiguous()
        except ValueError as exc:
            odd = next(f for f, v in zip(files, values, strict=True)
                       if not torch.equal(v, values[0]))
            raise UsageError(f"{name}: {exc}", str(odd)) from None

    config: dict[str, Any] = dict(configs[0])
    with safe_open(str(files[0]), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    metadata.pop("config", None)  # the first model's own; the average gets its own below
    if config:
        config["extra"] = {"average_of": [
            {"model": str(src), "weight": w / sum(mix), **_provenance(c)}
            for src, w, c in zip(sources, mix, configs, strict=True)]}
        metadata["config"] = json.dumps(config, indent=2)
    _write_folder(target, averaged, metadata, config)
    return target


def _write_folder(target: Path, state: dict[str, torch.Tensor], metadata: dict[str, str],
                  config: dict[str, Any]) -> None:
    """Write the model folder under a temporary name beside ``target``, then swap it in (an
    existing ``target`` is moved aside first and removed once the new one is in place)."""
    from safetensors.torch import save_file

    tmp = old = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a model folder is not
        save_file(state, str(tmp / WEIGHTS_NAME), metadata=metadata or None)
        if config:
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if target.exists():
            old = target.with_name(f"{tmp.name}.old")
            os.replace(target, old)
        os.replace(tmp, target)
    except OSError as exc:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)  # put the previous model back
        raise FapeError(f"cannot write the average: {exc.strerror or exc}", str(target)) from None
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def load_weights(file: Path, what: str = "") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; an unreadable file is a one-line UsageError (prefixed
    with ``what``, the option that named it, when given)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (OSError, SafetensorError) as exc:
        prefix = f"{what}: " if what else ""
        raise UsageError(f"{prefix}not a readable safetensors file ({exc})", str(file)) from None


def _read_config(weights: Path) -> dict[str, Any]:
    """The model's config.json beside its weights ({} when there is none)."""
    file = weights.parent / CONFIG_NAME
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"unreadable config: {exc}", str(file)) from None


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config without ``extra`` and ``torch_dtype`` (the average takes the first model's); a
    compact executor's gets the defaults of fields added after it was saved (v15 has no
    ``head_channels``; its fine-tunes write ``head_channels: 0``)."""
    core = {k: v for k, v in config.items() if k not in ("extra", "torch_dtype")}
    if core.get("_class_name") != FapeS.__name__:
        return core
    defaults = {f.name: f.default for f in fields(FapeSConfig) if f.default is not MISSING}
    return json.loads(json.dumps(defaults)) | core  # tuples as the lists config.json holds


def _provenance(config: dict[str, Any]) -> dict[str, Any]:
    """What a source's config records of how it was made (training run or earlier average)."""
    extra = config.get("extra")
    if not isinstance(extra, dict):
        return {}
    return dict(extra["training"]) if isinstance(extra.get("training"), dict) else dict(extra)


def _check_same_tensors(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
                        file: Path, ref_file: Path) -> None:
    missing, extra = sorted(set(ref) - set(other)), sorted(set(other) - set(ref))
    if missing or extra:
        names = ", ".join((missing + extra)[:3])
        raise UsageError(f"holds different tensors from {ref_file} ({names}, ...)", str(file))
    for name, tensor in ref.items():
        if other[name].shape != tensor.shape:
            raise UsageError(f"{name} has shape {tuple(other[name].shape)}, "
                             f"not {tuple(tensor.shape)} as in {ref_file}", str(file))
