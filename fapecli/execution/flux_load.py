"""Finding, checking and loading the FLUX executor's weights (for the loader and `fape train`).

A FLUX *base* is a folder holding diffusers' ``transformer/`` and ``vae/`` sub-folders (a
``black-forest-labs/FLUX.1-*`` snapshot), named by a ``kind = "flux-base"`` entry of
weights.toml or given as a path. *Adapters* are a folder written by
:meth:`~fapecli.execution.flux.FluxExecutor.save_pretrained` whose config names its base.
Before any weight is read, :func:`estimate_flux` sizes the job and
:func:`~fapecli.execution.memory.check_fits` refuses what the device cannot hold.

The activation estimates are deliberately rough (they decide between "fits" and "will not",
not the tile size): inference keeps one block's working set, about 24 token-width tensors,
plus the VAE's widest full-resolution feature maps; training with gradient checkpointing
keeps each block's input, the experts' outputs for the frequency regulariser, one block's
recomputation and the VAE decoder's graph, plus 2 GiB for the losses and the discriminator.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fapecli.errors import WeightsError, first_line
from fapecli.execution.flux import FluxAdapterConfig, FluxExecutor, read_adapter_config
from fapecli.execution.memory import Estimate, check_fits, folder_params

MIB = 2**20


def _is_base(folder: Path) -> bool:
    return (folder / "transformer" / "config.json").is_file() and \
        (folder / "vae" / "config.json").is_file()


def base_dirs(base: str | Path, *, relative_to: Path | None = None) -> tuple[Path, Path, str]:
    """(transformer folder, VAE folder, label) of a base: a folder or a weights.toml name."""
    from fapecli.weights import get_model, locate

    p = Path(base)
    candidates = [p] + ([relative_to / p] if relative_to is not None and not p.is_absolute()
                        else [])
    for c in candidates:
        if _is_base(c):
            return c / "transformer", c / "vae", c.name or str(c)
    if p.exists() or "/" in str(base) or "\\" in str(base):
        raise WeightsError("not a FLUX base folder (needs transformer/config.json and "
                           "vae/config.json)", p)
    entry = get_model(str(base))
    if entry.kind != "flux-base":
        raise WeightsError(f"model {entry.name!r} is a {entry.kind!r}, not a FLUX base")
    files = locate(entry)
    try:
        return (files["transformer/config.json"].parent, files["vae/config.json"].parent,
                entry.name)
    except KeyError:
        raise WeightsError(f"weights.toml entry {entry.name!r} must list transformer/config.json "
                           "and vae/config.json") from None


def _read(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def adapter_params(tconf: dict, cfg: FluxAdapterConfig) -> int:
    """Trainable parameters of the adapters on a transformer of config ``tconf``."""
    d = tconf.get("num_attention_heads", 24) * tconf.get("attention_head_dim", 128)
    wrappers = 4 * tconf.get("num_layers", 19) + 3 * tconf.get("num_single_layers", 38)
    per = sum(cfg.moe_ranks) * 2 * d + 2 * cfg.cond_dim + 2 + 2
    w = cfg.proj_width
    cond = 2 * (cfg.cond_dim * w + w) + w * tconf.get("joint_attention_dim", 4096) \
        + w * tconf.get("pooled_projection_dim", 768) + 64 * cfg.cond_dim
    return wrappers * per + cond + (cfg.hidden_dim or 0) * (cfg.cond_dim + 2)


def estimate_flux(transformer_dir: Path, vae_dir: Path, dtype: torch.dtype, *,
                  cfg: FluxAdapterConfig, label: str = "FLUX", training: bool = False,
                  batch: int = 1, side: int | None = None) -> list[Estimate]:
    """What restoring (``side``-pixel tiles) or training (``batch`` crops of ``side``) needs."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    tconf, vconf = _read(transformer_dir), _read(vae_dir)
    t_params = folder_params(transformer_dir, FluxTransformer2DModel)
    v_params = folder_params(vae_dir, AutoencoderKL)
    elem = torch.finfo(dtype).bits / 8
    side = side or (512 if training else cfg.tile)
    scale = 2 ** (len(vconf.get("block_out_channels", [1] * 4)) - 1)
    n = (side // (2 * scale)) ** 2 + 4  # image tokens + plan tokens
    d = tconf.get("num_attention_heads", 24) * tconf.get("attention_head_dim", 128)
    blocks = tconf.get("num_layers", 19) + tconf.get("num_single_layers", 38)
    c0 = vconf.get("block_out_channels", [128])[0]
    vae_side = min(side, cfg.vae_tile) if cfg.vae_tile else side
    adapters = adapter_params(tconf, cfg)
    if training:
        moe = 4 * tconf.get("num_layers", 19) + 3 * tconf.get("num_single_layers", 38)
        t_act = batch * n * d * elem * (2 * blocks + 2 * moe + 40)
        v_act = batch * side * side * c0 * elem * 24 + 2 * 2**30
        extra = adapters * 4 * 7  # fp32 weights, gradients, 4 Prodigy states, EMA copy
    else:
        t_act = batch * n * d * elem * 24
        v_act = batch * vae_side * vae_side * c0 * elem * 8
        extra = adapters * elem
    return [Estimate(f"{label} transformer", t_params, dtype, t_act + 512 * MIB, extra),
            Estimate("VAE", v_params, dtype, v_act)]


def load_flux_base(transformer_dir: Path, vae_dir: Path, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The frozen diffusers transformer and VAE, on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    try:
        transformer = FluxTransformer2DModel.from_pretrained(str(transformer_dir),
                                                             torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"cannot load the FLUX base: {first_line(exc)}",
                           transformer_dir.parent) from None
    return transformer.to(device).eval(), vae.to(device).eval()


def build_flux_executor(
    base: str | Path | None = None,
    *,
    adapters: str | Path | None = None,
    config: FluxAdapterConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    training: bool = False,
    batch: int = 1,
    side: int | None = None,
    check_memory: bool = True,
    allow_large_cpu: bool | None = None,
) -> FluxExecutor:
    """A FLUX executor: ``base`` (default: the adapters' or config's) plus ``adapters`` (a
    folder; fresh, untrained adapters from ``config`` when None), memory-checked first.

    ``training`` keeps the adapters in fp32 (the loop autocasts to bf16 on CUDA) and turns on
    gradient checkpointing as the config says.
    """
    device = torch.device(device)
    folder = Path(adapters) if adapters is not None else None
    if folder is not None:
        try:
            cfg = read_adapter_config(folder)
        except (FileNotFoundError, ValueError, TypeError) as exc:
            raise WeightsError(f"cannot read FLUX adapters: {exc}", folder) from None
    else:
        cfg = config or FluxAdapterConfig()
    base = base if base is not None else cfg.base
    relative = (folder if folder.is_dir() else folder.parent) if folder is not None else None
    tdir, vdir, label = base_dirs(base, relative_to=relative)
    if check_memory:
        check_fits(estimate_flux(tdir, vdir, dtype, cfg=cfg, label=label, training=training,
                                 batch=batch, side=side), device, allow_large_cpu=allow_large_cpu)
    transformer, vae = load_flux_base(tdir, vdir, device, dtype)
    cfg.base = str(Path(base).resolve()) if Path(base).exists() else str(base)
    executor = FluxExecutor(transformer, vae, cfg)
    if folder is not None:
        try:
            executor.load_adapters(folder)
        except (FileNotFoundError, ValueError) as exc:
            raise WeightsError(f"cannot load FLUX adapters: {exc}", folder) from None
    if training:
        executor.set_adapter_dtype(torch.float32)
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
            vae.enable_gradient_checkpointing()
        return executor.train()
    return executor.eval()


__all__ = ["adapter_params", "base_dirs", "build_flux_executor", "estimate_flux",
           "load_flux_base"]
