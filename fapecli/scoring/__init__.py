"""`fape score`: image-quality metrics of restored images, offline.

``score(outputs, refs)`` pairs outputs with references (see fapecli.scoring.pairing),
computes full-reference metrics (PSNR, SSIM, LPIPS, DISTS by default; FID on request,
folder against folder) or, without references, no-reference ones (NIQE, MUSIQ, MANIQA,
CLIP-IQA, TOPIQ), and returns a ScoreReport: per-image values, per-metric mean/std/count
and direction, metrics that could not run and why, unmatched files and per-pair errors.
Nothing is printed and nothing is downloaded; a metric whose weights are missing is
reported unavailable with the file name and the folder to put it in.

Learned metrics run through pyiqa, which is licensed for non-commercial use only.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fapecli.errors import FapeError, ImageError, UsageError
from fapecli.io import Image, from_array, read_image
from fapecli.scoring.fetch import fetch_weights, import_weights
from fapecli.scoring.metrics import (
    DEFAULT_FR,
    DEFAULT_MAX_PIXELS,
    DEFAULT_NR,
    EXACT,
    MetricInfo,
    canonical_name,
    get_metric,
    list_metrics,
    metric_info,
    missing_weights,
    run_learned,
    to_tensor,
)
from fapecli.scoring.pairing import Pair, Pairing, pair_images

__all__ = [
    "DEFAULT_FR",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_NR",
    "ImageScore",
    "MetricInfo",
    "MetricSummary",
    "Pair",
    "PairError",
    "Pairing",
    "ScoreReport",
    "fetch_weights",
    "import_weights",
    "list_metrics",
    "metric_info",
    "pair_images",
    "score",
]

Source = str | Path | np.ndarray | Image
Progress = Callable[[int, int, str], None]


@dataclass
class ImageScore:
    """One output (and its reference): metric -> value, None where it could not be computed."""

    name: str
    output: str
    ref: str | None
    values: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class MetricSummary:
    name: str
    mode: str  # "FR", "NR" or "set"
    lower_better: bool
    mean: float | None
    std: float | None  # population standard deviation over the images
    count: int

    @property
    def direction(self) -> str:
        return "lower" if self.lower_better else "higher"


@dataclass
class PairError:
    output: str
    ref: str | None
    metric: str | None  # None: the whole pair (unreadable file, size mismatch)
    message: str


@dataclass
class ScoreReport:
    metrics: list[str]  # computed metrics, in order
    rows: list[ImageScore] = field(default_factory=list)
    summary: dict[str, MetricSummary] = field(default_factory=dict)
    dataset: dict[str, float | None] = field(default_factory=dict)  # set metrics (FID)
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> one-line reason
    unmatched_outputs: list[str] = field(default_factory=list)
    unmatched_refs: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (input, message)
    errors: list[PairError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite values become "inf"/"-inf" strings or null (NaN)."""
        return {
            "settings": self.settings,
            "metrics": {
                name: {
                    "mode": s.mode,
                    "direction": s.direction,
                    "lower_better": s.lower_better,
                    "mean": _json_number(s.mean),
                    "std": _json_number(s.std),
                    "count": s.count,
                }
                for name, s in self.summary.items()
            },
            "dataset": {k: _json_number(v) for k, v in self.dataset.items()},
            "images": [
                {
                    "name": r.name,
                    "output": r.output,
                    "ref": r.ref,
                    "scores": {k: _json_number(v) for k, v in r.values.items()},
                    "notes": r.notes,
                }
                for r in self.rows
            ],
            "unavailable": self.unavailable,
            "unmatched": {"outputs": self.unmatched_outputs, "refs": self.unmatched_refs},
            "problems": [{"input": i, "message": m} for i, m in self.problems],
            "errors": [e.__dict__ for e in self.errors],
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
        }

    def csv_rows(self) -> list[list[str]]:
        """Header + one row per image: name, output, ref, one column per metric, errors."""
        errors: dict[str, list[str]] = {}
        for e in self.errors:
            errors.setdefault(e.output, []).append(f"{e.metric or 'pair'}: {e.message}")
        rows = [["name", "output", "ref", *self.metrics, "errors"]]
        for r in self.rows:
            values = [_csv_number(r.values.get(m)) for m in self.metrics]
            rows.append(
                [r.name, r.output, r.ref or "", *values, "; ".join(errors.get(r.output, []))]
            )
        return rows

    def summary_rows(self) -> list[list[str]]:
        """Header + one row per metric: metric, direction, mean, std, count."""
        rows = [["metric", "direction", "mean", "std", "count"]]
        for s in self.summary.values():
            rows.append(
                [s.name, s.direction, _csv_number(s.mean), _csv_number(s.std), str(s.count)]
            )
        return rows


def _json_number(v: float | None) -> float | str | None:
    if v is None or math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _csv_number(v: float | None) -> str:
    return "" if v is None or math.isnan(v) else f"{v:.6g}"


# --------------------------------------------------------------------------- inputs


@dataclass
class _Job:
    name: str
    output: Source
    ref: Source | None
    output_label: str
    ref_label: str | None


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray | Image)


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    if isinstance(x, str | Path) or _is_array(x):
        return [x]
    return list(x)


def _array_jobs(outputs: list[Any], refs: list[Any] | None, report: ScoreReport) -> list[_Job]:
    jobs = []
    for i, out in enumerate(outputs):
        ref = refs[i] if refs is not None and i < len(refs) else None
        if refs is not None and ref is None:
            report.unmatched_outputs.append(f"array[{i}]")
            continue
        jobs.append(
            _Job(f"array[{i}]", out, ref, f"array[{i}]", None if ref is None else f"ref[{i}]")
        )
    if refs is not None:
        report.unmatched_refs += [f"ref[{i}]" for i in range(len(outputs), len(refs))]
    return jobs


def _path_jobs(
    outputs: list[Any], refs: list[Any] | None, recursive: bool, report: ScoreReport
) -> list[_Job]:
    pairing = pair_images(outputs, refs, recursive=recursive)
    report.unmatched_outputs = [str(p) for p in pairing.unmatched_outputs]
    report.unmatched_refs = [str(p) for p in pairing.unmatched_refs]
    report.problems = list(pairing.problems)
    return [
        _Job(p.name, p.output, p.ref, str(p.output), None if p.ref is None else str(p.ref))
        for p in pairing.pairs
    ]


def _load(source: Source) -> Image:
    if isinstance(source, Image):
        return source
    if isinstance(source, np.ndarray):
        try:
            return from_array(source)
        except ValueError as exc:
            raise ImageError(str(exc)) from None
    return read_image(source)


def _align(
    out: np.ndarray, ref: np.ndarray, resize_ref: bool, center_crop: bool
) -> tuple[np.ndarray, np.ndarray, str]:
    """Make the pair the same size (or raise ValueError saying how they differ)."""
    (h, w), (rh, rw) = out.shape[:2], ref.shape[:2]
    if (h, w) == (rh, rw):
        return out, ref, ""
    if resize_ref:
        import cv2

        shrink = h * w < rh * rw
        resized = cv2.resize(
            ref, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
        )
        resized = np.clip(resized.reshape(h, w, ref.shape[2]), 0.0, 1.0)
        return out, resized, f"reference resized from {rw}x{rh} to {w}x{h}"
    if center_crop:
        ch, cw = min(h, rh), min(w, rw)
        return _center(out, ch, cw), _center(ref, ch, cw), f"both center-cropped to {cw}x{ch}"
    raise ValueError(
        f"size mismatch: output {w}x{h}, reference {rw}x{rh} (use resize_ref or center_crop)"
    )


def _center(a: np.ndarray, h: int, w: int) -> np.ndarray:
    top, left = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
    return a[top : top + h, left : left + w]


# --------------------------------------------------------------------------- metrics


def _metric_names(metrics: str | Sequence[str] | None, has_refs: bool) -> list[str]:
    if metrics is None:
        return list(DEFAULT_FR if has_refs else DEFAULT_NR)
    raw = [metrics] if isinstance(metrics, str) else list(metrics)
    groups = {"fr": DEFAULT_FR, "nr": DEFAULT_NR, "all": DEFAULT_FR + DEFAULT_NR}
    names: list[str] = []
    for item in raw:
        for part in str(item).split(","):
            key = canonical_name(part)
            for name in groups.get(key, (key,)) if key else ():
                if name not in names:
                    metric_info(name)  # UsageError for an unknown name
                    names.append(name)
    return names


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _prepare(
    names: list[str], has_refs: bool, folders: bool, device: str, report: ScoreReport
) -> dict[str, Any]:
    """Build every metric that can run; the others go to report.unavailable."""
    ready: dict[str, Any] = {}
    dev = None
    for name in names:
        info = metric_info(name)
        if info.mode in ("FR", "set") and not has_refs:
            report.unavailable[name] = f"{name} is a full-reference metric: give references"
            continue
        if info.mode == "set" and not folders:
            report.unavailable[name] = (
                f"{name} compares two sets: give one output folder and one reference folder"
            )
            continue
        missing = missing_weights(name)
        if missing:
            more = f" (and {len(missing) - 1} more missing file(s))" if len(missing) > 1 else ""
            report.unavailable[name] = missing[0] + more
            continue
        try:
            if dev is None and name not in EXACT:
                from fapecli.loader import resolve_device

                dev = resolve_device(device)
            ready[name] = get_metric(name, dev)
        except UsageError:
            raise
        except Exception as exc:  # a metric that cannot be built must not stop the others
            report.unavailable[name] = f"{name} could not be loaded: {_one_line(exc)}"
    report.settings["device"] = str(dev) if dev is not None else "cpu"
    return ready


# --------------------------------------------------------------------------- scoring


def score(
    outputs: Source | Sequence[Source],
    refs: Source | Sequence[Source] | None = None,
    *,
    metrics: str | Sequence[str] | None = None,
    y_channel: bool = False,
    crop_border: int = 0,
    resize_ref: bool = False,
    center_crop: bool = False,
    device: str = "auto",
    progress: Progress | None = None,
    recursive: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ScoreReport:
    """Score outputs (files, folders or arrays) against refs, or without references.

    ``metrics`` None picks PSNR, SSIM, LPIPS, DISTS with refs and NIQE, MUSIQ, MANIQA,
    CLIP-IQA, TOPIQ without; names may be comma-separated, and "fr", "nr", "all" are
    groups. ``y_channel`` and ``crop_border`` apply to PSNR and SSIM (BasicSR's convention).
    A size mismatch is a per-pair error unless ``resize_ref`` (resize the reference to the
    output) or ``center_crop`` (crop both to the common size). ``max_pixels`` bounds what
    learned metrics see (see fapecli.scoring.metrics). ``progress(done, total, name)``.
    """
    start = time.perf_counter()
    if crop_border < 0:
        raise UsageError("crop_border must be >= 0")
    if resize_ref and center_crop:
        raise UsageError("choose one of resize_ref and center_crop")
    out_list, ref_list = _as_list(outputs), (None if refs is None else _as_list(refs))
    has_refs = ref_list is not None
    names = _metric_names(metrics, has_refs)
    settings = {
        "y_channel": y_channel,
        "crop_border": crop_border,
        "resize_ref": resize_ref,
        "center_crop": center_crop,
        "max_pixels": max_pixels,
    }
    report = ScoreReport(metrics=[], settings=settings)
    arrays = any(_is_array(x) for x in out_list + (ref_list or []))
    if arrays:
        jobs = _array_jobs(out_list, ref_list, report)
    else:
        jobs = _path_jobs(out_list, ref_list, recursive, report)
    folders = _folder_pair(out_list, ref_list) if not arrays else None
    ready = _prepare(names, has_refs, folders is not None, device, report)
    report.metrics = [n for n in names if n in ready and metric_info(n).mode != "set"]
    context = _Context(ready, y_channel, crop_border, resize_ref, center_crop, max_pixels, report)
    for i, job in enumerate(jobs):
        report.rows.append(_score_job(job, context))
        if progress is not None:
            progress(i + 1, len(jobs), job.name)
    _score_sets(ready, folders, report)
    _summarise(report, context)
    report.seconds = time.perf_counter() - start
    return report


def _folder_pair(outs: list[Any], refs: list[Any] | None) -> tuple[Path, Path] | None:
    if refs is None or len(outs) != 1 or len(refs) != 1:
        return None
    out, ref = Path(outs[0]), Path(refs[0])
    return (out, ref) if out.is_dir() and ref.is_dir() else None


@dataclass
class _Context:
    ready: dict[str, Any]
    y_channel: bool
    crop_border: int
    resize_ref: bool
    center_crop: bool
    max_pixels: int
    report: ScoreReport
    counts: Counter = field(default_factory=Counter)


def _score_job(job: _Job, ctx: _Context) -> ImageScore:
    row = ImageScore(job.name, job.output_label, job.ref_label)
    names = [n for n in ctx.report.metrics]
    row.values = dict.fromkeys(names)
    out = _read(job.output, job, row, ctx)
    if out is None:
        return row
    ref = _read(job.ref, job, row, ctx) if job.ref is not None else None
    tensors: dict[str, Any] = {}
    fr = [n for n in names if metric_info(n).mode == "FR"]
    if ref is not None and fr:
        try:
            out_px, ref_px, note = _align(out.pixels, ref.pixels, ctx.resize_ref, ctx.center_crop)
        except ValueError as exc:
            _error(ctx, job, None, str(exc))
        else:
            if note:
                row.notes.append(note)
            for name in fr:
                _run(
                    name,
                    row,
                    job,
                    ctx,
                    lambda n=name: _fr_value(n, out_px, ref_px, tensors, ctx, row),
                )
    for name in (n for n in names if metric_info(n).mode == "NR"):
        _run(name, row, job, ctx, lambda n=name: _nr_value(n, out.pixels, tensors, ctx, row))
    return row


def _read(source: Source, job: _Job, row: ImageScore, ctx: _Context) -> Image | None:
    try:
        image = _load(source)
    except (FapeError, OSError, MemoryError) as exc:
        _error(ctx, job, None, _one_line(exc))
        return None
    if image.alpha is not None:
        ctx.counts["alpha"] += 1
    if image.is_grey:
        ctx.counts["grey"] += 1
    if image.bit_depth == 16:
        ctx.counts["16-bit"] += 1
    return image


def _run(
    name: str, row: ImageScore, job: _Job, ctx: _Context, compute: Callable[[], float]
) -> None:
    try:
        row.values[name] = compute()
    except MemoryError:
        _error(ctx, job, name, "out of memory")
    except Exception as exc:  # one metric failing on one image is recorded, not fatal
        _error(ctx, job, name, _one_line(exc))


def _error(ctx: _Context, job: _Job, metric: str | None, message: str) -> None:
    ctx.report.errors.append(PairError(job.output_label, job.ref_label, metric, message))


def _tensor(key: str, pixels: np.ndarray, cache: dict[str, Any]) -> Any:
    if key not in cache:
        rgb = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
        cache[key] = to_tensor(rgb)
    return cache[key]


def _fr_value(
    name: str,
    out: np.ndarray,
    ref: np.ndarray,
    cache: dict[str, Any],
    ctx: _Context,
    row: ImageScore,
) -> float:
    metric = ctx.ready[name]
    if name in EXACT:
        return metric(out, ref, y_channel=ctx.y_channel, crop_border=ctx.crop_border)
    value, note = run_learned(
        metric, _tensor("fr-out", out, cache), _tensor("fr-ref", ref, cache), ctx.max_pixels
    )
    _note(note, name, ctx, row)
    return value


def _nr_value(
    name: str, out: np.ndarray, cache: dict[str, Any], ctx: _Context, row: ImageScore
) -> float:
    value, note = run_learned(ctx.ready[name], _tensor("out", out, cache), None, ctx.max_pixels)
    _note(note, name, ctx, row)
    return value


def _note(note: str, name: str, ctx: _Context, row: ImageScore) -> None:
    if note:
        row.notes.append(note)
        ctx.counts[f"{name}: " + ("tiled" if "tiles" in note else "downscaled")] += 1


def _score_sets(
    ready: dict[str, Any], folders: tuple[Path, Path] | None, report: ScoreReport
) -> None:
    for name, metric in ready.items():
        if metric_info(name).mode != "set" or folders is None:
            continue
        try:
            report.dataset[name] = metric.folders(*folders)
        except Exception as exc:
            report.dataset[name] = None
            report.errors.append(PairError(str(folders[0]), str(folders[1]), name, _one_line(exc)))


def _summarise(report: ScoreReport, ctx: _Context) -> None:
    for name in report.metrics:
        info = metric_info(name)
        values = [v for r in report.rows if (v := r.values.get(name)) is not None]
        mean = std = None
        if values:
            arr = np.asarray(values, dtype=np.float64)
            mean = (
                float(arr.mean())
                if np.isfinite(arr).all()
                else float(np.inf if (arr == np.inf).any() else np.nan)
            )
            std = float(arr.std()) if np.isfinite(arr).all() else None
        report.summary[name] = MetricSummary(
            name, info.mode, info.lower_better, mean, std, len(values)
        )
    for name in report.dataset:
        info = metric_info(name)
        value = report.dataset[name]
        report.summary[name] = MetricSummary(
            name, info.mode, info.lower_better, value, None, int(value is not None)
        )
    counts = ctx.counts
    if counts["alpha"]:
        report.notes.append(f"alpha channel ignored on {counts['alpha']} image(s)")
    if counts["grey"] and any(n not in EXACT for n in report.metrics):
        report.notes.append(f"{counts['grey']} grey image(s) replicated to RGB for learned metrics")
    for key, n in sorted(counts.items()):
        if ":" in key:
            report.notes.append(f"{key} on {n} image(s) larger than {ctx.max_pixels} pixels")
