"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint is a folder ``<out_dir>/checkpoints/step-0001000/``::

    model/                       generator weights (``save_pretrained``: config.json + weights;
                                 the FLUX executor writes only its adapters)
    ema/                         EMA generator weights, same layout (usable by ``fape restore``)
    discriminator.safetensors    discriminator weights (a frozen backbone is left out)
    training_state.safetensors   optimiser state tensors and RNG states
    training_state.json          step, config, optimiser/scheduler scalars, RNG states, sampler

Optimiser and scheduler ``state_dict()`` trees are stored by :func:`encode`: tensors become
``{"__tensor__": key}`` references into the safetensors file, tuples and non-string dict keys
are tagged, floats are written by ``repr`` (exact). Saving writes ``step-N.tmp`` and renames
it, so an interrupted save never looks like a checkpoint. Together with the per-sample data
seeding of :mod:`fapecli.training.data`, resuming reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "model.safetensors"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
DISC = "discriminator.safetensors"
PREFIX = "step-"


# ---------------------------------------------------------------------------- encoding
def encode(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """A JSON-able tree from ``obj``; tensors are moved into ``tensors`` under unique keys."""
    if torch.is_tensor(obj):
        name = f"{key}#{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors, f"{key}.k"), encode(v, tensors, f"{key}.{k}")]
                              for k, v in obj.items()]}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {key} in a checkpoint")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA generator states."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ------------------------------------------------------------------------------ modules
def save_module(module: nn.Module, folder: Path) -> None:
    """``save_pretrained`` (config + weights) when the module has it, else bare weights."""
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))


def load_module(module: nn.Module, folder: Path) -> None:
    if hasattr(module, "load_adapters"):  # executors that save only their adapters (FLUX)
        module.load_adapters(folder)
        return
    state = load_file(str(folder / WEIGHTS))
    ref = module.state_dict()
    state = {k: v.to(dtype=ref[k].dtype) if k in ref else v for k, v in state.items()}
    module.load_state_dict(state, strict=True)


# -------------------------------------------------------------------------- checkpoints
def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"{PREFIX}{step:07d}"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``out_dir/checkpoints``, or None."""
    root = Path(out_dir) / "checkpoints"
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (p / STATE_JSON).is_file()
             and p.name[len(PREFIX):].isdigit()]
    return max(found, key=lambda p: int(p.name[len(PREFIX):])) if found else None


def save_checkpoint(
    folder: str | Path,
    *,
    model: nn.Module,
    ema: nn.Module | None = None,
    disc: nn.Module | None = None,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    schedulers: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder (atomically: ``.tmp`` then rename); returns its path."""
    final = Path(folder)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_module(model, tmp / "model")
    if ema is not None:
        save_module(ema, tmp / "ema")
    if disc is not None:
        dstate = disc.trainable_state_dict() if hasattr(disc, "trainable_state_dict") else \
            disc.state_dict()
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in dstate.items()},
                  str(tmp / DISC))
    tensors: dict[str, torch.Tensor] = {}
    tree = {
        "optimizers": {k: encode(o.state_dict(), tensors, f"opt.{k}")
                       for k, o in (optimizers or {}).items()},
        "schedulers": {k: encode(s.state_dict(), tensors, f"sched.{k}")
                       for k, s in (schedulers or {}).items()},
        "rng": encode(rng_state(), tensors, "rng"),
        **encode(dict(state or {}), tensors, "state"),
    }
    save_file(tensors, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps(tree, indent=1) + "\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def load_checkpoint(
    folder: str | Path,
    *,
    model: nn.Module,
    ema: nn.Module | None = None,
    disc: nn.Module | None = None,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    schedulers: dict[str, Any] | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load everything :func:`save_checkpoint` wrote into the given objects; returns ``state``."""
    from fapecli.errors import UsageError

    folder = Path(folder)
    if not (folder / STATE_JSON).is_file():
        raise UsageError("not a training checkpoint (no training_state.json)", folder)
    tensors = load_file(str(folder / STATE_TENSORS))
    tree = decode(json.loads((folder / STATE_JSON).read_text(encoding="utf-8")), tensors)
    load_module(model, folder / "model")
    if ema is not None:
        if not (folder / "ema").is_dir():
            raise UsageError("checkpoint has no EMA weights (schedule.ema_decay was 0?)", folder)
        load_module(ema, folder / "ema")
    if disc is not None:
        if not (folder / DISC).is_file():
            raise UsageError("checkpoint has no discriminator (loss.adv was 0?)", folder)
        dstate = load_file(str(folder / DISC))
        if hasattr(disc, "load_trainable_state_dict"):
            disc.load_trainable_state_dict(dstate)
        else:
            disc.load_state_dict(dstate, strict=True)
    for name, opt in (optimizers or {}).items():
        opt.load_state_dict(tree["optimizers"][name])
    for name, sched in (schedulers or {}).items():
        sched.load_state_dict(tree["schedulers"][name])
    if restore_rng:
        set_rng_state(tree["rng"])
    return {k: v for k, v in tree.items() if k not in ("optimizers", "schedulers", "rng")}
