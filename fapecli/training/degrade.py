"""Seeded, reproducible synthesis of the seven degradations of `fapecli.tasks`.

Images are float32 ``H x W x 3`` RGB arrays in [0, 1]. Every function draws all its randomness
from a `numpy.random.Generator`, so the same seed and the same arguments give bit-identical
output, and returns the parameters it actually used as plain JSON values (for sidecars).

Per degradation there is one public function ``add_<name>(image, rng, **params)`` returning
``(image, params)``. A parameter left as ``None`` is sampled from its range in
`DEFAULT_RANGES`: uniformly (log-uniformly for ``log`` ranges) when ``severity`` is ``None``,
or set to ``mild + severity * (severe - mild)`` (geometric for ``log`` ranges) when a
``severity`` in [0, 1] is given. Ranges marked ``severity=False`` (orientations, shapes,
colours) are always sampled. Lengths and sizes are in pixels of the input image.

`degrade` applies one or several degradations in a physically sensible order (`ORDER`:
resolution and optics first, then atmosphere and weather, then the sensor: exposure and
noise, then compression); `random_degradation` is the wide random sampler for training;
`degrade_tensor` does the same for a ``B x 3 x H x W`` torch batch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple

import cv2
import numpy as np

from fapecli.errors import UsageError
from fapecli.resample import upsample
from fapecli.tasks import DEGRADATIONS, NONE, get_task

if TYPE_CHECKING:
    import torch

Params = dict[str, Any]
RngLike = np.random.Generator | int | None


class DegradationError(UsageError, ValueError):
    """Bad degradation name, parameter or value (a `ValueError` and a CLI usage error)."""


class Range(NamedTuple):
    """A parameter range from its ``mild`` to its ``severe`` end."""

    mild: float
    severe: float
    log: bool = False  # sample / interpolate geometrically
    integer: bool = False  # round to an int (sampled uniformly over the integers)
    severity: bool = True  # False: independent of severity, always sampled

    def at(self, s: float) -> float:
        """The value at severity ``s`` in [0, 1]."""
        if self.log:
            v = self.mild * (self.severe / self.mild) ** s
        else:
            v = self.mild + (self.severe - self.mild) * s
        return float(round(v)) if self.integer else float(v)

    def sample(self, rng: np.random.Generator) -> float:
        """A random value over the whole range."""
        if self.integer:
            lo, hi = sorted((int(self.mild), int(self.severe)))
            return float(rng.integers(lo, hi + 1))
        return self.at(float(rng.random()))


DEFAULT_RANGES: dict[str, dict[str, Range]] = {
    "noise": {
        "sigma": Range(1.0, 55.0),  # Gaussian std in 0-255 units
        "peak": Range(1000.0, 10.0, log=True),  # photons at white when poisson is on
        "channel_correlated": Range(0.0, 1.0, severity=False),  # 0 colour, 1 grey noise
    },
    "blur": {
        "size": Range(7, 31, integer=True),  # motion kernel support (odd)
        "shake": Range(0.0, 1.0, severity=False),  # motion trajectory irregularity
        "sigma": Range(0.5, 4.5),  # gaussian std along the major axis
        "aspect": Range(1.0, 0.3, severity=False),  # gaussian minor/major std
        "radius": Range(1.0, 7.0),  # defocus disk radius
    },
    "haze": {
        "beta": Range(0.3, 3.0),  # scattering coefficient on a [near, 1] pseudo-depth
        "airlight": Range(0.7, 1.0, severity=False),  # atmospheric light brightness
        "near": Range(0.0, 0.35, severity=False),  # pseudo-depth of the closest pixels
    },
    "rain": {
        "density": Range(0.02, 0.35, log=True),  # streak area fraction per layer
        "length": Range(8.0, 60.0, log=True, severity=False),  # streak length (px)
        "width": Range(0.5, 2.0, severity=False),  # streak cross-section std (px)
        "angle": Range(-40.0, 40.0, severity=False),  # degrees from vertical
        "brightness": Range(0.4, 0.95),  # streak opacity
        "layers": Range(1, 3, integer=True),  # streak layers
        "veil": Range(0.0, 0.25),  # rain-accumulation haze
    },
    "snow": {
        "density": Range(0.01, 0.2, log=True),  # flake area fraction, all layers
        "size": Range(2.5, 10.0),  # radius of the nearest, largest flakes (px)
        "layers": Range(2, 4, integer=True),  # depth layers, small/dense to large/sparse
        "opacity": Range(0.6, 1.0),
        "motion": Range(0.0, 4.0, severity=False),  # fall streak length of small flakes
        "angle": Range(-30.0, 30.0, severity=False),  # fall direction from vertical
        "veil": Range(0.0, 0.3),
    },
    "lowlight": {
        "gamma": Range(1.1, 2.6),
        "exposure": Range(0.7, 0.08, log=True),
        "peak": Range(2000.0, 60.0, log=True),  # photons at full scale (shot noise)
        "read_noise": Range(0.001, 0.015, log=True),  # read-noise std in [0, 1] units
        "cast": Range(0.0, 0.15, severity=False),  # white-balance error (log-gain)
        "bits": Range(8, 6, integer=True, severity=False),  # quantisation; random: 8 at 70 %
    },
    "lowres": {"scale": Range(2, 4, integer=True)},
    "jpeg": {"quality": Range(95, 20, integer=True)},
}

SEVERITY_LEVELS: dict[str, float] = {
    "mild": 0.2, "light": 0.2, "medium": 0.5, "moderate": 0.5, "severe": 0.8, "heavy": 0.8,
}

# Application order of a mixture: sampling and optics, atmosphere, weather in front of it,
# the sensor's exposure and noise, compression last.
ORDER: tuple[str, ...] = ("lowres", "blur", "haze", "rain", "snow", "lowlight", "noise", "jpeg")
EXTRA_STEPS: tuple[str, ...] = ("jpeg",)  # accepted by `degrade`, not a restoration task

# Revision of each degradation's generator, bumped when a seed stops giving the same image, so
# caches of synthesised sets (bench/quality.py) remake them. blur 2: motion PSFs are centred
# on their centre of mass, not their bounding box (which also shifted the image).
REVISIONS: dict[str, int] = {"blur": 2}


def revision(degradation: str) -> int:
    """The generator revision of one degradation (1 unless `REVISIONS` says otherwise)."""
    return REVISIONS.get(degradation, 1)


@dataclass
class Degraded:
    """A degraded image and the JSON-serialisable record of how it was made."""

    image: np.ndarray  # float32 H x W x 3 in [0, 1] (smaller for lowres)
    params: Params = field(default_factory=dict)  # {"seed":..., "steps": [...]}

    @property
    def degradations(self) -> list[str]:
        return [s["degradation"] for s in self.params.get("steps", [])]


# ----------------------------------------------------------------------------- helpers


def as_image(image: np.ndarray) -> np.ndarray:
    """A contiguous float32 H x W x 3 copy in [0, 1] (uint8/uint16 scaled, grey/RGBA fixed)."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise DegradationError(f"expected an H x W x 3 image, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    return np.ascontiguousarray(np.clip(arr, 0.0, 1.0), dtype=np.float32)


def as_rng(rng: RngLike) -> np.random.Generator:
    """A Generator from a Generator, an int seed or None (fresh entropy)."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def luminance(image: np.ndarray) -> np.ndarray:
    """Rec. 601 luma, H x W float32."""
    return (image @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.float32)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    return obj


def _severity(severity: float | str | None) -> float | None:
    if severity is None:
        return None
    if isinstance(severity, str):
        key = severity.strip().lower()
        if key in SEVERITY_LEVELS:
            return SEVERITY_LEVELS[key]
        try:
            severity = float(key)
        except ValueError:
            names = ", ".join(SEVERITY_LEVELS)
            raise DegradationError(f"severity must be in [0, 1] or one of {names}") from None
    s = float(severity)
    if not 0.0 <= s <= 1.0:
        raise DegradationError(f"severity must be in [0, 1], got {s}")
    return s


def _pick(rng: np.random.Generator, deg: str, name: str, value: Any, severity: Any) -> float:
    """An explicit value, the severity-mapped value, or a random one from the range."""
    r = DEFAULT_RANGES[deg][name]
    if value is not None:
        return float(round(float(value))) if r.integer else float(value)
    s = _severity(severity)
    return r.at(s) if s is not None and r.severity else r.sample(rng)


def _convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """True 2-D convolution with reflected borders (float32, any channel count)."""
    k = np.ascontiguousarray(kernel[::-1, ::-1], dtype=np.float32)
    return cv2.filter2D(image, -1, k, borderType=cv2.BORDER_REFLECT_101)


def _finish(image: np.ndarray) -> np.ndarray:
    out = np.clip(image, 0.0, 1.0, out=image if image.dtype == np.float32 else None)
    return np.ascontiguousarray(out, dtype=np.float32)


def _resize(image: np.ndarray, hw: tuple[int, int], interp: int = cv2.INTER_LINEAR) -> np.ndarray:
    return cv2.resize(image, (int(hw[1]), int(hw[0])), interpolation=interp)


# ----------------------------------------------------------------------------- kernels


def motion_kernel(rng: RngLike, size: int = 15, shake: float = 0.5) -> np.ndarray:
    """A camera-shake PSF, ``size x size`` (odd), summing to 1.

    The trajectory is a constant-ish speed random walk with momentum (in the spirit of
    Boracchi & Foi 2012): the heading turns with an inertial angular velocity, ``shake`` in
    [0, 1] scales the turning noise, speed jitter and the rate of abrupt jerks (0 gives a
    near-linear motion). It is centred on its centre of mass (so the blurred image is not
    shifted against the sharp one: a shift no restorer can undo) and scaled until it reaches
    the kernel's edge, sampled densely in time and splatted bilinearly, so slow parts of the
    path weigh more, as in a real exposure.
    """
    gen = as_rng(rng)
    size = max(3, int(size) | 1)
    n = 48
    turn = gen.standard_normal(n) * (0.01 + 0.09 * shake)
    speed_noise = gen.standard_normal(n) * (0.6 * shake)
    jerk = np.where(gen.random(n) < 0.04 * shake, gen.uniform(-2.0, 2.0, n), 0.0)
    heading = gen.uniform(0.0, 2.0 * np.pi)
    omega, speed = 0.0, 1.0
    steps = np.empty(n, np.complex128)
    for t in range(n):  # 48 steps of a 1-D recurrence, not a pixel loop
        omega = 0.75 * omega + turn[t]
        speed = 0.8 * speed + 0.2 * max(0.15, 1.0 + speed_noise[t])
        heading += omega + jerk[t]
        steps[t] = speed * np.exp(1j * heading)
    path = np.concatenate([[0.0], np.cumsum(steps)])
    # centre the time-averaged position (the PSF's centre of mass: the mean of the segment
    # midpoints, each segment taking equal time) so the blur does not shift the image, and
    # scale the path so its farthest point reaches the kernel's edge
    path = path - ((path[:-1] + path[1:]) / 2).mean()
    reach = max(np.abs(path.real).max(), np.abs(path.imag).max(), 1e-6)
    c = (size - 1) / 2
    path = path * (c / reach) + complex(c, c)
    up = max(1, math.ceil(4 * np.abs(np.diff(path)).max()))
    t_fine = (np.arange(n * up) + 0.5) / up  # equal-time samples: their mean is the centroid
    xs = np.interp(t_fine, np.arange(n + 1), path.real)
    ys = np.interp(t_fine, np.arange(n + 1), path.imag)
    return _splat(xs, ys, size)


def _splat(xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    """Bilinear accumulation of points into a normalised ``size x size`` kernel."""
    x0 = np.clip(np.floor(xs), 0, size - 1).astype(np.int64)
    y0 = np.clip(np.floor(ys), 0, size - 1).astype(np.int64)
    fx, fy = np.clip(xs - x0, 0, 1), np.clip(ys - y0, 0, 1)
    x1, y1 = np.minimum(x0 + 1, size - 1), np.minimum(y0 + 1, size - 1)
    idx = np.concatenate([y0 * size + x0, y0 * size + x1, y1 * size + x0, y1 * size + x1])
    w = np.concatenate([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy])
    k = np.bincount(idx, weights=w, minlength=size * size).reshape(size, size)
    return (k / k.sum()).astype(np.float32)


def gaussian_kernel(sigma_x: float, sigma_y: float | None = None, theta: float = 0.0,
                    size: int | None = None) -> np.ndarray:
    """An (anisotropic) Gaussian PSF; ``theta`` in radians rotates the x axis; sums to 1."""
    sy = sigma_x if sigma_y is None else sigma_y
    r = size // 2 if size else max(1, math.ceil(3 * max(sigma_x, sy)))
    ys, xs = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * xs + s * ys, -s * xs + c * ys
    k = np.exp(-0.5 * ((u / max(sigma_x, 1e-3)) ** 2 + (v / max(sy, 1e-3)) ** 2))
    return (k / k.sum()).astype(np.float32)


def disk_kernel(radius: float) -> np.ndarray:
    """A defocus PSF: a uniform disk, anti-aliased by 4x4 supersampling; sums to 1."""
    r, ss = max(1, math.ceil(radius)), 4
    off = (np.arange(ss) + 0.5) / ss - 0.5
    coords = (np.arange(-r, r + 1)[:, None] + off[None, :]).ravel()
    inside = (coords[:, None] ** 2 + coords[None, :] ** 2) <= radius**2
    n = 2 * r + 1
    k = inside.reshape(n, ss, n, ss).mean(axis=(1, 3))
    return (k / k.sum()).astype(np.float32)


def sinc_kernel(cutoff: float, size: int) -> np.ndarray:
    """A circular low-pass (2-D sinc, jinc) kernel: ringing artefacts; sums to 1."""
    from scipy.special import j1  # lazy: only the realistic SR chain needs it

    r = size // 2
    ys, xs = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    rad = np.hypot(xs, ys)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = cutoff * j1(cutoff * rad) / (2 * np.pi * rad)
    k[r, r] = cutoff**2 / (4 * np.pi)
    return (k / k.sum()).astype(np.float32)


def capsule_kernel(length: float, sigma: float, angle: float, taper: bool = False) -> np.ndarray:
    """A streak: Gaussian profile (std ``sigma``) around a segment of ``length`` px tilted
    ``angle`` degrees from vertical; peak 1. ``taper`` fades it towards both ends (rain)."""
    a = math.radians(angle)
    dx, dy = math.sin(a), math.cos(a)
    half = max(length, 0.0) / 2
    rx = math.ceil(half * abs(dx) + 2.5 * sigma + 1)
    ry = math.ceil(half * abs(dy) + 2.5 * sigma + 1)
    ys, xs = np.mgrid[-ry:ry + 1, -rx:rx + 1].astype(np.float32)
    along = xs * dx + ys * dy
    across = xs * dy - ys * dx
    excess = np.maximum(np.abs(along) - half, 0.0)
    k = np.exp(-0.5 * (across**2 + excess**2) / sigma**2)
    if taper and half > 0:
        k *= np.clip(1.0 - (along / (half + sigma)) ** 2, 0.0, 1.0)
    return (k / k.max()).astype(np.float32)


# ----------------------------------------------------------------------------- noise


def add_noise(image: np.ndarray, rng: RngLike = None, sigma: float | None = None, *,
              poisson: bool | float | None = None, channel_correlated: float | None = None,
              severity: float | None = None) -> tuple[np.ndarray, Params]:
    """Additive Gaussian noise, optionally with signal-dependent (shot) noise.

    sigma: std in 0-255 units, range 1-55 (BSD68 uses 15/25/50).
    poisson: False, True (random peak) or the number of photons at white (10-1000, fewer =
        noisier); shot noise uses the Gaussian approximation ``N(0, x / peak)``.
    channel_correlated: 0 independent colour noise ... 1 identical grey noise in R, G, B.
    When ``sigma`` or ``severity`` is given, unspecified extras are off (plain AWGN, as in the
    benchmarks); in fully random mode Poisson noise is added 25 % of the time and 40 % of
    samples get partly or fully channel-correlated noise.
    """
    gen, img = as_rng(rng), as_image(image)
    plain = sigma is not None or severity is not None
    sig = _pick(gen, "noise", "sigma", sigma, severity)
    if poisson is None:
        poisson = False if plain else bool(gen.random() < 0.25)
    peak = None
    if poisson is not False:
        value = None if poisson is True else poisson
        peak = _pick(gen, "noise", "peak", value, severity)
    if channel_correlated is None:
        rho = 0.0 if plain or gen.random() < 0.6 else float(gen.random())
    else:
        rho = float(np.clip(channel_correlated, 0.0, 1.0))
    noise = gen.standard_normal(img.shape, dtype=np.float32)
    if rho > 0:
        grey = gen.standard_normal((*img.shape[:2], 1), dtype=np.float32)
        noise = math.sqrt(1.0 - rho) * noise + math.sqrt(rho) * grey
    out = img + noise * np.float32(sig / 255.0)
    if peak is not None:
        shot = gen.standard_normal(img.shape, dtype=np.float32)
        out += shot * np.sqrt(img / np.float32(peak))
    params = {"sigma": sig, "poisson": peak is not None, "peak": peak, "channel_correlated": rho}
    return _finish(out), params


# ----------------------------------------------------------------------------- blur

_BLUR_KINDS = ("motion", "gaussian", "defocus")


def add_blur(image: np.ndarray, rng: RngLike = None, kind: str | None = None, *,
             size: int | None = None, shake: float | None = None, sigma: float | None = None,
             aspect: float | None = None, theta: float | None = None,
             radius: float | None = None, severity: float | None = None,
             ) -> tuple[np.ndarray, Params]:
    """Blur by a random PSF.

    kind: "motion" (camera shake, `motion_kernel`; ``size`` 7-31 px odd, ``shake`` 0-1),
        "gaussian" (``sigma`` 0.5-4.5 px on the major axis, ``aspect`` minor/major 0.3-1,
        ``theta`` degrees; isotropic half the time when ``aspect`` is random) or "defocus"
        (disk of ``radius`` 1-7 px); None picks motion/gaussian/defocus at 50/30/20 %.
    """
    gen, img = as_rng(rng), as_image(image)
    if kind is None:
        kind = str(gen.choice(_BLUR_KINDS, p=[0.5, 0.3, 0.2]))
    if kind not in _BLUR_KINDS:
        raise DegradationError(f"blur kind must be one of {', '.join(_BLUR_KINDS)}, not {kind!r}")
    params: Params = {"kind": kind}
    if kind == "motion":
        n = int(_pick(gen, "blur", "size", size, severity)) | 1
        sh = _pick(gen, "blur", "shake", shake, severity)
        kernel = motion_kernel(gen, n, sh)
        params |= {"size": n, "shake": sh}
    elif kind == "gaussian":
        sx = _pick(gen, "blur", "sigma", sigma, severity)
        if aspect is None and gen.random() < 0.5:
            aspect = 1.0
        asp = _pick(gen, "blur", "aspect", aspect, severity)
        th = float(gen.uniform(0.0, 180.0)) if theta is None else float(theta)
        kernel = gaussian_kernel(sx, sx * asp, math.radians(th))
        params |= {"sigma": sx, "aspect": asp, "theta": th, "size": int(kernel.shape[0])}
    else:
        rad = _pick(gen, "blur", "radius", radius, severity)
        kernel = disk_kernel(rad)
        params |= {"radius": rad, "size": int(kernel.shape[0])}
    return _finish(_convolve(img, kernel)), params


# ----------------------------------------------------------------------------- haze


def pseudo_depth(image: np.ndarray, rng: RngLike = None, near: float = 0.0,
                 ) -> tuple[np.ndarray, Params]:
    """A plausible relative depth in [near, 1] (1 = far), H x W float32.

    Mix of three smooth cues computed on a <= 64 px thumbnail: a vertical gradient (far above
    a random, slightly tilted horizon), a smooth random field, and bright low-saturation
    regions (sky-like) pushed far. Random mixing weights are recorded.
    """
    img = as_image(image)
    d, params = _depth_thumb(img, as_rng(rng), near)
    return _resize(d, img.shape[:2], cv2.INTER_LINEAR), params


def _depth_thumb(img: np.ndarray, gen: np.random.Generator, near: float,
                 ) -> tuple[np.ndarray, Params]:
    h0, w0 = img.shape[:2]
    f = min(1.0, 64.0 / max(h0, w0))
    h, w = max(2, round(h0 * f)), max(2, round(w0 * f))
    small = _resize(img, (h, w), cv2.INTER_AREA)
    horizon, tilt = float(gen.uniform(0.15, 0.6)), float(gen.uniform(-0.15, 0.15))
    power = float(gen.uniform(0.7, 2.0))
    yy = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h
    xx = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w
    vert = np.clip((1.0 - (yy + tilt * (xx - 0.5))) / (1.0 - horizon), 0.0, 1.0) ** power
    grid = gen.standard_normal((int(gen.integers(2, 6)), int(gen.integers(2, 6))))
    rand_field = _norm01(_resize(grid.astype(np.float32), (h, w), cv2.INTER_CUBIC))
    sat = small.max(axis=2) - small.min(axis=2)
    sky = _norm01(cv2.GaussianBlur(luminance(small) * (1.0 - sat), (0, 0), 2.0))
    weights = np.array([gen.uniform(0.45, 0.75), gen.uniform(0.1, 0.3), gen.uniform(0.05, 0.25)])
    weights /= weights.sum()
    d = _norm01(weights[0] * vert + weights[1] * rand_field + weights[2] * sky)
    d = near + (1.0 - near) * d
    params = {"horizon": horizon, "tilt": tilt, "power": power, "weights": weights, "near": near}
    return d.astype(np.float32), _jsonable(params)


def _norm01(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _airlight(gen: np.random.Generator, value: Any, severity: Any) -> list[float]:
    """Airlight colour: a brightness with a slight random tint, or an explicit value/RGB."""
    if value is not None and np.ndim(value) == 1:
        return [float(v) for v in np.clip(value, 0.0, 1.0)]
    a = _pick(gen, "haze", "airlight", value, severity)
    tint = gen.normal(0.0, 0.025, 3) + np.array([-0.01, 0.0, 0.015]) * gen.uniform(-1, 2)
    return [float(v) for v in np.clip(a * (1.0 + tint), 0.0, 1.0)]


def add_haze(image: np.ndarray, rng: RngLike = None, beta: float | None = None, *,
             airlight: float | Sequence[float] | None = None, depth: np.ndarray | None = None,
             near: float | None = None, severity: float | None = None,
             ) -> tuple[np.ndarray, Params]:
    """Atmospheric scattering ``I = J t + A (1 - t)``, ``t = exp(-beta d)``.

    beta: 0.3-3.0 on a depth in [near, 1] (farthest transmission 0.74-0.05).
    airlight: brightness 0.7-1.0 with a slight random (blue/yellow) tint, or an RGB triple.
    depth: an H x W map in the units beta applies to; default `pseudo_depth` (``near`` 0-0.35).
    """
    gen, img = as_rng(rng), as_image(image)
    h, w = img.shape[:2]
    b = _pick(gen, "haze", "beta", beta, severity)
    air = _airlight(gen, airlight, severity)
    params: Params = {"beta": b, "airlight": air}
    if depth is None:
        nr = _pick(gen, "haze", "near", near, severity)
        d, dparams = _depth_thumb(img, gen, nr)
        t = _resize(np.exp(-b * d).astype(np.float32), (h, w), cv2.INTER_LINEAR)
        params["depth"] = {"kind": "pseudo", **dparams}
    else:
        d = np.asarray(depth, np.float32).reshape(h, w)
        t = np.exp(-b * d).astype(np.float32)
        params["depth"] = {"kind": "given", "min": float(d.min()), "max": float(d.max())}
    t = t[..., None]
    out = img * t + np.asarray(air, np.float32) * (1.0 - t)
    params["transmission"] = [float(t.min()), float(t.mean()), float(t.max())]
    return _finish(out), params


# ----------------------------------------------------------------------------- rain


def _streak_layer(gen: np.random.Generator, hw: tuple[int, int], coverage: float,
                  length: float, width: float, angle: float) -> np.ndarray:
    """Sparse drops motion-blurred into streaks; peak ~1 per drop, H x W float32."""
    footprint = max(length, 1.0) * max(2.5 * width, 1.0)
    p = min(0.5, coverage / footprint)
    u = gen.random(hw, dtype=np.float32)
    drops = np.where(u < p, 0.55 + 0.45 * (u / np.float32(p)), 0.0).astype(np.float32)
    kernel = capsule_kernel(length, width, angle, taper=True)
    return np.minimum(_convolve(drops, kernel), 1.0)


def add_rain(image: np.ndarray, rng: RngLike = None, density: float | None = None, *,
             length: float | None = None, angle: float | None = None,
             layers: int | None = None, width: float | None = None,
             brightness: float | None = None, veil: float | None = None,
             blend: str | None = None, severity: float | None = None,
             ) -> tuple[np.ndarray, Params]:
    """Rain streak layers over the image, plus an optional rain veil.

    density: area fraction each layer's streaks cover, 0.02-0.35 (Rain100L-like sparse thin
        streaks at the low end, Rain100H-like at the high end with 2-3 layers).
    length: 8-60 px; width: Gaussian cross-section std 0.5-2 px; angle: -40..40 degrees
        from vertical; brightness: streak opacity 0.4-0.95; layers: 1-3; veil: 0-0.25
        (none in half of the fully random draws).
    blend: "screen" (``1 - (1 - J)(1 - R)``, soft on bright backgrounds) or "add"
        (``J + R`` clipped, Rain100L-like contrast); random 50/50 when None.
    Each extra layer jitters angle (within 15 degrees), length, width, density and opacity.
    """
    gen, img = as_rng(rng), as_image(image)
    h, w = img.shape[:2]
    dens = _pick(gen, "rain", "density", density, severity)
    ln = _pick(gen, "rain", "length", length, severity)
    wd = _pick(gen, "rain", "width", width, severity)
    ang = _pick(gen, "rain", "angle", angle, severity)
    bright = _pick(gen, "rain", "brightness", brightness, severity)
    n = int(_pick(gen, "rain", "layers", layers, severity))
    no_veil = veil is None and severity is None and gen.random() < 0.5
    vl = 0.0 if no_veil else _pick(gen, "rain", "veil", veil, severity)
    spread = float(gen.uniform(0.0, 15.0))
    rain = np.zeros((h, w), np.float32)
    layer_params = []
    for i in range(max(1, n)):
        j = 0.0 if i == 0 else 1.0
        lp = {
            "angle": ang + j * spread * float(gen.uniform(-1, 1)),
            "length": ln * float(gen.uniform(0.6, 1.4)) ** j,
            "width": max(0.4, wd * float(gen.uniform(0.6, 1.3)) ** j),
            "density": dens * float(gen.uniform(0.4, 1.2)) ** j,
            "brightness": bright * float(gen.uniform(0.5, 1.0)) ** j,
        }
        streaks = _streak_layer(gen, (h, w), lp["density"], lp["length"], lp["width"],
                                lp["angle"])
        rain = 1.0 - (1.0 - rain) * (1.0 - lp["brightness"] * streaks)
        layer_params.append(lp)
    if blend is None:
        blend = "screen" if gen.random() < 0.5 else "add"
    if blend not in ("screen", "add"):
        raise DegradationError(f"rain blend must be 'screen' or 'add', not {blend!r}")
    r3 = rain[..., None]
    out = 1.0 - (1.0 - img) * (1.0 - r3) if blend == "screen" else img + r3
    veil_rgb = [float(v) for v in gen.uniform(0.75, 0.9) + gen.normal(0.0, 0.01, 3)]
    if vl > 0:
        out = out * (1.0 - vl) + np.asarray(veil_rgb, np.float32) * vl
    params = {"density": dens, "length": ln, "width": wd, "angle": ang, "brightness": bright,
              "layers": n, "veil": vl, "veil_color": veil_rgb, "blend": blend,
              "layer_params": layer_params}
    return _finish(out), _jsonable(params)


# ----------------------------------------------------------------------------- snow


def _flake_layer(gen: np.random.Generator, hw: tuple[int, int], coverage: float,
                 radius: float, motion: float, angle: float) -> np.ndarray:
    """Soft round flakes of ``radius`` px, rendered small and upsampled; peak ~1, H x W."""
    h, w = hw
    ds = max(1.0, radius / 1.5)
    hs, ws = max(1, math.ceil(h / ds)), max(1, math.ceil(w / ds))
    count = coverage * h * w / (math.pi * radius**2)
    p = min(0.3, count / (hs * ws))
    u = gen.random((hs, ws), dtype=np.float32)
    pts = np.where(u < p, 0.6 + 0.4 * (u / np.float32(max(p, 1e-12))), 0.0).astype(np.float32)
    kernel = capsule_kernel(motion / ds, radius / ds / 1.2, angle)
    layer = _convolve(pts, kernel)
    if ds > 1.0:
        layer = _resize(layer, (h, w), cv2.INTER_LINEAR)
    return np.minimum(layer, 1.0)


def add_snow(image: np.ndarray, rng: RngLike = None, density: float | None = None, *,
             size: float | None = None, layers: int | None = None,
             opacity: float | None = None, motion: float | None = None,
             angle: float | None = None, veil: float | None = None,
             severity: float | None = None) -> tuple[np.ndarray, Params]:
    """Multi-scale snow flakes (far: small, dense, sharp; near: large, sparse, soft and more
    translucent) over a white-ish veil.

    density: flake area fraction over all layers, 0.01-0.2; size: radius of the largest
    flakes 2.5-10 px (smallest 0.6-1.2 px); layers: 2-4; opacity: 0.6-1.0; motion: fall
    streak 0-4 px (up to twice that for near flakes; none 40 % of the time when random);
    angle: -30..30 degrees; veil: 0-0.3.
    """
    gen, img = as_rng(rng), as_image(image)
    h, w = img.shape[:2]
    dens = _pick(gen, "snow", "density", density, severity)
    big = _pick(gen, "snow", "size", size, severity)
    n = max(1, int(_pick(gen, "snow", "layers", layers, severity)))
    op = _pick(gen, "snow", "opacity", opacity, severity)
    still = motion is None and gen.random() < 0.4
    mo = 0.0 if still else _pick(gen, "snow", "motion", motion, severity)
    ang = _pick(gen, "snow", "angle", angle, severity)
    vl = _pick(gen, "snow", "veil", veil, severity)
    small = min(float(gen.uniform(0.6, 1.2)), big)
    share = gen.uniform(0.5, 1.5, n)
    share /= share.sum()
    alpha = np.zeros((h, w), np.float32)
    layer_params = []
    for i in range(n):
        f = i / (n - 1) if n > 1 else 0.0
        lp = {"radius": small * (big / small) ** f, "coverage": dens * float(share[i]),
              "opacity": op * (1.0 - 0.35 * f), "motion": mo * (1.0 + f),
              "angle": ang + float(gen.uniform(-5, 5))}
        flakes = _flake_layer(gen, (h, w), lp["coverage"], lp["radius"], lp["motion"],
                              lp["angle"])
        alpha = 1.0 - (1.0 - alpha) * (1.0 - lp["opacity"] * flakes)
        layer_params.append(lp)
    white = float(gen.uniform(0.88, 1.0))
    color = [white - 0.03 * float(gen.random()), white - 0.01 * float(gen.random()), white]
    c = np.asarray(color, np.float32)
    out = img
    if vl > 0:
        out = img * (1.0 - vl) + c * np.float32(vl * float(gen.uniform(0.8, 0.95)))
    a = alpha[..., None]
    out = out * (1.0 - a) + c * a
    params = {"density": dens, "size": big, "layers": n, "opacity": op, "motion": mo,
              "angle": ang, "veil": vl, "color": color, "layer_params": layer_params}
    return _finish(out), _jsonable(params)


# ----------------------------------------------------------------------------- low light


def add_lowlight(image: np.ndarray, rng: RngLike = None, gamma: float | None = None, *,
                 exposure: float | None = None, peak: float | None = None,
                 read_noise: float | None = None, cast: float | None = None,
                 bits: int | None = None, severity: float | None = None,
                 ) -> tuple[np.ndarray, Params]:
    """Under-exposure as on a real sensor: ``y = exposure * x ** gamma``, a white-balance
    cast, shot noise (Poisson, Gaussian approximation with ``peak`` photons at full scale)
    plus read noise, then quantisation to ``bits``.

    gamma 1.1-2.6; exposure 0.7-0.08; peak 2000-60 photons; read_noise 0.001-0.015;
    cast: log-gain spread 0-0.15 per channel (mean gain 1); bits: 8 (70 %), 7 or 6.
    """
    gen, img = as_rng(rng), as_image(image)
    g = _pick(gen, "lowlight", "gamma", gamma, severity)
    ex = _pick(gen, "lowlight", "exposure", exposure, severity)
    pk = _pick(gen, "lowlight", "peak", peak, severity)
    rd = _pick(gen, "lowlight", "read_noise", read_noise, severity)
    cs = _pick(gen, "lowlight", "cast", cast, severity)
    nb = int(gen.choice([8, 7, 6], p=[0.7, 0.2, 0.1])) if bits is None else int(bits)
    gains = np.exp(cs * gen.uniform(-1.0, 1.0, 3))
    gains /= gains.mean()
    dark = cv2.pow(img, g) * (ex * gains).astype(np.float32)
    var = dark * np.float32(1.0 / pk) + np.float32(rd * rd)
    out = dark + np.sqrt(var) * gen.standard_normal(img.shape, dtype=np.float32)
    levels = np.float32(2**nb - 1)
    out = np.round(np.clip(out, 0.0, 1.0) * levels) / levels
    params = {"gamma": g, "exposure": ex, "peak": pk, "read_noise": rd, "cast": cs,
              "gains": gains, "bits": nb}
    return _finish(out), _jsonable(params)


# ----------------------------------------------------------------------------- jpeg


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip through OpenCV (4:2:0 chroma) at ``quality`` 1-100."""
    q = int(np.clip(quality, 1, 100))
    u8 = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(u8[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:  # pragma: no cover - OpenCV always encodes a valid uint8 image
        raise DegradationError("JPEG encoding failed")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255.0


def add_jpeg(image: np.ndarray, rng: RngLike = None, quality: int | None = None, *,
             severity: float | None = None) -> tuple[np.ndarray, Params]:
    """JPEG compression artefacts, ``quality`` 95 (mild) to 20 (severe)."""
    gen, img = as_rng(rng), as_image(image)
    q = int(_pick(gen, "jpeg", "quality", quality, severity))
    return np.ascontiguousarray(jpeg(img, q)), {"quality": q}


# ----------------------------------------------------------------------------- low res


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel, a = -0.5 (MATLAB's and OpenCV's bicubic)."""
    ax = np.abs(x)
    return np.where(ax <= 1, 1.5 * ax**3 - 2.5 * ax**2 + 1,
                    np.where(ax < 2, -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2, 0.0))


def bicubic_downscale(image: np.ndarray, scale: int) -> np.ndarray:
    """Antialiased bicubic downscaling by an integer factor, as MATLAB's ``imresize``.

    The image is first cropped (bottom/right) to a multiple of ``scale`` ("modcrop", as SR
    benchmarks do), so the result is ``(H // scale) x (W // scale)``. Each output pixel is the
    Keys cubic stretched by ``scale`` (antialiasing: unlike plain ``cv2.INTER_CUBIC``) centred
    on its footprint, with symmetric borders; done as a separable filter plus decimation.
    """
    s = int(scale)
    if s < 1:
        raise DegradationError(f"scale must be a positive integer, got {scale}")
    h, w = image.shape[0] // s * s, image.shape[1] // s * s
    if h == 0 or w == 0:
        raise DegradationError(f"image {image.shape[1]}x{image.shape[0]} is smaller than x{s}")
    img = np.ascontiguousarray(image[:h, :w], dtype=np.float32)
    if s == 1:
        return img
    centre = (s - 1) / 2
    start = math.floor(centre)
    offsets = np.arange(-2 * s + 1, 2 * s + 1)
    k = _keys_cubic((offsets - (centre - start)) / s)
    k = (k / k.sum()).astype(np.float32)
    anchor = 2 * s - 1
    filtered = cv2.sepFilter2D(img, -1, k, k, anchor=(anchor, anchor),
                               borderType=cv2.BORDER_REFLECT)
    return np.ascontiguousarray(filtered[start::s, start::s][: h // s, : w // s])


_INTERPS = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


def _rand_resize(gen: np.random.Generator, img: np.ndarray, probs: Sequence[float],
                 up: tuple[float, float], down: tuple[float, float]) -> tuple[np.ndarray, Params]:
    mode = str(gen.choice(["up", "down", "keep"], p=probs))
    f = float(gen.uniform(*up)) if mode == "up" else float(gen.uniform(*down))
    f = 1.0 if mode == "keep" else f
    interp = str(gen.choice(list(_INTERPS)))
    h, w = img.shape[:2]
    hw = (max(1, round(h * f)), max(1, round(w * f)))
    return _finish(_resize(img, hw, _INTERPS[interp])), {"op": "resize", "factor": f,
                                                         "interp": interp}


def _rand_blur(gen: np.random.Generator, img: np.ndarray, sig: tuple[float, float],
               ) -> tuple[np.ndarray, Params]:
    sx = float(gen.uniform(*sig))
    sy = sx if gen.random() < 0.5 else float(gen.uniform(*sig))
    th = float(gen.uniform(0.0, np.pi))
    size = int(gen.integers(3, 11)) * 2 + 1
    out = _convolve(img, gaussian_kernel(sx, sy, th, size))
    return _finish(out), {"op": "blur", "sigma_x": sx, "sigma_y": sy, "theta": th, "size": size}


def _rand_noise(gen: np.random.Generator, img: np.ndarray, sigma: tuple[float, float],
                peak: tuple[float, float]) -> tuple[np.ndarray, Params]:
    grey = 1.0 if gen.random() < 0.4 else 0.0
    if gen.random() < 0.5:
        out, p = add_noise(img, gen, float(gen.uniform(*sigma)), channel_correlated=grey)
    else:
        pk = float(np.exp(gen.uniform(np.log(peak[0]), np.log(peak[1]))))
        out, p = add_noise(img, gen, 0.0, poisson=pk, channel_correlated=grey)
    return out, {"op": "noise", **p}


def _rand_jpeg(gen: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, Params]:
    q = int(gen.integers(30, 96))
    return jpeg(img, q), {"op": "jpeg", "quality": q}


def realistic_downscale(image: np.ndarray, rng: RngLike, scale: int,
                        ) -> tuple[np.ndarray, list[Params]]:
    """A Real-ESRGAN-style second-order chain to ``(H // scale) x (W // scale)``.

    Twice: random anisotropic Gaussian blur (sigma 0.2-3, then 0.2-1.5 with p 0.8), random
    resize (up/down/keep with area/bilinear/bicubic), Gaussian (sigma 1-30, then 1-25) or
    Poisson noise (40 % grey), JPEG (q 30-95) after the first pass; finally, in random order,
    the resize to the target size (+ a sinc ringing filter, p 0.5) and JPEG (q 30-95).
    Returns the small image and the list of operations applied.
    """
    gen, img = as_rng(rng), as_image(image)
    h, w = img.shape[0] // scale, img.shape[1] // scale
    if h == 0 or w == 0:
        raise DegradationError(f"image {img.shape[1]}x{img.shape[0]} is smaller than x{scale}")
    ops: list[Params] = []
    img, p = _rand_blur(gen, img, (0.2, 3.0))
    ops.append(p)
    for step in (
        lambda x: _rand_resize(gen, x, (0.2, 0.7, 0.1), (1.0, 1.5), (0.15, 1.0)),
        lambda x: _rand_noise(gen, x, (1.0, 30.0), (30.0, 5000.0)),
        lambda x: _rand_jpeg(gen, x),
    ):
        img, p = step(img)
        ops.append(p)
    if gen.random() < 0.8:
        img, p = _rand_blur(gen, img, (0.2, 1.5))
        ops.append(p)
    for step in (
        lambda x: _rand_resize(gen, x, (0.3, 0.4, 0.3), (1.0, 1.2), (0.3, 1.0)),
        lambda x: _rand_noise(gen, x, (1.0, 25.0), (40.0, 5000.0)),
    ):
        img, p = step(img)
        ops.append(p)

    def final_resize(x: np.ndarray) -> tuple[np.ndarray, Params]:
        interp = str(gen.choice(list(_INTERPS)))
        x = _resize(x, (h, w), _INTERPS[interp])
        p: Params = {"op": "resize", "size": [h, w], "interp": interp}
        if gen.random() < 0.5:
            cutoff, size = float(gen.uniform(np.pi / 3, np.pi)), int(gen.integers(3, 11)) * 2 + 1
            x = _convolve(x, sinc_kernel(cutoff, size))
            p |= {"sinc_cutoff": cutoff, "sinc_size": size}
        return _finish(x), p

    order = [final_resize, lambda x: _rand_jpeg(gen, x)]
    if gen.random() < 0.5:
        order.reverse()
    for step in order:
        img, p = step(img)
        ops.append(p)
    return np.ascontiguousarray(img, dtype=np.float32), _jsonable(ops)


def add_lowres(image: np.ndarray, rng: RngLike = None, scale: int | None = None, *,
               realistic: bool = False, keep_size: bool = False,
               severity: float | None = None) -> tuple[np.ndarray, Params]:
    """Downscale by ``scale`` in {2, 3, 4} (severity 0 -> 2, 0.5 -> 3, 1 -> 4).

    The result is ``(H // scale) x (W // scale)``: the input is cropped bottom/right to a
    multiple of ``scale`` first. ``realistic=False``: antialiased MATLAB-style bicubic
    (`bicubic_downscale`, the SR benchmark protocol); ``True``: `realistic_downscale`.
    ``keep_size=True`` upsamples the result back to the cropped size with
    `fapecli.resample.upsample` (as the executor's input at inference) and pads the cropped
    rows/columns by edge replication, so the output is H x W and pixel-aligned with the input.
    """
    gen, img = as_rng(rng), as_image(image)
    s = int(_pick(gen, "lowres", "scale", scale, severity))
    h0, w0 = img.shape[:2]
    params: Params = {"scale": s, "realistic": bool(realistic), "keep_size": bool(keep_size),
                      "hr_size": [h0, w0], "crop": [h0 // s * s, w0 // s * s]}
    if realistic:
        out, params["chain"] = realistic_downscale(img, gen, s)
    else:
        out = bicubic_downscale(img, s)
    params["lr_size"] = [int(out.shape[0]), int(out.shape[1])]
    if keep_size:
        hc, wc = params["crop"]
        out = upsample(out, (hc, wc))
        out = cv2.copyMakeBorder(out, 0, h0 - hc, 0, w0 - wc, cv2.BORDER_REPLICATE)
    return _finish(out), params


# ----------------------------------------------------------------------------- mixtures

DegradeFn = Callable[..., tuple[np.ndarray, Params]]

FUNCTIONS: dict[str, DegradeFn] = {
    "rain": add_rain, "snow": add_snow, "haze": add_haze, "blur": add_blur,
    "noise": add_noise, "lowlight": add_lowlight, "lowres": add_lowres, "jpeg": add_jpeg,
}
assert set(FUNCTIONS) == {*DEGRADATIONS, *EXTRA_STEPS}


@cache
def _accepted(name: str) -> frozenset[str]:
    sig = inspect.signature(FUNCTIONS[name])
    return frozenset(p for p in sig.parameters if p not in ("image", "rng"))


def canonical_degradation(name: str) -> str:
    """The degradation name for a degradation, task name, planner token or alias."""
    key = name.strip().lower()
    if key in EXTRA_STEPS:
        return key
    try:
        return get_task(key).degradation
    except KeyError:
        known = ", ".join((*DEGRADATIONS, *EXTRA_STEPS))
        raise DegradationError(f"unknown degradation {name!r}; expected one of {known}") from None


def parse_degradations(degradations: str | Sequence[str]) -> list[str]:
    """Canonical names from ``"rain"``, ``"rain+haze"``, ``"rain,haze"`` or a list."""
    if isinstance(degradations, str):
        parts = degradations.replace("+", ",").split(",")
    else:
        parts = [p for d in degradations for p in str(d).replace("+", ",").split(",")]
    names = [canonical_degradation(p) for p in parts if p.strip()
             and p.strip().lower() not in (NONE, "clean")]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DegradationError(f"degradation listed twice: {', '.join(dupes)}")
    return names


def _split_overrides(names: Sequence[str], overrides: Mapping[str, Any]) -> dict[str, Params]:
    """Per-step keyword arguments from ``{"noise": {...}}`` and/or flat keywords."""
    per: dict[str, Params] = {n: {} for n in names}
    for key, value in overrides.items():
        if key in FUNCTIONS and isinstance(value, Mapping):
            if key not in per:
                raise DegradationError(f"parameters given for {key!r}, which is not applied")
            per[key].update(value)
            continue
        takers = [n for n in names if key in _accepted(n)]
        if len(names) == 1 and not takers:
            takers = list(names)  # let the check below name the valid parameters
        if len(takers) != 1:
            where = f"several steps ({', '.join(takers)})" if takers else "no step"
            raise DegradationError(f"parameter {key!r} matches {where}; pass it per step, "
                                   f"e.g. {{{(takers or ['noise'])[0]!r}: {{{key!r}: ...}}}}")
        per[takers[0]][key] = value
    for name, kw in per.items():
        bad = sorted(set(kw) - _accepted(name))
        if bad:
            valid = ", ".join(sorted(_accepted(name)))
            raise DegradationError(f"{name}: unknown parameter(s) {', '.join(bad)}; "
                                   f"valid: {valid}")
    return per


def _apply(image: np.ndarray, names: Sequence[str], gen: np.random.Generator,
           per_step: Mapping[str, Params], severity: float | None,
           keep_size: bool) -> tuple[np.ndarray, list[Params]]:
    img = as_image(image)
    steps = []
    for name in names:
        kw = dict(per_step.get(name, {}))
        if severity is not None:
            kw.setdefault("severity", severity)
        kw["severity"] = _severity(kw.get("severity"))
        if name == "lowres":
            kw.setdefault("keep_size", keep_size)
        img, p = FUNCTIONS[name](img, gen, **kw)
        steps.append({"degradation": name, **({"severity": kw["severity"]} | p)})
    return img, _jsonable(steps)


def _new_seed() -> int:
    return int(np.random.SeedSequence().generate_state(2, np.uint64)[0] >> np.uint64(1))


def degrade(image: np.ndarray, degradations: str | Sequence[str], *,
            seed: int | np.random.Generator | None = None, severity: float | str | None = None,
            keep_size: bool = False, order: str = "physical", **overrides: Any) -> Degraded:
    """Apply one or several degradations, reproducibly.

    degradations: a name/alias (``"rain"``, ``"derain"``), ``"rain+haze"`` or a list; "none"
        gives the image unchanged; ``"jpeg"`` is accepted as an extra step.
    seed: an int (recorded in ``params["seed"]``), a Generator (recorded as null), or None
        (a fresh seed is drawn and recorded, so the result can be reproduced).
    severity: [0, 1] or "mild"/"medium"/"severe" (0.2/0.5/0.8) for every step.
    order: "physical" sorts the steps by `ORDER`; "given" keeps the caller's order.
    overrides: per step (``noise={"sigma": 25}``) or flat (``sigma=25``) when exactly one
        applied step accepts that parameter.
    """
    names = parse_degradations(degradations)
    if order == "physical":
        names.sort(key=ORDER.index)
    elif order != "given":
        raise DegradationError(f"order must be 'physical' or 'given', not {order!r}")
    per_step = _split_overrides(names, overrides)
    if isinstance(seed, np.random.Generator):
        seed_value, gen = None, seed
    else:
        seed_value = _new_seed() if seed is None else int(seed)
        gen = np.random.default_rng(seed_value)
    img, steps = _apply(image, names, gen, per_step, _severity(severity), keep_size)
    return Degraded(img, {"seed": seed_value, "steps": steps})


def random_degradation(image: np.ndarray, rng: RngLike, *,
                       mix: Mapping[str, float] | None = None, mixture_prob: float = 0.2,
                       max_mix: int = 3, keep_size: bool = False, clean_prob: float = 0.0,
                       ) -> Degraded:
    """A random training degradation with widely varied parameters.

    With probability ``clean_prob`` nothing; else with ``mixture_prob`` a mixture of 2 (70 %)
    or 3 (30 %, up to ``max_mix``) distinct degradations drawn by the ``mix`` weights
    (default uniform over the seven; names may be aliases), else one. The first drawn is the
    ``"primary"`` (full range); secondaries get a random severity in [0, 0.7]. Steps run in
    `ORDER`. ``rng`` is a Generator or an int seed (then recorded as ``params["seed"]``).
    """
    gen = as_rng(rng)
    seed_value = int(rng) if isinstance(rng, (int, np.integer)) else None
    weights = _mix_weights(mix)
    if clean_prob > 0 and gen.random() < clean_prob:
        return Degraded(as_image(image), {"seed": seed_value, "primary": NONE, "steps": []})
    names = list(weights)
    p = np.array([weights[n] for n in names], np.float64)
    k = 1
    if gen.random() < mixture_prob:
        k = min(2 if gen.random() < 0.7 else 3, max(1, max_mix), int((p > 0).sum()))
    picks = [str(x) for x in gen.choice(names, size=k, replace=False, p=p / p.sum())]
    per_step = {n: {"severity": float(gen.uniform(0.0, 0.7))} for n in picks[1:]}
    ordered = sorted(picks, key=ORDER.index)
    img, steps = _apply(image, ordered, gen, per_step, None, keep_size)
    return Degraded(img, {"seed": seed_value, "primary": picks[0], "steps": steps})


def _mix_weights(mix: Mapping[str, float] | None) -> dict[str, float]:
    if mix is None:
        return {d: 1.0 for d in DEGRADATIONS}
    weights: dict[str, float] = {}
    for name, wt in mix.items():
        key = canonical_degradation(name)
        if key in EXTRA_STEPS or float(wt) < 0:
            raise DegradationError(f"bad mix entry {name!r}: {wt}")
        weights[key] = weights.get(key, 0.0) + float(wt)
    if sum(weights.values()) <= 0:
        raise DegradationError("mix weights must not all be zero")
    return weights


def degrade_tensor(batch: torch.Tensor, degradations: str | Sequence[str] | None = None, *,
                   rng: RngLike = None, severity: float | str | None = None,
                   keep_size: bool = True, mix: Mapping[str, float] | None = None,
                   mixture_prob: float = 0.2, **overrides: Any,
                   ) -> tuple[torch.Tensor, list[Params]]:
    """Degrade a ``B x 3 x H x W`` batch in [0, 1] image by image (on the CPU).

    ``degradations=None`` uses `random_degradation` (``mix``, ``mixture_prob``); otherwise
    `degrade` with ``severity`` and ``overrides``. Each image gets its own int seed drawn from
    ``rng`` and recorded in its params. ``keep_size=True`` returns lowres upsampled back to
    H x W; with ``False`` all outputs must share a size. The result has the batch's device and
    dtype.
    """
    import torch

    if degradations is None and overrides:
        raise DegradationError(f"parameters {', '.join(overrides)} need named degradations")
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise DegradationError(f"expected a B x 3 x H x W batch, got {tuple(batch.shape)}")
    gen = as_rng(rng)
    arr = batch.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()
    images, params = [], []
    for img in arr:
        seed = int(gen.integers(0, 2**63 - 1))
        if degradations is None:
            d = random_degradation(img, seed, mix=mix, mixture_prob=mixture_prob,
                                   keep_size=keep_size)
        else:
            d = degrade(img, degradations, seed=seed, severity=severity, keep_size=keep_size,
                        **overrides)
        images.append(d.image)
        params.append(d.params)
    if len({im.shape for im in images}) > 1:
        raise DegradationError("degraded images differ in size; use keep_size=True")
    out = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return out.to(device=batch.device, dtype=batch.dtype), params


__all__ = [
    "DEFAULT_RANGES",
    "EXTRA_STEPS",
    "FUNCTIONS",
    "ORDER",
    "REVISIONS",
    "SEVERITY_LEVELS",
    "DegradationError",
    "Degraded",
    "Range",
    "add_blur",
    "add_haze",
    "add_jpeg",
    "add_lowlight",
    "add_lowres",
    "add_noise",
    "add_rain",
    "add_snow",
    "as_image",
    "as_rng",
    "bicubic_downscale",
    "canonical_degradation",
    "capsule_kernel",
    "degrade",
    "degrade_tensor",
    "disk_kernel",
    "gaussian_kernel",
    "jpeg",
    "luminance",
    "motion_kernel",
    "parse_degradations",
    "pseudo_depth",
    "random_degradation",
    "realistic_downscale",
    "revision",
    "sinc_kernel",
]
