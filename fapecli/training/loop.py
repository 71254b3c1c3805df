"""`fape train`: the training loop (accelerate, Prodigy + AdamW, EMA, validation, checkpoints).

One process or many: ``fape train CONFIG`` runs on one device; ``accelerate launch -m fapecli
train CONFIG`` gives DDP (each rank draws its own samples, see :mod:`fapecli.training.data`).
The executor comes from :data:`EXECUTORS`, a factory per ``model.executor`` kind: the compact
fape-s family, or ``flux`` (a frozen FLUX transformer and VAE with trainable LoRA-MoE adapters,
routers and projectors, gradient checkpointing; see :mod:`fapecli.execution.flux`).
Per step: the generator (the executor) restores a batch of lq crops conditioned on their
plans; its loss is :func:`~fapecli.training.losses.generator_loss`; from ``loss.adv_start`` on
the discriminator is trained on (gt, restored) and its logits enter the generator's loss.
Generator: Prodigy (only trainable parameters: everything, or with ``model.train_params =
"adapters"`` the LoRA experts, routers and plan encoder, or with ``"head"`` the compact
executor's refinement head), linear warm-up then cosine of its lr
multiplier; discriminator: AdamW with cosine annealing; gradient clipping for both; an EMA of
the generator is validated (PSNR/SSIM on the Y channel of the fixed validation set), saved in
checkpoints and exported as ``<out_dir>/final`` in float16. bf16 autocast on CUDA only.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fapecli.errors import UsageError
from fapecli.training import checkpoint as ckpt
from fapecli.training.config import DEFAULT_D0, ModelConfig, TrainConfig
from fapecli.training.losses import build_perceptual, d_adv_loss, generator_loss, psnr, ssim

CSV_FIELDS = ("step", "loss", "l2", "psnr", "l1", "perceptual", "adv", "freq", "d_loss", "lr",
              "d_coef", "seconds", "val_psnr", "val_ssim")


@dataclass
class TrainResult:
    out_dir: Path
    final_dir: Path | None  # the exported EMA model (None when no steps were run)
    step: int  # last completed step
    seconds: float  # wall time of this run (not counting earlier runs resumed from)
    seconds_per_step: float
    losses: dict[str, float] = field(default_factory=dict)  # means over the last log window
    val: dict[str, float] = field(default_factory=dict)  # last validation
    reports: list[str] = field(default_factory=list)  # what was chosen (perceptual, D, ...)


class EMA:
    """Exponential moving average of a module's floating-point state (a frozen copy)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short memory while young
        src = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.data_ptr() == src[k].data_ptr():  # shared frozen tensors (FLUX base)
                continue
            if v.is_floating_point():
                v.lerp_(src[k].to(v.dtype), 1 - d)
            else:
                v.copy_(src[k])


# ------------------------------------------------------------------------------- setup
ExecutorFactory = Callable[..., nn.Module]
EXECUTORS: dict[str, ExecutorFactory] = {}


def register_executor(kind: str) -> Callable[[ExecutorFactory], ExecutorFactory]:
    """Decorator: ``@register_executor("flux")`` makes ``model.executor = "flux"`` buildable."""

    def deco(fn: ExecutorFactory) -> ExecutorFactory:
        EXECUTORS[kind] = fn
        return fn

    return deco


def build_model(cfg: ModelConfig, *, device: torch.device | None = None,
                dtype: torch.dtype | None = None, batch: int = 1,
                side: int | None = None) -> nn.Module:
    """The executor to train, by ``cfg.executor``. ``device``/``dtype`` are where the frozen
    part may be built directly (large bases); ``batch`` x ``side`` crops size the memory check.
    """
    factory = EXECUTORS.get(cfg.executor)
    if factory is None:
        raise UsageError(f"model.executor {cfg.executor!r}: use one of {', '.join(EXECUTORS)}")
    return factory(cfg, device=device, dtype=dtype, batch=batch, side=side)


@register_executor("compact")
def build_compact(cfg: ModelConfig, **_: Any) -> nn.Module:
    """A compact preset (with overrides) from scratch, or ``init`` weights (on the CPU)."""
    from fapecli.execution.compact import FapeS, create_model

    if cfg.init:
        if not Path(cfg.init).exists():
            raise UsageError("model.init: no such model folder", cfg.init)
        return FapeS.from_pretrained(cfg.init).train()
    try:
        return create_model(cfg.preset, **cfg.overrides)
    except KeyError as exc:
        raise UsageError(f"model.preset: {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"model.overrides: {exc}") from None


def warm_start(model: nn.Module, source: str | Path) -> str:
    """Copy into ``model`` every tensor of the model folder ``source`` whose name and shape
    match (a layer wrapped by the LoRA-MoE in one and plain in the other still matches through
    its ``base.``); returns a report line.

    ``source`` may name several folders separated by commas: then a tensor takes the uniform
    average of the folders' values (a weight average of models fine-tuned from one parent,
    :func:`~fapecli.training.average.mean_tensor`), and only when every folder holds it with
    the model's shape; integer tensors take the first folder's values.
    """
    from fapecli.training.average import load_weights, mean_tensor, weights_file

    files = [weights_file(part.strip(), "model.warm_start") for part in str(source).split(",")]
    srcs = [{_plain_name(k): v for k, v in load_weights(f, "model.warm_start").items()}
            for f in files]
    state = model.state_dict()
    copied = 0
    with torch.no_grad():
        for name, tensor in state.items():
            values = [src.get(_plain_name(name)) for src in srcs]
            if all(v is not None and v.shape == tensor.shape for v in values):
                if tensor.is_floating_point():
                    tensor.copy_(mean_tensor(values, dtype=tensor.dtype))
                else:
                    tensor.copy_(values[0])
                copied += 1
    if not copied:
        raise UsageError("model.warm_start: no tensor matches the model's names and shapes",
                         ", ".join(str(f) for f in files))
    what = str(files[0]) if len(files) == 1 else f"the average of {', '.join(map(str, files))}"
    return f"warm start from {what}: {copied} of {len(state)} tensors copied"


def _plain_name(key: str) -> str:
    return key.replace(".base.", ".")


@register_executor("flux")
def build_flux(cfg: ModelConfig, *, device: torch.device | None = None,
               dtype: torch.dtype | None = None, batch: int = 1,
               side: int | None = None) -> nn.Module:
    """FLUX base (``model.base``) with fresh adapters (``model.overrides`` = FluxAdapterConfig
    fields) or the adapters of ``model.init``; frozen base, fp32 adapters, checkpointing."""
    from fapecli.execution.flux import FluxAdapterConfig
    from fapecli.execution.flux_load import build_flux_executor

    if cfg.init and not Path(cfg.init).exists():
        raise UsageError("model.init: no such adapters folder", cfg.init)
    if cfg.init and cfg.overrides:
        raise UsageError("model.overrides cannot change the adapters of model.init")
    try:
        config = FluxAdapterConfig(**cfg.overrides)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"model.overrides: {exc}") from None
    return build_flux_executor(cfg.base or None, adapters=cfg.init or None, config=config,
                               device=device or torch.device("cpu"),
                               dtype=dtype or torch.float32, training=True, batch=batch,
                               side=side)


def select_trainable(model: nn.Module, mode: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` for ``mode`` ("all", "adapters" or "head") and return those
    parameters."""
    from fapecli.execution.conditioning import PlanEncoder
    from fapecli.execution.moe import FrequencyAwareLoRAMoE

    model.requires_grad_(mode == "all")
    if mode == "adapters":
        for m in model.modules():
            if isinstance(m, PlanEncoder):
                m.requires_grad_(True)
            elif isinstance(m, FrequencyAwareLoRAMoE):
                for name, p in m.named_parameters():
                    p.requires_grad_(not name.startswith("base."))
        if hasattr(model, "adapter_parameters"):  # projectors etc. of a FLUX executor
            for p in model.adapter_parameters():
                p.requires_grad_(True)
    elif mode == "head" and getattr(model, "head", None) is not None:
        model.head.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError(f"model.train_params={mode!r} leaves nothing to train in this model")
    return params


def lr_lambda(warmup: int, steps: int, cosine: bool) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine annealing to 0 (or constant)."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if not cosine:
            return 1.0
        t = (s - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from fapecli.loader import resolve_device

    if cfg.device != "auto":
        resolve_device(cfg.device)  # a clear error for an unavailable device
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    return Accelerator(cpu=cfg.device == "cpu", kwargs_handlers=[ddp])


# ---------------------------------------------------------------------------- logging
class _Log:
    """Progress (rich bar on a terminal, else a line every ``log_every`` steps), CSV, TB."""

    def __init__(self, cfg: TrainConfig, out: Path, main: bool, start: int,
                 emit: Callable[[str], None]) -> None:
        self.main, self.emit, self.total, self.start = main, emit, cfg.schedule.steps, start
        mode = cfg.logging.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if main else "none"
        self.bar = self.task = self.tb = None
        if not main:
            return
        path = out / "log.csv"
        new = not path.is_file()
        if not new:  # resuming: drop rows an interrupted run wrote after the checkpoint
            with open(path, newline="", encoding="utf-8") as fh:
                keep = [r for r in csv.DictReader(fh) if r.get("step", "").isdigit()
                        and int(r["step"]) <= start]
            with open(path, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, CSV_FIELDS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(keep)
        self.csv_file = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self.csv = csv.DictWriter(self.csv_file, CSV_FIELDS, extrasaction="ignore")
        if new:
            self.csv.writeheader()
        if cfg.logging.tensorboard:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, completed=start, info="")

    def step(self, step: int, row: dict[str, Any], rate: float, logged: bool) -> None:
        if not self.main:
            return
        info = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("seconds", "lr"))
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        if self.mode == "lines" and logged:
            eta = (self.total - step) * rate
            self.emit(f"step {step}/{self.total}  {info}  {rate:.3g} s/step  "
                      f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        if logged:
            self.csv.writerow({"step": step, **row})
            self.csv_file.flush()
            if self.tb is not None:
                for k, v in row.items():
                    self.tb.add_scalar(k, v, step)

    def note(self, text: str) -> None:
        if self.main:
            (self.bar.console.print if self.bar is not None else self.emit)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.main:
            self.csv_file.close()
            if self.tb is not None:
                self.tb.close()


@torch.no_grad()
def evaluate(model: nn.Module, val: list, device: torch.device,
             autocast: Callable[[], Any]) -> dict[str, float]:
    """Mean PSNR / SSIM (Y channel) of ``model`` on the validation triples, and of the inputs."""
    if not val:
        return {}
    was = model.training
    model.eval()
    acc = {"val_psnr": 0.0, "val_ssim": 0.0, "val_psnr_in": 0.0}
    for lq, gt, plan in val:
        lq, gt = lq.to(device), gt.to(device)
        with autocast():
            out = model(lq, [plan])
        out = out.float().clamp(0, 1)
        acc["val_psnr"] += float(psnr(out, gt).mean())
        acc["val_ssim"] += float(ssim(out, gt).mean())
        acc["val_psnr_in"] += float(psnr(lq, gt).mean())
    model.train(was)
    return {k: v / len(val) for k, v in acc.items()}


# -------------------------------------------------------------------------------- train
@dataclass
class _Parts:
    """Everything a step touches (``gen``/``disc`` may be DDP-wrapped; ``raw_*`` are not)."""

    gen: nn.Module
    raw_g: nn.Module
    g_params: list[nn.Parameter]
    opt_g: torch.optim.Optimizer
    sched_g: Any
    ema: EMA | None
    perc: Any
    disc: nn.Module | None = None
    raw_d: nn.Module | None = None
    d_params: list[nn.Parameter] = field(default_factory=list)
    opt_d: torch.optim.Optimizer | None = None
    sched_d: Any = None

    @property
    def optimizers(self) -> dict[str, Any]:
        return {"generator": self.opt_g} | ({"discriminator": self.opt_d} if self.opt_d else {})

    @property
    def schedulers(self) -> dict[str, Any]:
        return {"generator": self.sched_g} | ({"discriminator": self.sched_d}
                                               if self.sched_d else {})


def _build(cfg: TrainConfig, acc: Any, model: nn.Module | None,
           warm: bool = True) -> tuple[_Parts, list[str]]:
    """Generator, discriminator, perceptual loss, optimisers and schedulers, on the device;
    with the build's report lines (warm start and the optim.d0 note, unless ``warm`` is off for
    a resume, whose optimiser state brings its own step size; the discriminator backbone)."""
    from prodigyopt import Prodigy

    from fapecli.training.discriminator import build_discriminator

    sc, lc, oc = cfg.schedule, cfg.loss, cfg.optim
    bf16 = sc.bf16 and acc.device.type == "cuda"
    gen = model if model is not None else build_model(
        cfg.model, device=acc.device, dtype=torch.bfloat16 if bf16 else torch.float32,
        batch=cfg.data.batch_size, side=cfg.data.crop)
    reports = []
    if model is None and cfg.model.warm_start and warm:
        if cfg.model.executor != "compact" or cfg.model.init:
            raise UsageError("model.warm_start works for a compact preset without model.init")
        reports.append(warm_start(gen, cfg.model.warm_start))
    if warm and (cfg.model.warm_start or cfg.model.init) and oc.d0 <= DEFAULT_D0:
        reports.append(f"note: optim.d0={oc.d0:g} with trained weights: Prodigy's step size "
                       "grows slowly from there near a minimum; continuing a model, set optim.d0 "
                       "to the last d_coef of its log.csv (about 1e-3 for fape-s)")
    g_params = select_trainable(gen, cfg.model.train_params)
    opt_g = Prodigy(g_params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay,
                    d_coef=oc.d_coef, d0=oc.d0, use_bias_correction=True,
                    safeguard_warmup=sc.warmup > 0)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda(sc.warmup, sc.steps, sc.cosine))
    perc = build_perceptual(lc.perceptual_kind if lc.perceptual > 0 else "none",
                            lc.perceptual_fallback)
    if perc.module is not None:
        perc.module.to(acc.device)
    wrapped = acc.prepare(gen)  # under DDP: wrapped, rank 0's weights broadcast
    parts = _Parts(wrapped, gen, g_params, opt_g, sched_g,
                   EMA(gen, sc.ema_decay) if sc.ema_decay > 0 else None, perc)
    if lc.adv > 0:
        disc, report = build_discriminator(lc.disc_backbone, siglip_name=lc.disc_siglip,
                                           width=lc.disc_width)
        reports.append(report)
        parts.d_params = [p for p in disc.parameters() if p.requires_grad]
        parts.opt_d = torch.optim.AdamW(parts.d_params, lr=oc.disc_lr,
                                        betas=tuple(oc.disc_betas),
                                        weight_decay=oc.disc_weight_decay)
        parts.sched_d = torch.optim.lr_scheduler.CosineAnnealingLR(
            parts.opt_d, T_max=max(1, sc.steps - lc.adv_start))
        parts.disc, parts.raw_d = acc.prepare(disc), disc
    return parts, reports


def _train_step(p: _Parts, cfg: TrainConfig, acc: Any, lq: torch.Tensor, gt: torch.Tensor,
                plans: list, adv: bool, autocast: Callable[[], Any]) -> dict[str, float]:
    """One generator update (and, when ``adv``, one discriminator update); the loss terms."""
    lc, clip = cfg.loss, cfg.optim.grad_clip
    with autocast():
        restored = p.gen(lq, plans)
    fake_logits = None
    if adv:  # D as a fixed critic for the generator: eval mode, no parameter gradients
        p.raw_d.eval().requires_grad_(False)
        with autocast():
            fake_logits = p.raw_d(restored.float())
    weights = {k: getattr(lc, k) for k in ("l2", "psnr", "l1", "perceptual", "adv", "freq")}
    loss, terms = generator_loss(restored, gt, weights, perceptual=p.perc.module,
                                 fake_logits=fake_logits, adv_kind=lc.adv_kind, model=p.raw_g)
    p.opt_g.zero_grad(set_to_none=True)
    acc.backward(loss)
    if clip > 0:
        acc.clip_grad_norm_(p.g_params, clip)
    p.opt_g.step()
    p.sched_g.step()
    terms["loss"] = float(loss.detach())
    if adv:
        for q in p.d_params:
            q.requires_grad_(True)
        p.raw_d.train()
        with autocast():
            logits = p.disc(torch.cat([gt, restored.detach().float()]))
        real, fake = logits.float().chunk(2)
        d_loss = d_adv_loss(real, fake, lc.adv_kind)
        p.opt_d.zero_grad(set_to_none=True)
        acc.backward(d_loss)
        if clip > 0:
            acc.clip_grad_norm_(p.d_params, clip)
        p.opt_d.step()
        p.sched_d.step()
        terms["d_loss"] = float(d_loss.detach())
    return terms


def train(cfg: TrainConfig, *, model: nn.Module | None = None,
          emit: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) training as configured; returns where things went and the last numbers.

    ``model`` replaces the configured executor (any module called as ``model(lq, plans)``);
    ``emit`` receives the log lines (default: stderr, main process only).
    """
    from accelerate.utils import set_seed

    from fapecli.training.data import TrainSet, load_items, make_loader, validation_set

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    acc = _accelerator(cfg)
    emit = emit or (lambda s: print(s, file=sys.stderr, flush=True))
    say = emit if acc.is_main_process else (lambda s: None)
    out, sc = Path(cfg.out_dir), cfg.schedule
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    resume = ckpt.latest_checkpoint(out) if cfg.resume == "auto" else \
        (Path(cfg.resume) if cfg.resume else None)
    parts, build_reports = _build(cfg, acc, model, warm=resume is None)
    ema, device = parts.ema, acc.device
    use_bf16 = sc.bf16 and device.type == "cuda"

    def autocast() -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else \
            contextlib.nullcontext()

    start, elapsed0 = 0, 0.0
    if resume is not None:
        state = ckpt.load_checkpoint(resume, model=parts.raw_g, ema=ema.module if ema else None,
                                     disc=parts.raw_d, optimizers=parts.optimizers,
                                     schedulers=parts.schedulers)
        start, elapsed0 = int(state["step"]), float(state.get("elapsed", 0.0))
        say(f"resumed from {resume} at step {start}")

    train_items, val_items = load_items(cfg.data)
    ds = TrainSet(train_items, cfg.data, cfg.seed)
    val = validation_set(val_items, cfg.data, getattr(parts.raw_g, "multiple", 8)) \
        if acc.is_main_process else []
    loader = make_loader(ds, cfg.data, start_step=start, steps=sc.steps,
                         rank=acc.process_index, world=acc.num_processes)
    n_train = sum(p.numel() for p in parts.g_params)
    reports = [parts.perc.report, *build_reports,
               f"generator: {n_train:,} trainable parameters ({cfg.model.train_params}); "
               f"data: {len(train_items)} training / {len(val_items)} validation images; "
               f"{acc.num_processes} process(es) on {device}" + (" bf16" if use_bf16 else "")]
    for r in reports:
        say(r)
    log = _Log(cfg, out, acc.is_main_process, start, emit)
    window: dict[str, list[float]] = {}
    last_val: dict[str, float] = {}
    last_losses: dict[str, float] = {}
    t0, step = time.perf_counter(), start

    def save(step: int) -> None:
        if acc.is_main_process:
            ckpt.save_checkpoint(
                ckpt.checkpoint_dir(out, step), model=parts.raw_g,
                ema=ema.module if ema else None, disc=parts.raw_d,
                optimizers=parts.optimizers, schedulers=parts.schedulers,
                state={"step": step, "elapsed": elapsed0 + time.perf_counter() - t0,
                       "config": cfg.to_dict(), "val": last_val,
                       "sampler": loader.batch_sampler.state_dict() | {"next_step": step}})
        acc.wait_for_everyone()

    parts.gen.train()
    for lq, gt, plans in loader:
        adv = parts.disc is not None and step >= cfg.loss.adv_start
        terms = _train_step(parts, cfg, acc, lq.to(device), gt.to(device), plans, adv, autocast)
        if ema is not None:
            ema.update(parts.raw_g, step)
        step += 1
        for k, v in terms.items():
            window.setdefault(k, []).append(v)
        row: dict[str, Any] = {k: sum(v) / len(v) for k, v in window.items()}
        row |= {"lr": parts.sched_g.get_last_lr()[0],
                "d_coef": float(parts.opt_g.param_groups[0]["d"])}
        validate = bool(sc.val_every and step % sc.val_every == 0) or step == sc.steps
        if validate:
            if acc.is_main_process:
                last_val = evaluate(ema.module if ema else parts.raw_g, val, device, autocast)
                row |= {k: v for k, v in last_val.items() if k in CSV_FIELDS}
                if last_val:
                    log.note(f"step {step}: val psnr {last_val['val_psnr']:.2f} dB "
                             f"ssim {last_val['val_ssim']:.4f} "
                             f"(input {last_val['val_psnr_in']:.2f} dB)")
            acc.wait_for_everyone()
        seconds = time.perf_counter() - t0
        row["seconds"] = round(elapsed0 + seconds, 3)
        logged = step % cfg.logging.log_every == 0 or step == sc.steps or validate
        log.step(step, row, seconds / (step - start), logged)
        if logged:
            last_losses, window = {k: row[k] for k in window}, {}
        if sc.ckpt_every and step % sc.ckpt_every == 0 and step != sc.steps:
            save(step)

    seconds = time.perf_counter() - t0
    final_dir = None
    if step > start or resume is None:
        save(step)
    if acc.is_main_process and step > 0:
        final_dir = _export(ema.module if ema else parts.raw_g, out, cfg, step, last_val)
        say(f"exported {final_dir} (step {step}, {'EMA' if ema else 'raw'} weights, float16)")
    acc.wait_for_everyone()
    log.close()
    return TrainResult(out, final_dir, step, seconds, seconds / max(1, step - start),
                       last_losses, last_val, reports)


def _export(module: nn.Module, out: Path, cfg: TrainConfig, step: int,
            val: dict[str, float]) -> Path:
    """The deliverable: ``out/final`` with config.json + float16 model.safetensors."""
    final = out / "final"
    extra = getattr(getattr(module, "config", None), "extra", None)
    if isinstance(extra, dict):
        extra["training"] = {"steps": step, "seed": cfg.seed, "val": val,
                             "data": {"clean_dirs": cfg.data.clean_dirs,
                                      "paired_dirs": cfg.data.paired_dirs}}
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(final, dtype=torch.float16)
    else:
        from safetensors.torch import save_file

        final.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().half().contiguous() if v.is_floating_point() else
                   v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                  str(final / ckpt.WEIGHTS))
    return final
