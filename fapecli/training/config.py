"""`fape train` configuration: one dataclass tree, read from TOML, overridable as ``key.sub=value``.

nanoGPT style: every knob is a field here with its default, a recipe file (``configs/*.toml``)
sets some of them, and the command line overrides any of them::

    fape train fapecli/training/configs/fape-s.toml schedule.steps=2000 data.mix.rain=2 seed=1

An override value is parsed as a TOML value when it is one (``3``, ``0.5``, ``true``,
``["a", "b"]``) and kept as a plain string otherwise, then checked against the field's type.
Unknown keys and values of the wrong type raise :class:`~fapecli.errors.UsageError`.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fapecli.errors import UsageError
from fapecli.tasks import DEGRADATIONS, normalize_task

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PERCEPTUAL_KINDS = ("lpips", "msssim", "fft", "none")
ADV_KINDS = ("hinge", "ns")
DISC_BACKBONES = ("auto", "siglip", "conv")
TRAIN_PARAMS = ("all", "adapters", "head")
EXECUTORS = ("compact", "flux")


DEFAULT_D0 = 1e-6  # Prodigy's own default: right from scratch, far too small for trained weights


def _default_mix() -> dict[str, float]:
    return {d: 1.0 for d in DEGRADATIONS}


@dataclass
class DataConfig:
    clean_dirs: list[str] = field(default_factory=list)  # clean images, degraded on the fly
    paired_dirs: list[str] = field(default_factory=list)  # folders with gt/ and lq/
    paired_tasks: dict[str, str] = field(default_factory=dict)  # paired folder name -> task
    mix: dict[str, float] = field(default_factory=_default_mix)  # per-degradation ratios
    mixture_prob: float = 0.2  # chance that a sample stacks several degradations
    clean_prob: float = 0.03  # chance of an undegraded sample (plan "none", identity target)
    paired_weight: float = 1.0  # sampling weight of a paired image relative to a clean one
    crop: int = 128  # training crop side (lq and gt have this size)
    batch_size: int = 4  # per process
    workers: int = 0  # DataLoader worker processes
    val_count: int = 8  # first N clean images by sorted name, held out, fixed degradations
    val_paired: int = 0  # first N paired images by sorted name, held out
    val_crop: int = 192  # centre crop side of validation images
    rule_plan_prob: float = 0.5  # condition on the rule planner's plan of the lq crop
    plan_error_prob: float = 0.1  # ground-truth plan replaced by a wrong task (robustness)
    score_noise: float = 0.15  # std of the noise on ground-truth plan scores


@dataclass
class ModelConfig:
    executor: str = "compact"  # "compact" (fape-s family) or "flux" (frozen FLUX + adapters)
    preset: str = "fape-s"  # a size preset of the compact executor
    overrides: dict[str, Any] = field(default_factory=dict)  # FapeSConfig / FluxAdapterConfig
    init: str = ""  # a model (flux: adapters) folder to start from ("" = from scratch)
    # compact: a model folder whose tensors of matching name and shape initialise the preset
    # (a different depth or MoE placement is fine; the rest starts fresh); "a,b,c" starts
    # from the uniform weight average of several such folders
    warm_start: str = ""
    # "all" (from scratch), "adapters" (LoRA experts/routers/plan) or "head" (the compact
    # executor's refinement head alone, the rest frozen: FapeSConfig.head_channels)
    train_params: str = "all"
    base: str = "flux.1-dev"  # flux: weights.toml name or folder with transformer/ and vae/


@dataclass
class LossConfig:
    l2: float = 50.0
    psnr: float = 0.0  # the PSNR loss (per-sample log-MSE): balances tasks of unequal error
    l1: float = 0.0
    perceptual: float = 5.0
    perceptual_kind: str = "lpips"  # lpips | msssim | fft | none
    perceptual_fallback: str = "fft"  # used when the LPIPS weights are not found locally
    adv: float = 0.1
    adv_kind: str = "ns"  # "ns" (non-saturating, the standard GAN loss) or "hinge"
    adv_start: int = 0  # generator step at which the adversarial term (and D training) begins
    freq: float = 0.001  # weight of the MoE frequency regulariser
    disc_backbone: str = "auto"  # auto (SigLIP when found, else conv) | siglip | conv
    disc_siglip: str = "siglip2-vision"  # weights.toml name of the SigLIP vision tower
    disc_width: int = 32  # channels of the conv backbone / level heads


@dataclass
class OptimConfig:
    lr: float = 1.0  # Prodigy's lr multiplier (leave at 1)
    d0: float = DEFAULT_D0  # Prodigy's initial step-size estimate
    d_coef: float = 1.0  # Prodigy's d_coef (scales the estimated step size)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    disc_lr: float = 2e-4  # AdamW for the discriminator heads
    disc_betas: list[float] = field(default_factory=lambda: [0.5, 0.99])
    disc_weight_decay: float = 0.0
    grad_clip: float = 1.0  # max grad norm (0 = off), generator and discriminator


@dataclass
class ScheduleConfig:
    steps: int = 4000
    warmup: int = 100  # linear warm-up steps of the generator's lr multiplier
    cosine: bool = True  # cosine-anneal the generator's lr multiplier after warm-up
    ema_decay: float = 0.999  # 0 disables the EMA (the raw weights are validated/exported)
    val_every: int = 500
    ckpt_every: int = 1000
    bf16: bool = True  # bf16 autocast (CUDA only; ignored on CPU)


@dataclass
class LoggingConfig:
    log_every: int = 50  # a log line every N steps when stderr is not a terminal
    tensorboard: bool = True  # when tensorboard is installed
    progress: str = "auto"  # auto | bar | lines | none


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    out_dir: str = "runs/fape-s"
    seed: int = 0
    resume: str = ""  # a checkpoint folder, "auto" (latest in out_dir) or "" (fresh)
    device: str = "auto"  # auto | cpu | cuda (the accelerate launcher decides under DDP)
    threads: int = 0  # torch CPU threads per process (0 = torch's default)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------- checking
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked and converted to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = UsageError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except UsageError:
                continue
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no",
                                                          "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is list:
        if isinstance(value, str):  # "a,b" or "0.8,0.9" on the command line
            value = [_parse_value(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key)
    raise bad  # pragma: no cover - a field type this module does not know


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """A dataclass instance from a (possibly partial) nested dict; unknown keys are errors."""
    hints = _hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        known = ", ".join(sorted(hints))
        raise UsageError(f"unknown config key(s) {', '.join(unknown)} in {where}; known: {known}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """A TOML value when ``text`` is one (numbers, booleans, arrays, inline tables), else text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _merge(base: dict[str, Any], top: dict[str, Any], cls: type = TrainConfig) -> dict[str, Any]:
    """``top`` over ``base``: config sections merge key by key, table-valued fields
    (``data.mix``, ``model.overrides``) are replaced as a whole."""
    hints = _hints(cls)
    out = dict(base)
    for k, v in top.items():
        tp = hints.get(k)
        if isinstance(v, dict) and dataclasses.is_dataclass(tp) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, tp)
        else:
            out[k] = v
    return out


def apply_override(tree: dict[str, Any], item: str) -> None:
    """Apply one ``key.sub=value`` string to a nested dict of the config, in place."""
    key, sep, text = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise UsageError(f"override {item!r} is not of the form key.sub=value")
    parts = key.split(".")
    cls: Any = TrainConfig
    node = tree
    for i, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "the top level"
            raise UsageError(
                f"unknown config key {key!r}: no {part!r} in {where} "
                f"(known: {', '.join(sorted(hints))})"
            )
        tp = hints[part]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(tp) and not last:
            node = node.setdefault(part, {})
            cls = tp
            continue
        if typing.get_origin(tp) is dict and len(parts) == i + 2:  # data.mix.rain=2
            sub = node.setdefault(part, {})
            if not isinstance(sub, dict):
                raise UsageError(f"config key {'.'.join(parts[: i + 1])!r} is not a table")
            vt = typing.get_args(tp)[1] if typing.get_args(tp) else Any
            sub[parts[-1]] = _coerce(_parse_value(text.strip()), vt, key)
            return
        if not last:
            raise UsageError(f"config key {'.'.join(parts[: i + 1])!r} has no sub-keys ({key!r})")
        node[part] = _coerce(_parse_value(text.strip()), tp, key)
        return


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then ``data`` (a nested dict as in the TOML), then ``overrides``."""
    tree = _merge(dataclasses.asdict(TrainConfig()), data)
    for item in overrides or []:
        apply_override(tree, item)
    cfg = _build(TrainConfig, tree)
    validate(cfg)
    return cfg


def resolve_config_path(path: str | Path) -> Path:
    """A file path, or the name of a bundled recipe (``fape-s``, ``tiny``)."""
    p = Path(path)
    if p.is_file():
        return p
    bundled = CONFIG_DIR / (p.name if p.suffix == ".toml" else f"{p.name}.toml")
    if p.parent == Path(".") and bundled.is_file():
        return bundled
    known = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.toml")))
    raise UsageError(f"config file not found (give a .toml path or one of: {known})", p)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML recipe (or defaults when ``path`` is None) and apply ``overrides``.

    Relative folders in ``data`` are taken relative to the current directory, as typed.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"not valid TOML ({exc})", p) from None
    return config_from_dict(data, overrides)


def validate(cfg: TrainConfig) -> None:
    """Value checks the types alone cannot express."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(f"config: {message}")

    unknown = sorted(set(cfg.data.mix) - set(DEGRADATIONS))
    need(not unknown, f"data.mix has unknown degradation(s) {unknown}; known: {DEGRADATIONS}")
    need(all(v >= 0 for v in cfg.data.mix.values()), "data.mix ratios must be >= 0")
    need(sum(cfg.data.mix.values()) > 0, "data.mix needs at least one positive ratio")
    for name in ("mixture_prob", "clean_prob", "rule_plan_prob", "plan_error_prob"):
        v = getattr(cfg.data, name)
        need(0.0 <= v <= 1.0, f"data.{name} must lie in [0, 1], not {v}")
    for folder, task in cfg.data.paired_tasks.items():
        try:
            normalize_task(task)
        except KeyError:
            need(False, f"data.paired_tasks.{folder}: unknown task {task!r}")
    need(cfg.data.crop >= 16, f"data.crop must be >= 16, not {cfg.data.crop}")
    need(cfg.data.val_crop >= 16, f"data.val_crop must be >= 16, not {cfg.data.val_crop}")
    need(cfg.data.batch_size >= 1, "data.batch_size must be >= 1")
    need(cfg.data.workers >= 0, "data.workers must be >= 0")
    need(cfg.data.val_count >= 0 and cfg.data.val_paired >= 0, "val counts must be >= 0")
    need(cfg.loss.perceptual_kind in PERCEPTUAL_KINDS,
         f"loss.perceptual_kind must be one of {PERCEPTUAL_KINDS}")
    need(cfg.loss.perceptual_fallback in ("msssim", "fft", "none"),
         "loss.perceptual_fallback must be msssim, fft or none")
    need(cfg.loss.adv_kind in ADV_KINDS, f"loss.adv_kind must be one of {ADV_KINDS}")
    need(cfg.loss.disc_backbone in DISC_BACKBONES,
         f"loss.disc_backbone must be one of {DISC_BACKBONES}")
    for name in ("l2", "psnr", "l1", "perceptual", "adv", "freq"):
        need(getattr(cfg.loss, name) >= 0, f"loss.{name} must be >= 0")
    need(cfg.model.train_params in TRAIN_PARAMS,
         f"model.train_params must be one of {TRAIN_PARAMS}")
    need(cfg.model.executor in EXECUTORS, f"model.executor must be one of {EXECUTORS}")
    need(cfg.model.executor != "flux" or cfg.model.train_params == "adapters",
         "model.executor = 'flux' trains only its adapters: set model.train_params = 'adapters'")
    need(len(cfg.optim.betas) == 2 and len(cfg.optim.disc_betas) == 2, "betas need two values")
    need(cfg.threads >= 0, "threads must be >= 0")
    need(cfg.optim.d0 > 0, "optim.d0 must be > 0")
    need(cfg.schedule.steps >= 1, "schedule.steps must be >= 1")
    need(cfg.schedule.warmup >= 0, "schedule.warmup must be >= 0")
    need(0.0 <= cfg.schedule.ema_decay < 1.0, "schedule.ema_decay must lie in [0, 1)")
    need(cfg.schedule.val_every >= 0 and cfg.schedule.ckpt_every >= 0,
         "val_every / ckpt_every must be >= 0 (0 = only at the end)")
    need(cfg.logging.progress in ("auto", "bar", "lines", "none"),
         "logging.progress must be auto, bar, lines or none")
    need(cfg.logging.log_every >= 1, "logging.log_every must be >= 1")
