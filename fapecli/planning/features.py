"""The label-free feature pool: one pass of simple pixel statistics, one cue per task.

`extract_features` measures an RGB image (float32 ``H x W x 3`` in [0, 1]; grey images arrive
as three equal channels) and returns a `FeaturePool`: every raw statistic under a dotted name
(``rain.excess``, ``noise.sigma``, ...) and one evidence score in [0, 1] per task of
`fapecli.tasks.TASK_NAMES` (`score_features`). No labels and no learning: each cue is a
physical property of its degradation; the constants were set on the training split and on
synthetic degradations of it (`fapecli.training.degrade`), and are stated here.

Scales. Global cues (exposure, haze, rain, snow) are measured on a copy shrunk by area
averaging to a long side of at most ``WORK_SIDE`` (1024) px; sharpness on a copy of at most
``BLUR_SIDE`` (2048) px, so a 24 MP photo is judged at a 2K viewing scale where demosaicing
softness vanishes (a smear of a few native pixels on a huge image deliberately does not
count); noise and JPEG blocking at native resolution on at most ``NOISE_MAX_BLOCKS`` 16 px
blocks sampled on a grid. Noise levels are in 0-255 units of the native pixels; lengths in
pixels of the working copy.

The cues (Y = BT.601 luma, A = airlight, s(x) = logistic, every score is a product or max of
logistics of the raw statistics):

- low light: mean and 5/50/95/99th percentiles of Y. Dark *and* without highlights:
  ``s(ln(0.17 / mean) / 0.25) * s((0.7 - p99) / 0.08)``. Grey pictures are not special.
- haze: dark channel ``dc = erode(min_c rgb, 1.5 % of the side)``; ``A`` = median Y of the
  brightest 0.5 % of dc. ``index`` = mean of five terms clipped to [0, 1]: veil
  ``(mean(dc) / A - .25) / .45``, lifted blacks ``(p2(min_c rgb) / A - .03) / .3``, local
  contrast ``(.2 - mean(std / mean over windows of 3 % of the side)) / .15``, strongest
  edges ``(.9 - p99(7 px max - min) / A) / .6`` and pale colour ``(.32 - mean HSV
  saturation) / .25`` (colour pictures only: grey ones use the other four). Score
  ``s((index - .71) / .04) * s((A - .45) / .05)``. Top-minus-bottom luminance is reported.
- noise: Immerkaer's estimator ``sqrt(pi / 2) * mean|I * M| / 6`` (M = [1 -2 1; -2 4 -2;
  1 -2 1]) per block, on Y and on the chroma planes B-Y, R-Y; the 10th percentile over
  blocks (flat blocks win) divided by its bias on pure noise (``P10_BIAS``), skipping
  blocks near black or white where noise clips. Per-channel equivalents ``sigma_l =
  sigma_Y / 0.668``, ``sigma_c = sigma_chroma / 1.44`` (iid RGB noise); ``sigma = min(sigma_l,
  max(sigma_c, sigma_l / 2))`` for colour (texture without chroma variation counts at most
  half; JPEG flattens flat blocks, so compressed clean photos stay low), ``sigma_Y`` for
  grey. Score ``s(sigma - 10)``.
- blur: directional bands of Y at 0/45/90/135 degrees with 1-D Gaussians of std 1, 2, 4 px
  (fine ``Y - G1``, mid ``G1 - G2``, coarse ``G2 - G4``), energies per 32 px patch minus
  what white noise of the measured sigma leaves in each band (so noise does not read as
  sharpness). ``fine_ratio`` = min over directions of fine / coarse energy summed over the
  more textured half of the patches: motion blur empties the fine band along its
  direction, defocus along all; ``fine_ratio_p90`` = 90th percentile over those patches of
  their own worst-direction fine / coarse ratio (the sharpest region: a sharp subject on a
  defocused background is not blurred). ``evidence = (fine_ratio / .21)^.7 *
  (fine_ratio_p90 / .4)^.3``, score ``s(-ln(evidence) / 0.08)``. Reported too: ``sharpness``
  (the same 90th percentile for fine / mid), the smeared ``direction``, Laplacian variance,
  gradient percentiles.
- rain: a bright-line detector at 12 orientations (mean along a 17 px line minus the mean
  of the parallel lines 2 px to each side, the smaller of the two, so steps do not
  respond), kept where orientation-selective; the same for dark lines. Rain adds light, so
  bright lines outnumber dark ones along its direction: ``excess`` = bright minus dark line
  pixels (% of the picture) in the best 45 degree sector, ``tiles`` = share of 32 px tiles
  dominated by bright lines of that sector, ``length`` = area-weighted median extent of
  the streak pieces. Also at half scale (wide streaks; kept when stronger and its sector
  holds ``HALF_SHARE`` of the bright lines). Sparse rain ``s((0.233 excess + 1.5 tiles
  - t) / 0.1) * s((length - 10) / 2)`` with ``t`` = 0.85, or 1.1 when the half scale was
  kept (coarse bright lines - stems, poles - are commoner than fine ones); dense rain
  (streaks overlap, both polarities line up): ``dense`` = (line density in the best
  sector, %) x (its share of all lines) at half scale, ``s((dense - 14) / 1.5)``. Each
  times the fall prior ``s((55 - |angle - 90|) / 5)`` (rain within about 45 degrees of
  vertical); the score is the larger. Peak share and anisotropy of the 18-bin
  magnitude-weighted gradient-orientation histogram of high-pass Y are reported.
- snow: difference-of-Gaussian extrema at scales 1, 2, 3.5 px, kept when compact (Hessian
  eigenvalue ratio < 3) and isolated (a ring of radius 2.5 s + 1 around them is flat: std
  below a third of the blob's contrast). Flakes add light: ``excess`` = s^2-weighted count
  of bright minus dark blobs per 10^5 px, ``flat_excess`` the same on flat background
  (where the picture without its small spots varies by < 0.02), ``ratio`` = bright share,
  ``white`` = share of bright blobs with saturation < 0.2 (flakes are white; 1 for grey).
  Score ``s(((excess + flat_excess) / 2 - 1150) / 100) * s((ratio - .65) / .04) *
  s((white - .3) / .08)``.
- super-resolution: ``side = sqrt(h w)`` of the original size and JPEG ``blockiness`` (mean
  step across the 8 px grid over the mean step elsewhere). Score ``max(s(6 log2(200 /
  side)), s(6 log2(320 / side)) * s((blockiness - 1.3) / 0.1))``: thumbnails need
  upscaling; a 200-400 px picture only when it also shows compression blocks, so a clean
  481 x 321 photo is not "sr" for its size alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cache
from time import perf_counter
from typing import Any

import cv2
import numpy as np

from fapecli.tasks import TASK_NAMES

WORK_SIDE = 1024  # long side for the global cues
BLUR_SIDE = 2048  # long side at most for the sharpness cue
NOISE_BLOCK = 16  # block side for noise and blocking (a multiple of 8)
NOISE_MAX_BLOCKS = 4096  # blocks sampled at native resolution
HALF_SHARE = 0.4  # min share of bright lines in the rain sector for the half-scale streaks
P10_BIAS = 0.888  # 10th percentile / true sigma of the per-block estimate on pure noise
LUMA = np.array([0.299, 0.587, 0.114], np.float32)

_LINE_LEN = 17  # rain line-detector length (px at the working scale)
_LINE_GAP = 2.0  # distance of the side lines
_ORIENTS = 12  # rain orientations over 180 degrees
_SNOW_SCALES = (1.0, 2.0, 3.5)


@dataclass
class FeaturePool:
    """Every measured statistic, one evidence score per task, and what it cost."""

    raw: dict[str, float]  # dotted names, e.g. "rain.excess", "noise.sigma"
    scores: dict[str, float]  # task name -> evidence in [0, 1]
    size: tuple[int, int]  # original (height, width)
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)  # scales used, grey flag

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hints(self, threshold: float = 0.3) -> list[str]:
        """Short textual hints (for a language-model planner), strongest evidence first."""
        ranked = sorted(self.scores.items(), key=lambda kv: -kv[1])
        return [f"{task}: {score:.2f}" for task, score in ranked if score >= threshold]


# ----------------------------------------------------------------------------- helpers


def sigmoid(x: float) -> float:
    """The logistic function, safe for large arguments."""
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, x))))


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an ``H x W x 3`` float image."""
    return np.ascontiguousarray(rgb @ LUMA, dtype=np.float32)


def shrink(image: np.ndarray, side: int) -> np.ndarray:
    """Area-average ``image`` down to a long side of at most ``side`` (never enlarges)."""
    h, w = image.shape[:2]
    s = side / max(h, w)
    if s >= 1.0:
        return image
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _as_rgb(rgb: np.ndarray) -> np.ndarray:
    a = np.asarray(rgb)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an H x W x 3 image, got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    return np.ascontiguousarray(a, dtype=np.float32)


def _is_grey(rgb: np.ndarray) -> bool:
    """Equal channels, up to compression wobble (99 % of pixels within 2 levels)."""
    spread = np.abs(rgb - rgb[:, :, 1:2]).max(axis=2)
    return float(np.percentile(spread, 99)) < 2 / 255


def _percentiles(a: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    return [float(v) for v in np.percentile(a, qs)]


# ----------------------------------------------------------------------------- size / SR


def _blocks(rgb: np.ndarray) -> np.ndarray:
    """Up to NOISE_MAX_BLOCKS native blocks of (B + 2) px on the 8 px grid, as N x b x b x 3."""
    b = NOISE_BLOCK
    h, w = rgb.shape[:2]
    ny, nx = (h - 2) // b, (w - 2) // b
    if ny < 1 or nx < 1:
        pad = cv2.copyMakeBorder(rgb, 0, max(0, b + 2 - h), 0, max(0, b + 2 - w),
                                 cv2.BORDER_REFLECT)
        return _blocks(pad)
    step = max(1, math.ceil(math.sqrt(ny * nx / NOISE_MAX_BLOCKS)))
    ys = np.arange(0, ny, step) * b
    xs = np.arange(0, nx, step) * b
    idx = np.arange(b + 2)
    rows = (ys[:, None] + idx[None, :])[:, None, :, None]
    cols = (xs[:, None] + idx[None, :])[None, :, None, :]
    out = rgb[rows, cols]  # ny x nx x b+2 x b+2 x 3
    return out.reshape(-1, b + 2, b + 2, 3)


def _size_cues(size: tuple[int, int], blocks_y: np.ndarray) -> dict[str, float]:
    h, w = size
    # JPEG blocking: steps across the 8 px grid (block rows/columns 7|8 and 15|16, blocks
    # start on the grid) against the steps elsewhere.
    dx = np.abs(np.diff(blocks_y, axis=2)).mean(axis=(0, 1))
    dy = np.abs(np.diff(blocks_y, axis=1)).mean(axis=(0, 2))
    steps = dx + dy
    grid = [7, 15]
    on = float(steps[grid].mean())
    off = float(np.delete(steps, grid).mean()) + 1e-6
    return {
        "size.height": float(h),
        "size.width": float(w),
        "size.side": math.sqrt(h * w),
        "size.megapixels": h * w / 1e6,
        "sr.blockiness": float(on / off),
    }


# ----------------------------------------------------------------------------- noise


def _immerkaer(planes: np.ndarray) -> np.ndarray:
    """Per-block Immerkaer sigma of N x (b+2) x (b+2) planes (interior residuals)."""
    p = planes
    r = (p[:, :-2, :-2] + p[:, :-2, 2:] + p[:, 2:, :-2] + p[:, 2:, 2:]
         - 2 * (p[:, 1:-1, :-2] + p[:, 1:-1, 2:] + p[:, :-2, 1:-1] + p[:, 2:, 1:-1])
         + 4 * p[:, 1:-1, 1:-1])
    return math.sqrt(math.pi / 2) * np.abs(r).mean(axis=(1, 2)) / 6.0


def _noise_cues(blocks: np.ndarray, grey: bool) -> dict[str, float]:
    y = blocks @ LUMA
    clipped = ((y <= 1 / 255) | (y >= 254 / 255)).mean(axis=(1, 2))
    keep = clipped <= 0.01
    if keep.sum() < 8:
        keep = np.ones_like(keep)
    sy = _immerkaer(y)
    sig0 = float(np.percentile(sy[keep], 10)) / P10_BIAS
    # second pass: drop blocks whose level is within 2 sigma of black or white (clipped noise)
    level = y.mean(axis=(1, 2))
    unclipped = keep & (level > 2 * sig0) & (level < 1 - 2 * sig0)
    if unclipped.sum() >= 8:
        keep = unclipped
    sig_y = float(np.percentile(sy[keep], 10)) / P10_BIAS * 255
    if grey:
        sig_c = 0.0
        sigma = sig_y
    else:
        cb = _immerkaer(blocks[..., 2] - y)[keep]
        cr = _immerkaer(blocks[..., 0] - y)[keep]
        sig_c = float(np.percentile(np.hypot(cb, cr), 10)) / P10_BIAS * 255
        sig_l = sig_y / 0.668
        sigma = min(sig_l, max(sig_c / 1.44, sig_l / 2))
    return {
        "noise.sigma_luma": sig_y,
        "noise.sigma_chroma": sig_c,
        "noise.sigma": sigma,
        "noise.blocks": float(keep.sum()),
    }


def _luma_noise(raw: dict[str, float], grey: bool) -> float:
    """Luma noise std (0-1 units) believed to be noise rather than texture."""
    sig_y = raw["noise.sigma_luma"]
    if not grey:
        sig_y = min(sig_y, raw["noise.sigma"] * 0.668)
    return sig_y / 255


# ----------------------------------------------------------------------------- blur


_BAND_STDS = (1.0, 2.0, 4.0)  # Gaussian stds (px) splitting the fine, mid and coarse bands


def _gauss_1d(std: float, step: float) -> np.ndarray:
    r = math.ceil(3 * std / step)
    k = np.exp(-((np.arange(-r, r + 1) * step) ** 2) / (2 * std * std)).astype(np.float32)
    return k / k.sum()


def _smooth_along(y: np.ndarray, std: float, d: int) -> np.ndarray:
    """1-D Gaussian smoothing along 0, 135, 90 or 45 degrees (d = 0, 1, 2, 3)."""
    if d % 2 == 0:
        k = _gauss_1d(std, 1.0)
        one = np.ones(1, np.float32)
        kx, ky = (k, one) if d == 0 else (one, k)
        return cv2.sepFilter2D(y, -1, kx, ky, borderType=cv2.BORDER_REFLECT)
    k = _gauss_1d(std, math.sqrt(2))
    kernel = np.diag(k) if d == 1 else np.fliplr(np.diag(k))
    return cv2.filter2D(y, -1, kernel, borderType=cv2.BORDER_REFLECT)


def _bands(y: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fine, mid and coarse directional bands: y - G1, G1 - G2, G2 - G4 along direction d."""
    g = [_smooth_along(y, std, d) for std in _BAND_STDS]
    return y - g[0], g[0] - g[1], g[1] - g[2]


@cache
def _band_noise_gain(d: int) -> tuple[float, float, float]:
    """Energy that unit white noise leaves in each directional band."""
    imp = np.zeros((61, 61), np.float32)
    imp[30, 30] = 1
    return tuple(float((b**2).sum()) for b in _bands(imp, d))  # type: ignore[return-value]


def _patch_mean(a: np.ndarray, p: int) -> np.ndarray:
    h, w = a.shape
    hb, wb = max(1, h // p), max(1, w // p)
    a = a[: hb * p, : wb * p]
    return a.reshape(hb, a.shape[0] // hb, wb, a.shape[1] // wb).mean(axis=(1, 3)).ravel()


def _blur_cues(y: np.ndarray, sigma: float) -> dict[str, float]:
    p = 32 if min(y.shape) >= 64 else max(4, min(y.shape) // 2)
    energy = np.zeros((3, 4, 0)).tolist()  # band x direction -> patch energies
    for d in range(4):
        gains = _band_noise_gain(d)
        for j, band in enumerate(_bands(y, d)):
            energy[j][d] = _patch_mean(band**2, p) - gains[j] * sigma**2
    fine = np.clip(np.array(energy[0]), 0, None)
    mid = np.maximum(np.array(energy[1]), 1e-12)
    coarse = np.maximum(np.array(energy[2]), 1e-12)
    active = coarse.sum(axis=0) >= np.median(coarse.sum(axis=0))
    # per patch the most smeared direction among those with structure
    ratio = fine / mid
    worst = np.where(mid >= 0.25 * mid.max(axis=0), ratio, np.inf).min(axis=0)
    sharp = float(np.percentile(worst[active], 90)) if active.any() else 0.0
    per_dir = fine[:, active].sum(axis=1) / coarse[:, active].sum(axis=1)
    worst_fc = np.where(coarse >= 0.25 * coarse.max(axis=0), fine / coarse, np.inf).min(axis=0)
    region = float(np.percentile(worst_fc[active], 90)) if active.any() else 0.0
    gs = cv2.GaussianBlur(y, (0, 0), 1.0)
    gx = cv2.Sobel(gs, cv2.CV_32F, 1, 0, ksize=3)
    grad = np.hypot(gx, cv2.Sobel(gs, cv2.CV_32F, 0, 1, ksize=3))
    lap = cv2.Laplacian(y, cv2.CV_32F, ksize=3)
    return {
        "blur.fine_ratio": float(per_dir.min()),
        "blur.fine_ratio_p90": region,
        "blur.sharpness": sharp,
        # most smeared direction, degrees counter-clockwise from horizontal (as rain.angle)
        "blur.direction": float((0, 135, 90, 45)[int(per_dir.argmin())]),
        "blur.anisotropy": float(1 - per_dir.min() / max(per_dir.max(), 1e-12)),
        "blur.lap_var": float(lap.var()) * 1e3,
        "blur.grad_p95": float(np.percentile(grad, 95)) / 8,
        "blur.grad_p99": float(np.percentile(grad, 99)) / 8,
    }


# ----------------------------------------------------------------------------- exposure, haze


def _exposure_cues(y: np.ndarray) -> dict[str, float]:
    p5, p50, p95, p99 = _percentiles(y, (5, 50, 95, 99))
    return {
        "light.mean": float(y.mean()),
        "light.median": p50,
        "light.p5": p5,
        "light.p95": p95,
        "light.p99": p99,
    }


def _haze_cues(rgb: np.ndarray, y: np.ndarray, grey: bool) -> dict[str, float]:
    h, w = y.shape
    mn = rgb.min(axis=2)
    mx = rgb.max(axis=2)
    k = max(3, round(max(h, w) * 0.015) | 1)
    dc = cv2.erode(mn, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
    top = dc >= np.percentile(dc, 99.5)
    airlight = max(float(np.median(y[top])), 0.05)
    sat = 0.0 if grey else float(((mx - mn) / np.maximum(mx, 1e-3)).mean())
    kk = max(5, round(max(h, w) * 0.03) | 1)
    m1 = cv2.blur(y, (kk, kk))
    m2 = cv2.blur(y * y, (kk, kk))
    lc = float((np.sqrt(np.maximum(m2 - m1 * m1, 0)) / np.maximum(m1, 0.05)).mean())
    dcn = float(dc.mean()) / airlight
    ker = np.ones((7, 7), np.uint8)
    edge = float(np.percentile(cv2.dilate(y, ker) - cv2.erode(y, ker), 99)) / airlight
    floor = float(np.percentile(mn, 2)) / airlight
    third = max(1, h // 3)
    return {
        "haze.dark_channel": float(dc.mean()),
        "haze.dark_channel_norm": dcn,
        "haze.airlight": airlight,
        "haze.floor": floor,
        "haze.saturation": sat,
        "haze.local_contrast": lc,
        "haze.edge_contrast": edge,
        "haze.top_minus_bottom": float(y[:third].mean() - y[-third:].mean()),
    }


# ----------------------------------------------------------------------------- rain


@cache
def _line_kernels() -> tuple[np.ndarray, ...]:
    """Anti-aliased unit-sum line kernels, orientation i * 180 / _ORIENTS degrees."""
    n, c = _LINE_LEN, _LINE_LEN // 2
    kernels = []
    for i in range(_ORIENTS):
        th = i * math.pi / _ORIENTS
        k = np.zeros((n, n), np.float32)
        for t in np.linspace(-c, c, 4 * n):
            x, y = c + t * math.cos(th), c - t * math.sin(th)
            x0, y0 = math.floor(x), math.floor(y)
            fx, fy = x - x0, y - y0
            for dx, dy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                               (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
                if 0 <= x0 + dx < n and 0 <= y0 + dy < n:
                    k[y0 + dy, x0 + dx] += wt
        kernels.append(k / k.sum())
    return tuple(kernels)


def _shift(a: np.ndarray, dx: float, dy: float) -> np.ndarray:
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(a, m, (a.shape[1], a.shape[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


def _line_responses(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bright- and dark-line responses, each ``_ORIENTS x H x W``."""
    bright, dark = [], []
    for i, k in enumerate(_line_kernels()):
        th = i * math.pi / _ORIENTS
        m = cv2.filter2D(y, -1, k, borderType=cv2.BORDER_REFLECT)
        nx, ny = math.sin(th) * _LINE_GAP, math.cos(th) * _LINE_GAP
        a, b = _shift(m, nx, ny), _shift(m, -nx, -ny)
        bright.append(np.minimum(m - a, m - b))
        dark.append(np.minimum(a - m, b - m))
    return np.stack(bright), np.stack(dark)


def _selective(resp: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Best orientation per pixel and where the response is strong and orientation-selective."""
    n = resp.shape[0]
    best = resp.argmax(axis=0)
    top = resp.max(axis=0)

    def at(offset: int) -> np.ndarray:
        return np.take_along_axis(resp, ((best + offset) % n)[None], axis=0)[0]

    side = np.maximum(at(n // 4), at(-(n // 4)))
    ok = (top > tau) & (at(n // 2) < 0.3 * top) & (side < 0.6 * top)
    return best, ok


def _tile_counts(mask: np.ndarray, label: np.ndarray, t: int) -> np.ndarray:
    h, w = mask.shape
    hb, wb = max(1, h // t), max(1, w // t)
    tt_h, tt_w = h // hb, w // wb
    m = mask[: hb * tt_h, : wb * tt_w].reshape(hb, tt_h, wb, tt_w).transpose(0, 2, 1, 3)
    lab = label[: hb * tt_h, : wb * tt_w].reshape(hb, tt_h, wb, tt_w).transpose(0, 2, 1, 3)
    m = m.reshape(hb * wb, -1)
    lab = lab.reshape(hb * wb, -1)
    return np.stack([(m & (lab == k)).sum(axis=1) for k in range(_ORIENTS)], axis=1)


def _streak_length(mask: np.ndarray) -> float:
    """Area-weighted median extent (px) of the connected streak pieces in ``mask``."""
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    stats = stats[1:]
    if stats.shape[0] == 0:
        return 0.0
    extent = np.hypot(stats[:, 2], stats[:, 3])
    area = stats[:, 4].astype(np.float64)
    order = np.argsort(extent)
    cum = np.cumsum(area[order]) / area.sum()
    return float(extent[order][min(int(np.searchsorted(cum, 0.5)), len(order) - 1)])


def _orientation_histogram(y: np.ndarray) -> tuple[float, float]:
    """Peak share (3 of 18 bins) and anisotropy of the gradient orientations of high-pass Y."""
    hp = y - cv2.GaussianBlur(y, (0, 0), 2.0)
    gx = cv2.Sobel(hp, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(hp, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.hypot(gx, gy)
    ang = np.arctan2(gy, gx) % np.pi
    hist, _ = np.histogram(ang, bins=18, range=(0, np.pi), weights=mag)
    hist = hist / max(float(hist.sum()), 1e-12)
    k = int(hist.argmax())
    peak = float(hist[k] + hist[k - 1] + hist[(k + 1) % 18])
    aniso = 1.0 - float(hist[(k + 9) % 18]) / max(float(hist[k]), 1e-12)
    return peak, aniso


def _streaks_at(y: np.ndarray, sigma: float) -> dict[str, float]:
    """Bright-versus-dark oriented line statistics of one scale."""
    tau = max(0.03, 1.2 * sigma)
    bright, dark = _line_responses(y)
    bb, sb = _selective(bright, tau)
    bd, sd = _selective(dark, tau)
    hb = np.bincount(bb[sb], minlength=_ORIENTS) / sb.size
    hd = np.bincount(bd[sd], minlength=_ORIENTS) / sd.size
    ex = hb - hd
    k = int(np.argmax(ex + np.roll(ex, 1) + np.roll(ex, -1)))
    sector = [(k - 1) % _ORIENTS, k, (k + 1) % _ORIENTS]
    t = 32 if min(y.shape) >= 96 else max(8, min(y.shape) // 3)
    cb = _tile_counts(sb, bb, t)
    cd = _tile_counts(sd, bd, t)
    nb, nd = cb[:, sector].sum(axis=1), cd[:, sector].sum(axis=1)
    votes = (nb >= max(6, t * t * 0.006)) & (nb >= 2 * nd) & (nb >= 0.5 * cb.sum(axis=1))
    both = hb + hd  # dense rain: bright and dark lines alike, all along one orientation
    kk = int(np.argmax(both + np.roll(both, 1) + np.roll(both, -1)))
    dense = both[[(kk - 1) % _ORIENTS, kk, (kk + 1) % _ORIENTS]].sum()
    # line orientation: 0 = horizontal, 90 = vertical (degrees, counter-clockwise)
    return {
        "rain.dense": float(dense * 100 * dense / max(float(both.sum()), 1e-12)),
        "rain.dense_angle": float(kk * 180 / _ORIENTS),
        "rain.excess": float(ex[sector].sum()) * 100,
        "rain.tiles": float(votes.mean()),
        "rain.share": float(hb[sector].sum() / max(float(hb.sum()), 1e-12)),
        "rain.angle": float(k * 180 / _ORIENTS),
        "rain.length": _streak_length(sb & np.isin(bb, sector)),
    }


def _rain_cues(y: np.ndarray, sigma: float) -> dict[str, float]:
    """Streak statistics at the working scale and at half of it (wide streaks); the
    scale with the stronger evidence is kept (lengths in working-scale pixels)."""
    best = _streaks_at(y, sigma)
    best["rain.scale"] = 1.0
    if min(y.shape) >= 128:
        half = _streaks_at(cv2.pyrDown(y), sigma / 2)
        half["rain.length"] *= 2
        best["rain.dense"], best["rain.dense_angle"] = half["rain.dense"], half["rain.dense_angle"]
        # coarse bright lines (stems, edges of bright objects) are common: the coarse scale
        # counts only when its streaks also share one orientation
        if rain_evidence(half) > rain_evidence(best) and half["rain.share"] >= HALF_SHARE:
            best = half | {"rain.scale": 2.0}
    peak, aniso = _orientation_histogram(y)
    return best | {"rain.peak_share": peak, "rain.anisotropy": aniso}


# ----------------------------------------------------------------------------- snow


def _flat_background(y: np.ndarray) -> np.ndarray:
    """Where the picture without its small spots (open-close, 7 px) is locally flat."""
    ker = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    bg = cv2.morphologyEx(cv2.morphologyEx(y, cv2.MORPH_OPEN, ker), cv2.MORPH_CLOSE, ker)
    m1 = cv2.blur(bg, (15, 15))
    m2 = cv2.blur(bg * bg, (15, 15))
    std = np.sqrt(np.maximum(m2 - m1 * m1, 0))
    return (std < 0.02) & (bg > 0.02) & (bg < 0.9)


def _isolated_blobs(y: np.ndarray, s: float, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Isolated, compact bright and dark difference-of-Gaussian blobs at scale s.

    Returns the (row, col) index arrays of the bright and of the dark blobs.
    """
    g1 = cv2.GaussianBlur(y, (0, 0), s)
    dog = g1 - cv2.GaussianBlur(y, (0, 0), 2.5 * s)
    k = 2 * math.ceil(1.5 * s) + 1
    ker = np.ones((k, k), np.uint8)
    dxx = cv2.Sobel(g1, cv2.CV_32F, 2, 0, ksize=3)
    dyy = cv2.Sobel(g1, cv2.CV_32F, 0, 2, ksize=3)
    dxy = cv2.Sobel(g1, cv2.CV_32F, 1, 1, ksize=3)
    det = dxx * dyy - dxy**2
    compact = (det > 0) & ((dxx + dyy) ** 2 < det * 16 / 3)  # eigenvalue ratio < 3
    r = 2.5 * s + 1.0
    pad = math.ceil(r) + 1
    ang = np.arange(12) * 2 * math.pi / 12
    dx = np.round(r * np.cos(ang)).astype(int)
    dy = np.round(r * np.sin(ang)).astype(int)
    smooth = cv2.GaussianBlur(y, (0, 0), max(0.5, 0.5 * s))
    found = []
    for sign, extreme in ((1, cv2.dilate(dog, ker)), (-1, cv2.erode(dog, ker))):
        m = (dog == extreme) & (sign * dog > tau) & compact
        m[:pad], m[-pad:], m[:, :pad], m[:, -pad:] = False, False, False, False
        yy, xx = np.nonzero(m)
        ring = smooth[yy[:, None] + dy[None], xx[:, None] + dx[None]]
        contrast = sign * (smooth[yy, xx] - ring.mean(axis=1))
        iso = (contrast > tau) & (ring.std(axis=1) < contrast / 3)
        found.append(np.stack([yy[iso], xx[iso]]))
    return found[0], found[1]


def _snow_cues(rgb: np.ndarray, y: np.ndarray, sigma: float, grey: bool) -> dict[str, float]:
    area = y.size / 1e5
    flat = _flat_background(y)
    flat_area = max(float(flat.sum()), 1.0) / 1e5
    mx = rgb.max(axis=2)
    sat = (mx - rgb.min(axis=2)) / np.maximum(mx, 1e-3)
    nb = nd = fb = fd = white = 0.0
    raw: dict[str, float] = {}
    for s in _SNOW_SCALES:
        (by, bx), (dy, dx) = _isolated_blobs(y, s, max(0.02, 3 * sigma / s))
        w = s * s
        nb, nd = nb + by.size * w, nd + dy.size * w
        fb, fd = fb + flat[by, bx].sum() * w, fd + flat[dy, dx].sum() * w
        white += (by.size if grey else (sat[by, bx] < 0.2).sum()) * w
        raw[f"snow.bright_s{s:g}"] = by.size / area
    raw["snow.excess"] = (nb - nd) / area
    raw["snow.ratio"] = (nb + 1) / (nb + nd + 2)
    raw["snow.flat_share"] = flat_area / area
    raw["snow.flat_excess"] = (fb - fd) / flat_area
    raw["snow.white"] = white / max(nb, 1.0)
    return raw


# ----------------------------------------------------------------------------- scores


def haze_index(raw: dict[str, float]) -> float:
    """Mean of the clipped haze terms: veil, lifted blacks, low contrast, pale colour."""
    terms = [
        (raw["haze.dark_channel_norm"] - 0.25) / 0.45,
        (raw["haze.floor"] - 0.03) / 0.3,
        (0.2 - raw["haze.local_contrast"]) / 0.15,
        (0.9 - raw["haze.edge_contrast"]) / 0.6,
    ]
    if not raw["color.grey"]:
        terms.append((0.32 - raw["haze.saturation"]) / 0.25)
    return float(np.mean(np.clip(terms, 0.0, 1.0)))


def rain_evidence(raw: dict[str, float]) -> float:
    """Bright-line excess and tile support combined (about 0.85 at the decision point)."""
    return 0.233 * raw["rain.excess"] + 1.5 * raw["rain.tiles"]


def blur_evidence(raw: dict[str, float]) -> float:
    """Fine-to-coarse energy of the most smeared direction, over the whole picture (weight
    0.7) and in its sharpest region (0.3), each over its decision point (1 = the edge)."""
    whole = max(raw["blur.fine_ratio"], 1e-6) / 0.21
    region = max(raw["blur.fine_ratio_p90"], 1e-6) / 0.4
    return whole**0.7 * region**0.3


def snow_evidence(raw: dict[str, float]) -> float:
    """Bright-blob excess over the whole picture and over its flat background, averaged."""
    return 0.5 * (raw["snow.excess"] + raw["snow.flat_excess"])


def _fall_prior(angle: float) -> float:
    """Rain falls within about 45 degrees of vertical (angle 90)."""
    return sigmoid((55 - abs(angle - 90)) / 5)


def rain_scores(raw: dict[str, float]) -> tuple[float, float]:
    """Evidence of sparse streaks (bright lines outnumber dark) and of dense parallel ones."""
    need = 0.85 if raw["rain.scale"] == 1 else 1.1  # coarse bright lines are commoner
    sparse = (sigmoid((rain_evidence(raw) - need) / 0.1) * sigmoid((raw["rain.length"] - 10) / 2)
              * _fall_prior(raw["rain.angle"]))
    dense = sigmoid((raw["rain.dense"] - 14) / 1.5) * _fall_prior(raw["rain.dense_angle"])
    return sparse, dense


def score_features(raw: dict[str, float]) -> dict[str, float]:
    """Normalised evidence in [0, 1] per task from the raw pool (see the module docstring)."""
    light = sigmoid((math.log(0.17) - math.log(max(raw["light.mean"], 1e-4))) / 0.25)
    light *= sigmoid((0.7 - raw["light.p99"]) / 0.08)
    haze = sigmoid((haze_index(raw) - 0.71) / 0.04) * sigmoid((raw["haze.airlight"] - 0.45) / 0.05)
    noise = sigmoid((raw["noise.sigma"] - 10.0) / 1.0)
    blur = sigmoid(-math.log(blur_evidence(raw)) / 0.08)
    rain = max(rain_scores(raw))
    snow = (sigmoid((snow_evidence(raw) - 1150) / 100) * sigmoid((raw["snow.ratio"] - 0.65) / 0.04)
            * sigmoid((raw["snow.white"] - 0.3) / 0.08))
    side = raw["size.side"]
    small = sigmoid(6 * math.log2(200 / side))
    mid = sigmoid(6 * math.log2(320 / side)) * sigmoid((raw["sr.blockiness"] - 1.3) / 0.1)
    sr = max(small, mid)
    scores = {"derain": rain, "desnow": snow, "dehaze": haze, "deblur": blur,
              "denoise": noise, "lowlight": light, "sr": sr}
    return {t: round(float(scores[t]), 4) for t in TASK_NAMES}


# ----------------------------------------------------------------------------- entry point


def extract_features(rgb: np.ndarray, *, size: tuple[int, int] | None = None) -> FeaturePool:
    """Measure the label-free feature pool of one image.

    rgb: float32 ``H x W x 3`` in [0, 1] (uint8/uint16, grey ``H x W`` and RGBA accepted).
    size: the original (height, width) when ``rgb`` is a reduced copy; drives the
        super-resolution cue (noise and sharpness are measured on the pixels given).
    """
    t0 = perf_counter()
    rgb = _as_rgb(rgb)
    h, w = rgb.shape[:2]
    size = (int(size[0]), int(size[1])) if size is not None else (h, w)
    mid = shrink(rgb, BLUR_SIDE)
    work = shrink(mid, WORK_SIDE)
    grey = _is_grey(work)
    blocks = _blocks(rgb)
    raw: dict[str, float] = {}
    raw.update(_size_cues(size, blocks @ LUMA))
    raw.update(_noise_cues(blocks, grey))
    sig = _luma_noise(raw, grey)
    f_mid, f_work = max(h, w) / max(mid.shape[:2]), max(h, w) / max(work.shape[:2])
    raw.update(_blur_cues(luma(mid), sig / f_mid))
    y = luma(work)
    raw.update(_exposure_cues(y))
    raw.update(_haze_cues(work, y, grey))
    raw.update(_rain_cues(y, sig / f_work))
    raw.update(_snow_cues(work, y, sig / f_work, grey))
    raw["color.grey"] = float(grey)
    raw["haze.index"] = haze_index(raw)
    raw["rain.evidence"] = rain_evidence(raw)
    raw["snow.evidence"] = snow_evidence(raw)
    raw["blur.evidence"] = blur_evidence(raw)
    raw = {k: round(float(v), 6) for k, v in raw.items()}
    meta = {"work_side": max(work.shape[:2]), "blur_side": max(mid.shape[:2]), "grey": grey}
    return FeaturePool(raw, score_features(raw), size, perf_counter() - t0, meta)
