"""Restoration quality of a fape model against the classical tools a CPU user would reach for.

    .venv/bin/python bench/quality.py --data ../shared/data --model fape-s \
        --out bench/results/quality.md [--limit N] [--sets a,b] [--device cpu]

Every set of `SETS` is scored with PSNR/SSIM (RGB and BT.601 Y) for: the input itself, the
classical baselines of its task (`baselines_for`), the model with the set's task forced and,
when `fapecli.planning.rules` exists, the model with the rule planner choosing the task.
Synthetic sets are made from CBSD68 exactly as `fape degrade` makes them (seed + index per
image, fixed severity) and cached as 8-bit PNG under bench/out/quality/inputs/; baseline
scores are cached per image under bench/out/quality/cache/ (keyed by method settings, set
recipe and the generator revisions of its degradations), so a rerun with a new model only
runs the model; ``--cache-from`` seeds that cache from a committed report's JSON on a fresh
checkout. Levin09's pairs are not registered, so there every row is scored after its best
integer shift (`register`; the unaligned scores are reported beside). Writes a Markdown
report and a JSON file with every number (same name, .json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from _common import (
    REPO,
    BenchError,
    ModelRef,
    command_line,
    fmt,
    limit_threads,
    machine,
    md_table,
    now,
    resolve_model,
)

THREADS = 2
OUT_DIR = REPO / "bench" / "out" / "quality"  # gitignored: generated inputs and caches
CACHE_VERSION = 1
METRICS = ("psnr", "ssim", "psnr_y", "ssim_y")
UNALIGNED = ("psnr_unaligned", "ssim_unaligned")  # also reported for sets with `align`

Pixels = np.ndarray  # float32 H x W x C in [0, 1], C in {1, 3}

# ------------------------------------------------------------------------------------ sets


@dataclass(frozen=True)
class BenchSet:
    """One benchmark set: where its pairs come from and what the model is asked to do."""

    name: str
    task: str  # the task forced on the model (fapecli.tasks name)
    group: str  # which classical baselines apply (see `baselines_for`)
    source: str  # folder under --data: pairs (gt/ + lq/) or, for synthetic sets, clean images
    degradation: str | None = None  # synthetic: `fape degrade --task` value
    seed: int = 0  # synthetic: image i (sorted as `fape degrade` lists them) gets seed + i
    severity: float | None = None
    params: tuple[tuple[str, str, Any], ...] = ()  # (step, name, value): `-p step.name=value`
    scale: int | None = None  # super-resolution factor
    secondary: tuple[str, ...] = ()  # further tasks of a mixture (the model's oracle plan)
    # pairs that are not registered (Levin09: up to 5 px apart): every row, the input included,
    # is scored after its best integer shift within +-align px (`register`)
    align: int = 0

    @property
    def synthetic(self) -> bool:
        return self.degradation is not None

    @property
    def crop_border(self) -> int:
        return self.scale or 0

    @property
    def sigma(self) -> float | None:
        """The known Gaussian noise sigma (0-255 units) of a noise set."""
        return next((float(v) for s, k, v in self.params if (s, k) == ("noise", "sigma")), None)

    @property
    def revisions(self) -> dict[str, int]:
        """The generator revision of each synthetic degradation (`degrade.REVISIONS`)."""
        from fapecli.tasks import get_task
        from fapecli.training.degrade import revision

        kinds = [get_task(t).degradation for t in (self.degradation or "").split(",") if t]
        return {k: revision(k) for k in kinds}

    def overrides(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for step, key, value in self.params:
            out.setdefault(step, {})[key] = value
        return out

    def recipe(self) -> str:
        """How the inputs are made, as a command line (synthetic) or a folder pair."""
        if not self.synthetic:
            aligned = f", scored after the best shift within ±{self.align} px" if self.align else ""
            return f"`{self.source}/lq` vs `{self.source}/gt`{aligned}"
        parts = [f"fape degrade DATA/{self.source} -o DIR --task {self.degradation}",
                 f"--seed {self.seed}"]
        if self.severity is not None:
            parts.append(f"--severity {self.severity:g}")
        parts += [f"-p {s}.{k}={v}" for s, k, v in self.params]
        return "`" + " ".join(parts) + "`"


SETS: tuple[BenchSet, ...] = (
    BenchSet("CBSD68-noise15", "denoise", "noise", "test/CBSD68", "noise", 1015,
             params=(("noise", "sigma", 15),)),
    BenchSet("CBSD68-noise25", "denoise", "noise", "test/CBSD68", "noise", 1025,
             params=(("noise", "sigma", 25),)),
    BenchSet("CBSD68-noise50", "denoise", "noise", "test/CBSD68", "noise", 1050,
             params=(("noise", "sigma", 50),)),
    BenchSet("Rain100L", "derain", "rain", "test/Rain100L"),
    BenchSet("LOL_v1_eval15", "lowlight", "lowlight", "test/LOL_v1_eval15"),
    # Levin09's blurred photos sit up to 5 px off their sharp ones (it varies by kernel), so
    # unaligned scores mostly measure that shift; aligned ones are the set's usual measure
    BenchSet("Levin09", "deblur", "blur", "test/Levin09", align=8),
    BenchSet("Set5_SRx4", "sr", "sr", "test/Set5_SRx4", scale=4),
    BenchSet("Set14_SRx4", "sr", "sr", "test/Set14_SRx4", scale=4),
    BenchSet("CBSD68-haze", "dehaze", "haze", "test/CBSD68", "haze", 2000, 0.5),
    BenchSet("CBSD68-lowlight", "lowlight", "lowlight", "test/CBSD68", "lowlight", 3000, 0.5),
    BenchSet("CBSD68-motionblur", "deblur", "blur", "test/CBSD68", "blur", 4000, 0.5,
             params=(("blur", "kind", "motion"),)),
    BenchSet("CBSD68-snow", "desnow", "snow", "test/CBSD68", "snow", 5000, 0.5),
    BenchSet("CBSD68-haze+rain+noise", "dehaze", "mix", "test/CBSD68", "haze,rain,noise",
             6000, 0.5, params=(("noise", "sigma", 15),), secondary=("derain", "denoise")),
    # haze made with the SOTS generator (real depth, its own airlight): not fape's synthesis
    BenchSet("SOTS_outdoor2", "dehaze", "haze", "real/SOTS_outdoor2"),
)

# ------------------------------------------------------------------------------------ data


@dataclass
class Sample:
    """One test image: its degraded input and clean reference."""

    name: str
    lq: Any  # fapecli.io.Image
    gt: Any  # fapecli.io.Image
    params: dict[str, Any] | None = None  # synthetic: what `degrade` recorded


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def load_samples(spec: BenchSet, data: Path, limit: int | None) -> list[Sample]:
    """The set's first ``limit`` images (all when None), generating synthetic inputs."""
    from fapecli.io import discover_images, read_image

    if spec.synthetic:
        items, problems = discover_images([data / spec.source])
        if problems:
            raise BenchError(f"{spec.name}: {problems[0][0]}: {problems[0][1]}")
        folder = OUT_DIR / "inputs" / _slug(spec.name)
        return [_synthetic(spec, index, item.path, folder)
                for index, item in enumerate(items[:limit])]
    gt_dir, lq_dir = data / spec.source / "gt", data / spec.source / "lq"
    items, problems = discover_images([gt_dir])
    if problems:
        raise BenchError(f"{spec.name}: {problems[0][0]}: {problems[0][1]}")
    samples = []
    for item in items[:limit]:
        lq_path = lq_dir / item.relative
        if not lq_path.is_file():
            raise BenchError(f"{spec.name}: no input {lq_path} for {item.path}")
        samples.append(Sample(str(item.relative), read_image(lq_path), read_image(item.path)))
    return samples


def _synthetic(spec: BenchSet, index: int, clean: Path, folder: Path) -> Sample:
    """Degrade one clean image as `fape degrade` would (seed + index), cached as 8-bit PNG."""
    from fapecli.io import read_image, write_image
    from fapecli.tasks import get_task
    from fapecli.training.degrade import degrade

    gt = read_image(clean)
    target = folder / f"{clean.stem}.png"
    sidecar = target.with_suffix(".json")
    key = {"recipe": spec.recipe(), "seed": spec.seed + index, "source": clean.name,
           "revisions": spec.revisions}
    if target.is_file() and sidecar.is_file():
        record = json.loads(sidecar.read_text())
        if record.get("key") == key:
            return Sample(clean.name, read_image(target), gt, record.get("params"))
    kinds = [get_task(t).degradation for t in spec.degradation.split(",")]
    result = degrade(gt.rgb, kinds, seed=spec.seed + index, severity=spec.severity,
                     **spec.overrides())
    pixels = result.image if not gt.is_grey else result.image.mean(axis=2, keepdims=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_image(gt.with_pixels(pixels), target)
    sidecar.write_text(json.dumps({"key": key, "params": result.params}, indent=1) + "\n")
    return Sample(clean.name, read_image(target), gt, result.params)


# --------------------------------------------------------------------------------- metrics


def _luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 Y in [16/255, 235/255] (BasicSR's rgb2ycbcr, y_only)."""
    return (16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def _planes(a: np.ndarray, b: np.ndarray, y: bool) -> tuple[np.ndarray, np.ndarray, int | None]:
    a, b = a.astype(np.float64), b.astype(np.float64)
    if a.shape[2] == 1 and b.shape[2] == 1:
        return a[..., 0], b[..., 0], None
    a, b = (np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x for x in (a, b))
    return (_luma(a), _luma(b), None) if y else (a, b, 2)


def _crop(x: np.ndarray, border: int) -> np.ndarray:
    return x[border:-border, border:-border] if border > 0 else x


def sk_psnr(a: Pixels, b: Pixels, *, y_channel: bool = False, crop_border: int = 0) -> float:
    """PSNR with scikit-image (fallback for fapecli.scoring.metrics.psnr)."""
    from skimage.metrics import peak_signal_noise_ratio

    pa, pb, _ = _planes(_crop(a, crop_border), _crop(b, crop_border), y_channel)
    return float(peak_signal_noise_ratio(pb, pa, data_range=1.0))


def sk_ssim(a: Pixels, b: Pixels, *, y_channel: bool = False, crop_border: int = 0) -> float:
    """Gaussian-window SSIM with scikit-image, mean over channels (BasicSR's convention)."""
    from skimage.metrics import structural_similarity

    pa, pb, axis = _planes(_crop(a, crop_border), _crop(b, crop_border), y_channel)
    return float(structural_similarity(pa, pb, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=1.0,
                                       channel_axis=axis))


def metric_functions() -> tuple[Callable[..., float], Callable[..., float], str]:
    """fape's own exact PSNR/SSIM when present (same convention), else scikit-image's."""
    try:
        from fapecli.scoring.metrics import psnr, ssim
    except ImportError:
        return sk_psnr, sk_ssim, "scikit-image (skimage.metrics)"
    return psnr, ssim, "fapecli.scoring.metrics (exact; equal to skimage's Gaussian SSIM)"


PSNR, SSIM, METRICS_SOURCE = metric_functions()


def quantise(x: Pixels) -> Pixels:
    """As saved to an 8-bit file: every output is scored after this."""
    return (np.round(np.clip(x, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def register(out: Pixels, gt: Pixels, reach: int) -> tuple[Pixels, Pixels]:
    """``out`` and ``gt`` cropped by ``reach`` px, ``out`` moved by the integer shift within
    +-``reach`` that minimises their mean squared error."""
    h, w = gt.shape[:2]
    ref = np.ascontiguousarray(gt[reach:h - reach, reach:w - reach], np.float32)
    # the sum of squared differences at every offset of ref inside out: (2 reach + 1)^2 values
    ssd = cv2.matchTemplate(np.ascontiguousarray(out, np.float32), ref, cv2.TM_SQDIFF)
    _, _, (x, y), _ = cv2.minMaxLoc(ssd)
    return out[y:y + h - 2 * reach, x:x + w - 2 * reach], ref


def score(out: Pixels, gt: Pixels, crop: int, align: int = 0) -> dict[str, float]:
    """PSNR/SSIM on RGB and Y; with ``align``, after `register` (and the unaligned pair too)."""
    if out.shape[:2] != gt.shape[:2]:
        raise BenchError(f"output {out.shape[:2]} and reference {gt.shape[:2]} differ in size")
    out = quantise(out)
    extra = {}
    if align:
        extra = {"psnr_unaligned": PSNR(out, gt, crop_border=crop),
                 "ssim_unaligned": SSIM(out, gt, crop_border=crop)}
        out, gt = register(_crop(out, crop), _crop(gt, crop), align)
        crop = 0
    return {
        "psnr": PSNR(out, gt, crop_border=crop),
        "ssim": SSIM(out, gt, crop_border=crop),
        "psnr_y": PSNR(out, gt, y_channel=True, crop_border=crop),
        "ssim_y": SSIM(out, gt, y_channel=True, crop_border=crop),
        **extra,
    }


# ------------------------------------------------------------------------ classical methods


def to_u8(x: Pixels) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def from_u8(x: np.ndarray, like: Pixels) -> Pixels:
    return (x.astype(np.float32) / 255.0).reshape(like.shape)


def nlm(x: Pixels, h: float) -> Pixels:
    """OpenCV non-local means (7x7 patches, 21x21 search; h = hColor for colour)."""
    u8 = to_u8(x)
    if x.shape[2] == 1:
        return from_u8(cv2.fastNlMeansDenoising(u8[..., 0], None, h, 7, 21), x)
    bgr = np.ascontiguousarray(u8[..., ::-1])
    out = cv2.fastNlMeansDenoisingColored(bgr, None, h, h, 7, 21)
    return from_u8(np.ascontiguousarray(out[..., ::-1]), x)


def bm3d_denoise(x: Pixels, sigma: float, profile: str = "np") -> Pixels:
    """BM3D (CBM3D for colour, opponent colour space) with the known sigma, 2 threads."""
    import bm3d
    from bm3d.profiles import BM3DProfile, BM3DProfileLC

    prof = BM3DProfileLC() if profile == "lc" else BM3DProfile()
    prof.num_threads = THREADS
    if x.shape[2] == 1:
        out = bm3d.bm3d(x[..., 0], sigma / 255.0, profile=prof)
    else:
        out = bm3d.bm3d_rgb(x, sigma / 255.0, profile=prof)
    return np.clip(np.asarray(out, np.float32), 0.0, 1.0).reshape(x.shape)


def median(x: Pixels, k: int) -> Pixels:
    u8 = to_u8(x)
    out = cv2.medianBlur(u8[..., 0] if x.shape[2] == 1 else u8, k)
    return from_u8(out, x)


def box(x: np.ndarray, r: int) -> np.ndarray:
    return cv2.boxFilter(x, -1, (2 * r + 1, 2 * r + 1), borderType=cv2.BORDER_REFLECT)


def guided_filter(guide: np.ndarray, src: np.ndarray, r: int, eps: float) -> np.ndarray:
    """He et al.'s grey-guide guided filter from box filters (no cv2.ximgproc needed)."""
    guide, src = guide.astype(np.float32), src.astype(np.float32)
    mean_i, mean_p = box(guide, r), box(src, r)
    cov_ip = box(guide * src, r) - mean_i * mean_p
    var_i = box(guide * guide, r) - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return box(a, r) * guide + box(b, r)


def dark_channel(x: np.ndarray, patch: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (patch, patch))
    return cv2.erode(x.min(axis=2), kernel, borderType=cv2.BORDER_REPLICATE)


def dehaze_dcp(x: Pixels, patch: int = 15, omega: float = 0.95, t0: float = 0.1,
               radius: int = 60, eps: float = 1e-4, top: float = 0.001) -> Pixels:
    """Dark channel prior (He, Sun, Tang 2009/2011) with guided-filter refinement.

    Atmospheric light: among the brightest ``top`` fraction of dark-channel pixels, the
    one of highest input intensity; transmission ``1 - omega * dark(I / A)`` refined by a
    guided filter (grey guide, radius, eps), floored at ``t0``; ``J = (I - A) / t + A``.
    """
    dark = dark_channel(x, patch)
    n = max(1, round(dark.size * top))
    idx = np.argpartition(dark.ravel(), -n)[-n:]
    candidates = x.reshape(-1, x.shape[2])[idx]
    air = candidates[np.argmax(candidates.sum(axis=1))].astype(np.float32)
    air = np.maximum(air, 1e-3)
    t = 1.0 - omega * dark_channel(x / air, patch)
    grey = x.mean(axis=2) if x.shape[2] == 3 else x[..., 0]
    t = np.maximum(guided_filter(grey, t, radius, eps), t0)[..., None]
    return np.clip((x - air) / t + air, 0.0, 1.0).astype(np.float32)


def luminance(x: Pixels) -> np.ndarray:
    return x[..., 0] if x.shape[2] == 1 else x @ np.array([0.299, 0.587, 0.114], np.float32)


def gamma(x: Pixels, g: float) -> Pixels:
    return np.power(np.clip(x, 0.0, 1.0), g).astype(np.float32)


def adaptive_gamma(x: Pixels, target: float = 0.4) -> Pixels:
    """The power ``g`` whose output has mean luminance ``target`` (bisection), applied."""
    small = x[::4, ::4]
    lo, hi = 0.02, 8.0  # mean luminance decreases as g grows
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        if luminance(gamma(small, mid)).mean() > target:
            lo = mid
        else:
            hi = mid
    return gamma(x, (lo * hi) ** 0.5)


def clahe_l(x: Pixels, clip: float = 2.0, tiles: int = 8) -> Pixels:
    """CLAHE on L of CIE Lab (8-bit), colour kept."""
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles))
    u8 = to_u8(x)
    if x.shape[2] == 1:
        return from_u8(clahe.apply(u8[..., 0]), x)
    lab = cv2.cvtColor(u8, cv2.COLOR_RGB2LAB)
    lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
    return from_u8(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB), x)


def unsharp(x: Pixels, sigma: float, amount: float) -> Pixels:
    blurred = cv2.GaussianBlur(x, (0, 0), sigma).reshape(x.shape)
    return np.clip(x + amount * (x - blurred), 0.0, 1.0).astype(np.float32)


def resize_cv2(x: Pixels, scale: int, interp: int) -> Pixels:
    h, w = x.shape[:2]
    out = cv2.resize(x, (w * scale, h * scale), interpolation=interp)
    return np.clip(out.reshape(h * scale, w * scale, x.shape[2]), 0.0, 1.0)


def resize_pil(x: Pixels, scale: int) -> Pixels:
    from PIL import Image as PILImage

    u8 = to_u8(x)
    pil = PILImage.fromarray(u8[..., 0] if x.shape[2] == 1 else u8)
    out = np.asarray(pil.resize((x.shape[1] * scale, x.shape[0] * scale),
                                PILImage.Resampling.BICUBIC))
    return (out.astype(np.float32) / 255.0).reshape(out.shape[0], out.shape[1], x.shape[2])


@dataclass(frozen=True)
class Method:
    """A classical method: a label for the table, its settings, and the function."""

    label: str
    settings: str
    fn: Callable[[Pixels], Pixels]
    kind: str = "classical"  # or "input"


NLM_H = 0.55  # h = hColor = 0.55 * sigma (see baselines_for)
FIXED_GAMMA = 1 / 2.2
DCP = "patch 15, omega 0.95, top 0.1 %, guided filter r 60 eps 1e-4, t0 0.1"


def baselines_for(spec: BenchSet, bm3d_profile: str = "np") -> list[Method]:
    """The input row and the classical baselines of a set's group, tuned as a user would.

    NLM's h (= hColor) is 0.55 sigma: the best of a 0.3-1.2 sigma grid on six CBSD68 images
    (tuning on the test set can only favour the baseline). BM3D gets the true sigma.
    Unsharp masking: the mildest, a typical and the best setting of a 1-3 px / 0.5-2 amount
    grid on the 32 aligned Levin09 pairs (on synthetic motion blur every setting lowers PSNR).
    """
    scale = spec.scale or 1
    if scale > 1:
        rows = [Method(f"input (nearest x{scale})", "nearest",
                       lambda x: resize_cv2(x, scale, cv2.INTER_NEAREST), "input")]
    else:
        rows = [Method("input", "identity", lambda x: x, "input")]
    sigma = spec.sigma or 0.0
    h = round(NLM_H * sigma, 2)
    nlm_m = Method(f"OpenCV NLM (h={h:g})", f"fastNlMeansDenoisingColored h=hColor={h} 7 21",
                   lambda x: nlm(x, h))
    bm3d_m = Method(f"BM3D (σ={sigma:g})", f"bm3d_rgb sigma={sigma} profile={bm3d_profile}",
                    lambda x: bm3d_denoise(x, sigma, bm3d_profile))
    medians = [Method(f"median {k}x{k}", f"cv2.medianBlur {k}", lambda x, k=k: median(x, k))
               for k in (3, 5)]
    dcp = Method("dark channel prior", DCP, dehaze_dcp)
    groups: dict[str, list[Method]] = {
        "noise": [nlm_m, bm3d_m],
        "rain": medians,
        "snow": medians,
        "haze": [dcp],
        "lowlight": [
            Method(f"gamma {FIXED_GAMMA:.3f} (1/2.2)", "x**(1/2.2)",
                   lambda x: gamma(x, FIXED_GAMMA)),
            Method("adaptive gamma (mean Y → 0.4)", "x**g, mean luma 0.4",
                   adaptive_gamma),
            Method("CLAHE on L (clip 2, 8x8)", "createCLAHE(2.0, (8,8)) on Lab L", clahe_l),
        ],
        "blur": [
            Method("unsharp mask (σ=1, amount 0.5)", "sigma 1 amount 0.5",
                   lambda x: unsharp(x, 1.0, 0.5)),
            Method("unsharp mask (σ=2, amount 1)", "sigma 2 amount 1",
                   lambda x: unsharp(x, 2.0, 1.0)),
            Method("unsharp mask (σ=3, amount 1)", "sigma 3 amount 1",
                   lambda x: unsharp(x, 3.0, 1.0)),
        ],
        "sr": [
            Method("bicubic (cv2 INTER_CUBIC)", "cv2 INTER_CUBIC",
                   lambda x: resize_cv2(x, scale, cv2.INTER_CUBIC)),
            Method("Lanczos (cv2 INTER_LANCZOS4)", "cv2 INTER_LANCZOS4",
                   lambda x: resize_cv2(x, scale, cv2.INTER_LANCZOS4)),
            Method("bicubic (PIL)", "PIL BICUBIC", lambda x: resize_pil(x, scale)),
        ],
        "mix": [  # sensor noise was added last, rain over the haze: undo in reverse order
            Method(f"NLM (h={h:g}) → median 3x3 → DCP", f"{nlm_m.settings} | median3 | {DCP}",
                   lambda x: dehaze_dcp(median(nlm(x, h), 3))),
            Method(f"BM3D (σ={sigma:g}) → median 3x3 → DCP",
                   f"{bm3d_m.settings} | median3 | {DCP}",
                   lambda x: dehaze_dcp(median(bm3d_denoise(x, sigma, bm3d_profile), 3))),
        ],
    }
    return rows + groups[spec.group]


# ------------------------------------------------------------------------------- running


@dataclass
class Row:
    """One method's results on one set."""

    method: str
    kind: str  # "input", "classical" or "fape"
    settings: str
    images: dict[str, dict[str, float]] = field(default_factory=dict)  # metrics + seconds, mp
    plans: dict[str, str] = field(default_factory=dict)  # planner rows: task chosen per image
    cached: int = 0  # images whose scores came from the cache
    ensemble: bool = False  # fape rows: with test-time self-ensemble

    def mean(self, key: str) -> float | None:
        values = [v[key] for v in self.images.values() if key in v]
        return float(np.mean(values)) if values else None

    @property
    def seconds(self) -> float:
        return float(sum(v["seconds"] for v in self.images.values()))

    @property
    def megapixels(self) -> float:
        return float(sum(v["mp"] for v in self.images.values()))

    @property
    def s_per_mp(self) -> float | None:
        return self.seconds / self.megapixels if self.megapixels else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method, "kind": self.kind, "settings": self.settings}
        d |= {k: self.mean(k) for k in METRICS}
        d |= {k: v for k in UNALIGNED if (v := self.mean(k)) is not None}
        d |= {"s_per_mp": self.s_per_mp, "seconds": self.seconds, "megapixels": self.megapixels,
              "cached_images": self.cached, "per_image": self.images}
        if self.plans:
            d["plans"] = self.plans
        return d


def same_inputs(record: dict[str, Any], spec: BenchSet) -> bool:
    """Whether a cache or report record was made from ``spec``'s inputs: the same recipe, made
    by the same generator revisions (records from before revisions existed: all 1)."""
    made_by = record.get("revisions", dict.fromkeys(spec.revisions, 1))
    return record.get("recipe") == spec.recipe() and made_by == spec.revisions


class Cache:
    """Per-set JSON of classical scores per image, keyed by method label + settings."""

    def __init__(self, spec: BenchSet, enabled: bool) -> None:
        self.path = OUT_DIR / "cache" / f"{_slug(spec.name)}.json"
        self.recipe, self.revisions = spec.recipe(), spec.revisions  # what put() records
        self.enabled = enabled
        self.data: dict[str, Any] = {}
        if enabled and self.path.is_file():
            data = json.loads(self.path.read_text())
            if data.get("version") == CACHE_VERSION and same_inputs(data, spec):
                self.data = data.get("rows", {})

    def get(self, method: Method) -> dict[str, dict[str, float]]:
        entry = self.data.get(method.label, {})
        return dict(entry.get("images", {})) if entry.get("settings") == method.settings else {}

    def put(self, method: Method, images: dict[str, dict[str, float]]) -> None:
        if not self.enabled:
            return
        self.data[method.label] = {"settings": method.settings, "images": images}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".part")
        payload = {"version": CACHE_VERSION, "recipe": self.recipe,
                   "revisions": self.revisions, "rows": self.data}
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        os.replace(tmp, self.path)


def seed_cache(results: Path, specs: list[BenchSet], bm3d_profile: str = "np") -> int:
    """Fill the classical cache of ``specs`` from an earlier report's JSON (its per-image
    scores), so a fresh checkout reruns only the model; returns the rows seeded.

    A row is taken only when its set recipe and method settings equal today's: changed data,
    seeds or baselines are recomputed, never mixed in.
    """
    try:
        sets = {s["name"]: s for s in json.loads(results.read_text())["sets"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"--cache-from {results}: not a quality.py results JSON ({exc})") from None
    seeded = 0
    for spec in specs:
        old = sets.get(spec.name)
        if old is None or not same_inputs(old, spec):
            continue
        cache = Cache(spec, enabled=True)
        methods = {m.label: m for m in baselines_for(spec, bm3d_profile)}
        for row in old.get("rows", []):
            method = methods.get(row.get("method"))
            if method is not None and method.settings == row.get("settings") and row.get(
                    "per_image"):
                cache.put(method, row["per_image"])
                seeded += 1
    return seeded


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_classical(method: Method, samples: list[Sample], spec: BenchSet, cache: Cache) -> Row:
    """Run a classical method on every sample (reusing cached per-image scores)."""
    row = Row(method.label, method.kind, method.settings)
    known = cache.get(method)
    for s in samples:
        if s.name in known:
            row.images[s.name] = known[s.name]
            row.cached += 1
            continue
        start = time.perf_counter()
        out = method.fn(s.lq.pixels)
        seconds = time.perf_counter() - start
        row.images[s.name] = {**score(out, s.gt.pixels, spec.crop_border, spec.align),
                              "seconds": seconds, "mp": s.gt.megapixels}
    if row.cached < len(samples):
        cache.put(method, {**known, **row.images})
    log(f"  {method.label}: {fmt(row.mean('psnr'))} dB "
        f"({row.cached}/{len(samples)} cached)")
    return row


def oracle_plan(spec: BenchSet) -> Any:
    """The plan a user forcing the set's task(s) would give (all its tasks, full evidence)."""
    from fapecli.execution.conditioning import plan_for_task

    plan = plan_for_task(spec.task, scale=spec.scale)
    plan.secondary = list(spec.secondary)
    plan.scores = {t: 1.0 for t in (spec.task, *spec.secondary)}
    plan.source, plan.rationale = "user", "benchmark: the set's known degradation(s)"
    return plan


def run_model(model: Any, samples: list[Sample], spec: BenchSet, planner: bool,
              ensemble: bool = False) -> Row:
    """The model with the set's task forced (``planner=False``) or planned per image;
    ``ensemble``: with test-time self-ensemble (`fape restore --ensemble`)."""
    if planner:
        label, settings = "fape (rule planner)", "restore_image(task=None)"
        kwargs: dict[str, Any] = {"task": None}
    elif spec.secondary:
        tasks = "+".join((spec.task, *spec.secondary))
        label, settings = f"fape (task={tasks})", f"restore_image(plan={tasks})"
        kwargs = {"plan": oracle_plan(spec)}
    else:
        label, settings = f"fape (task={spec.task})", f"restore_image(task={spec.task!r})"
        kwargs = {"task": spec.task}
    if spec.scale:
        kwargs["scale"] = spec.scale
        settings += f", scale={spec.scale}"
    if ensemble:
        kwargs["ensemble"] = True
        label, settings = label[:-1] + ", ensemble)", settings + ", ensemble=True"
    row = Row(label, "fape", settings, ensemble=ensemble)
    if samples:  # untimed warm-up: the first forward of a process/shape is several x slower
        _restore(model, samples[0], kwargs)
    for s in samples:
        start = time.perf_counter()
        restored = _restore(model, s, kwargs)
        seconds = time.perf_counter() - start
        row.images[s.name] = {**score(restored.image.pixels, s.gt.pixels, spec.crop_border,
                                        spec.align),
                              "seconds": seconds, "mp": s.gt.megapixels}
        if planner:
            row.plans[s.name] = "+".join(restored.plan.tasks) or "none"
    log(f"  {label}: {fmt(row.mean('psnr'))} dB")
    return row


def _restore(model: Any, sample: Sample, kwargs: dict[str, Any]) -> Any:
    import torch

    from fapecli.errors import FapeError
    from fapecli.restore import restore_image

    try:
        with torch.inference_mode():
            return restore_image(sample.lq, model, **kwargs)
    except FapeError as exc:
        raise BenchError(f"{sample.name}: {exc}") from None


def planner_available() -> bool:
    try:
        return importlib.util.find_spec("fapecli.planning.rules") is not None
    except ModuleNotFoundError:
        return False


@dataclass
class SetResult:
    spec: BenchSet
    rows: list[Row]
    count: int

    def fape_rows(self) -> list[Row]:
        return [r for r in self.rows if r.kind == "fape"]

    def other_rows(self) -> list[Row]:
        return [r for r in self.rows if r.kind != "fape"]

    def beats(self, row: Row, key: str) -> bool:
        """Whether ``row`` is strictly better than every non-fape row (input included)."""
        mine = row.mean(key)
        others = [r.mean(key) for r in self.other_rows()]
        return mine is not None and all(o is None or mine > o for o in others)

    def best_other(self, key: str) -> Row | None:
        rows = [r for r in self.other_rows() if r.mean(key) is not None]
        return max(rows, key=lambda r: r.mean(key)) if rows else None


def run_set(spec: BenchSet, args: argparse.Namespace, model: Any) -> SetResult:
    samples = load_samples(spec, args.data, args.limit)
    log(f"{spec.name}: {len(samples)} image(s)")
    cache = Cache(spec, enabled=not args.no_cache)
    rows = [run_classical(m, samples, spec, cache) for m in baselines_for(spec, args.bm3d_profile)]
    if model is not None:
        rows.append(run_model(model, samples, spec, planner=False))
        if planner_available():
            rows.append(run_model(model, samples, spec, planner=True))
        if args.ensemble:
            rows.append(run_model(model, samples, spec, planner=False, ensemble=True))
    return SetResult(spec, rows, len(samples))


# ------------------------------------------------------------------------------- reports


def _bold_best(values: list[float | None], digits: int) -> list[str]:
    present = [v for v in values if v is not None]
    best = max(present) if present else None
    return [f"**{fmt(v, digits)}**" if v is not None and v == best else fmt(v, digits)
            for v in values]


def set_table(result: SetResult) -> str:
    keys = METRICS + (UNALIGNED if result.spec.align else ())
    cols = {k: _bold_best([r.mean(k) for r in result.rows], 2 if "psnr" in k else 4)
            for k in keys}
    rows = [[r.method, *(cols[k][i] for k in keys), fmt(r.s_per_mp, 3)]
            for i, r in enumerate(result.rows)]
    unaligned = ["PSNR unaligned", "SSIM unaligned"] if result.spec.align else []
    return md_table(["method", "PSNR", "SSIM", "PSNR-Y", "SSIM-Y", *unaligned, "s/MP"], rows)


def _pair(row: Row | None) -> str:
    return "–" if row is None else f"{fmt(row.mean('psnr'))} / {fmt(row.mean('ssim'), 4)}"


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def summary_table(results: list[SetResult]) -> str:
    ensemble = any(r.ensemble for res in results for r in res.fape_rows())
    headers = ["set", "n", "input", "best classical PSNR", "best classical SSIM",
               "fape (task)", "fape (planner)", *(["fape (ensemble)"] if ensemble else []),
               "beats all: PSNR", "beats all: SSIM"]
    rows = []
    for res in results:
        fape = res.fape_rows()
        single = [r for r in fape if not r.ensemble]
        task_row = single[0] if single else None
        plan_row = single[1] if len(single) > 1 else None
        ens_row = [_pair(next((r for r in fape if r.ensemble), None))] if ensemble else []
        classical = [r for r in res.rows if r.kind == "classical"]
        best_p = max(classical, key=lambda r: r.mean("psnr") or -1e9, default=None)
        best_s = max(classical, key=lambda r: r.mean("ssim") or -1e9, default=None)
        marks = []
        for key in ("psnr", "ssim"):
            marks.append(" / ".join(_mark(res.beats(r, key)) for r in fape) if fape else "–")
        rows.append([
            res.spec.name, res.count, _pair(res.rows[0]),
            "–" if best_p is None else f"{fmt(best_p.mean('psnr'))} ({best_p.method})",
            "–" if best_s is None else f"{fmt(best_s.mean('ssim'), 4)} ({best_s.method})",
            _pair(task_row), _pair(plan_row), *ens_row, *marks,
        ])
    return md_table(headers, rows)


def sets_table(results: list[SetResult]) -> str:
    rows = [[r.spec.name, r.spec.task + "".join(f"+{t}" for t in r.spec.secondary), r.count,
             r.spec.recipe(), r.spec.crop_border] for r in results]
    return md_table(["set", "task", "images", "inputs", "crop border"], rows)


def planner_notes(results: list[SetResult]) -> list[str]:
    notes = []
    for res in results:
        for row in res.fape_rows():
            if row.plans:
                counts: dict[str, int] = {}
                for task in row.plans.values():
                    counts[task] = counts.get(task, 0) + 1
                chosen = ", ".join(f"{t} {n}" for t, n in sorted(counts.items(),
                                                                 key=lambda kv: -kv[1]))
                notes.append(f"- {res.spec.name}: planner chose {chosen} (of {len(row.plans)})")
    return notes


def header(info: dict[str, Any]) -> list[str]:
    m = info["machine"]
    lines = [
        "# fape quality benchmark",
        "",
        f"- Command: `{info['command']}`",
        f"- Date: {info['date']}",
        f"- Machine: nproc {m['nproc']}, {m['cpu']}, load average {m['load_average']} at start"
        f"; Python {m['python']}, torch {m['torch']}, OpenCV {m['opencv']}",
        f"- Threads: torch {THREADS}, OpenCV {THREADS}, BM3D {THREADS}",
    ]
    model = info.get("model")
    if model:
        lines.append(f"- Model: {model['label']} (`{model['weights']}`), sha256 "
                     f"`{model['sha256']}`, {model['parameters']:,} parameters, "
                     f"device {model['device']}, {model['dtype']}")
        for task, sha in (model.get("experts") or {}).items():
            lines.append(f"- Task expert `{task}` (used when the plan is {task} alone): sha256 "
                         f"`{sha}`")
    else:
        lines.append("- Model: not run (--no-model)")
    if not info["planner"]:
        lines.append("- Planner row: not run (fapecli.planning.rules is not present)")
    lines += [
        f"- Metrics: {info['metrics']}. PSNR (dB) and SSIM of every output after 8-bit "
        "rounding (as saved to a PNG), mean over images; RGB = mean over channels; Y = "
        "BT.601 luma (16 + 65.481 R + 128.553 G + 24.966 B) / 255 as BasicSR and FAPE-IR; "
        "grey sets on their grey plane; SSIM: 11x11 Gaussian window σ 1.5, K1 0.01, "
        "K2 0.03, valid filtering (= skimage `structural_similarity(gaussian_weights=True, "
        "sigma=1.5, use_sample_covariance=False, data_range=1)`); SR: crop_border 4.",
        "- s/MP: wall seconds per output megapixel, I/O excluded (planning included for "
        "fape). Cached classical rows keep the timing of the run that computed them.",
        "- Synthetic inputs: made from CBSD68 exactly as the `fape degrade` command shown "
        "(image i of the sorted folder gets seed + i), stored as 8-bit PNG.",
    ]
    return lines


def write_reports(results: list[SetResult], info: dict[str, Any], out: Path) -> None:
    lines = header(info)
    rows = "task / planner / ensemble" if info.get("ensemble") else "task / planner"
    lines += ["", "## Sets", "", sets_table(results), "", "## Summary", "",
              f"PSNR / SSIM (RGB). \"beats all\": the fape row ({rows}) is strictly "
              "better than every non-fape row of the set, the unrestored input included.", "",
              summary_table(results), ""]
    fape_counts = _beat_counts(results)
    if fape_counts:
        lines += [fape_counts, ""]
    notes = planner_notes(results)
    if notes:
        lines += ["Planner decisions:", "", *notes, ""]
    lines += ["## Per set", ""]
    for res in results:
        tasks = "+".join((res.spec.task, *res.spec.secondary))
        lines += [f"### {res.spec.name} ({tasks}, {res.count} images)", "",
                  f"Inputs: {res.spec.recipe()}", "", set_table(res), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    payload = {**info, "sets": [
        {"name": r.spec.name, "task": r.spec.task, "secondary": list(r.spec.secondary),
         "recipe": r.spec.recipe(), "revisions": r.spec.revisions, "source": r.spec.source,
         "seed": r.spec.seed,
         "severity": r.spec.severity, "params": [list(p) for p in r.spec.params],
         "scale": r.spec.scale, "images": r.count,
         "beats_all": {row.method: {k: r.beats(row, k) for k in METRICS}
                       for row in r.fape_rows()},
         "rows": [row.to_dict() for row in r.rows]} for r in results]}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")


def _beat_counts(results: list[SetResult]) -> str:
    with_model = [r for r in results if r.fape_rows()]
    if not with_model:
        return ""
    n = len(with_model)
    p = sum(r.beats(r.fape_rows()[0], "psnr") for r in with_model)
    s = sum(r.beats(r.fape_rows()[0], "ssim") for r in with_model)
    return f"fape (task) beats every other row on {p}/{n} sets in PSNR and {s}/{n} in SSIM."


# ---------------------------------------------------------------------------------- main


def pick_sets(names: str | None) -> list[BenchSet]:
    if not names:
        return list(SETS)
    by_name = {s.name.lower(): s for s in SETS}
    picked = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name.lower() not in by_name:
            raise BenchError(f"unknown set {name!r}; known: {', '.join(s.name for s in SETS)}")
        picked.append(by_name[name.lower()])
    return picked


def load(args: argparse.Namespace, ref: ModelRef | None) -> tuple[Any, dict[str, Any] | None]:
    """The model and its description, or (None, None) with --no-model."""
    if ref is None:
        return None, None
    from fapecli.execution.compact import count_parameters
    from fapecli.loader import load_model

    target = args.model if not Path(args.model).exists() else str(Path(args.model))
    model = load_model(target, device=args.device, precision=args.precision)
    return model, {"name": args.model, "label": ref.label, "weights": str(ref.weights),
                   "sha256": ref.sha256, "experts": ref.experts,
                   "parameters": count_parameters(getattr(model, "base", model)),
                   "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                   help="benchmark data root (holds test/)")
    p.add_argument("--model", default="fape-s", help="model name or checkpoint folder")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.md")
    p.add_argument("--limit", type=int, default=None, help="first N images of each set")
    p.add_argument("--sets", default=None, help="comma-separated set names (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--bm3d-profile", choices=("np", "lc"), default="np",
                   help="BM3D profile: np (default, as bm3d_rgb uses) or lc (faster)")
    p.add_argument("--no-cache", action="store_true", help="recompute classical rows")
    p.add_argument("--cache-from", type=Path, default=None, metavar="JSON",
                   help="seed the classical cache from an earlier report's JSON (e.g. "
                        "bench/results/quality-quick.json) where recipes and settings match")
    p.add_argument("--no-model", action="store_true", help="only the classical rows")
    p.add_argument("--ensemble", action="store_true",
                   help="add a row with test-time self-ensemble (fape restore --ensemble)")
    p.add_argument("--list", action="store_true", help="list the sets and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from fapecli.errors import FapeError

    args = parse_args(argv)
    if args.list:
        for s in SETS:
            print(f"{s.name}\t{s.task}\t{s.recipe()}")
        return 0
    try:
        if not (args.data / "test").is_dir():
            raise BenchError(f"no test/ folder under --data {args.data}")
        if args.limit is not None and args.limit < 1:
            raise BenchError("--limit must be at least 1")
        specs = pick_sets(args.sets)
        if args.cache_from is not None and not args.no_cache:
            seeded = seed_cache(args.cache_from, specs, args.bm3d_profile)
            log(f"seeded {seeded} classical rows from {args.cache_from}")
        ref = None if args.no_model else resolve_model(args.model)
        limit_threads(THREADS)
        model, model_info = load(args, ref)
        info = {"command": command_line(), "date": now(), "machine": machine(),
                "model": model_info, "metrics": METRICS_SOURCE, "threads": THREADS,
                "planner": model is not None and planner_available(), "limit": args.limit,
                "ensemble": model is not None and args.ensemble}
        results = [run_set(spec, args, model) for spec in specs]
    except (BenchError, FapeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_reports(results, info, args.out)
    log(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
