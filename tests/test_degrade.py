"""Degradation synthesis: reproducibility, shapes, and that each one degrades as it should."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from fapecli.errors import UsageError
from fapecli.tasks import DEGRADATIONS
from fapecli.training import degrade as D


@pytest.fixture(scope="module")
def img() -> np.ndarray:
    """A 128 x 128 natural photo, float32 in [0, 1]."""
    return np.ascontiguousarray(data.astronaut()[::4, ::4], dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    """A 133 x 200 photo, area-downscaled (no aliased speckles)."""
    return cv2.resize(data.coffee().astype(np.float32) / 255.0, (200, 133),
                      interpolation=cv2.INTER_AREA)


def flat(value: float = 0.5, size: int = 96) -> np.ndarray:
    return np.full((size, size, 3), value, np.float32)


def lap_var(image: np.ndarray) -> float:
    return float(cv2.Laplacian(D.luminance(image), cv2.CV_32F).var())


def dark_channel(image: np.ndarray) -> float:
    return float(cv2.erode(image.min(axis=2), np.ones((7, 7), np.uint8)).mean())


def saturation(image: np.ndarray) -> float:
    return float((image.max(axis=2) - image.min(axis=2)).mean())


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", [*DEGRADATIONS, "jpeg"])
def test_reproducible_and_well_formed(img: np.ndarray, name: str) -> None:
    a = D.degrade(img, name, seed=11)
    b = D.degrade(img, name, seed=11)
    c = D.degrade(img, name, seed=12)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.params == b.params
    assert a.image.tobytes() != c.image.tobytes()
    assert a.image.dtype == np.float32 and a.image.flags.c_contiguous
    assert a.image.ndim == 3 and a.image.shape[2] == 3
    assert a.image.min() >= 0.0 and a.image.max() <= 1.0
    if name != "lowres":
        assert a.image.shape == img.shape
    assert not np.array_equal(a.image, img)
    text = json.dumps(a.params)
    assert json.loads(text) == a.params
    assert a.params["seed"] == 11 and a.degradations == [name]


@pytest.mark.parametrize("name", DEGRADATIONS)
def test_per_function_api_and_severity(img: np.ndarray, name: str) -> None:
    fn = D.FUNCTIONS[name]
    out1, p1 = fn(img, np.random.default_rng(3), severity=0.5)
    out2, p2 = fn(img, np.random.default_rng(3), severity=0.5)
    assert np.array_equal(out1, out2) and p1 == p2
    json.dumps(p1)
    for key, rng in D.DEFAULT_RANGES[name].items():  # severity-driven params sit at mid-range
        if rng.severity and key in p1 and not rng.integer and p1.get(key) is not None:
            assert math.isclose(p1[key], rng.at(0.5), rel_tol=1e-9), key


def test_input_coercion(img: np.ndarray) -> None:
    u8 = (img * 255).round().astype(np.uint8)
    assert D.as_image(u8).dtype == np.float32
    assert np.allclose(D.as_image(u8), img, atol=1 / 255)
    assert D.as_image(u8[..., 0]).shape == img.shape
    assert D.as_image(np.dstack([u8, u8[..., :1]])).shape == img.shape
    assert D.degrade(u8, "noise", seed=0).image.dtype == np.float32
    with pytest.raises(ValueError):
        D.as_image(np.zeros((4, 4, 2)))


def test_seed_none_is_recorded_and_replays(img: np.ndarray) -> None:
    a = D.degrade(img, "rain")
    assert isinstance(a.params["seed"], int)
    b = D.degrade(img, "rain", seed=a.params["seed"])
    assert np.array_equal(a.image, b.image)


def test_generator_seed_is_accepted(img: np.ndarray) -> None:
    a = D.degrade(img, "haze", seed=np.random.default_rng(4))
    b = D.degrade(img, "haze", seed=np.random.default_rng(4))
    assert np.array_equal(a.image, b.image) and a.params["seed"] is None


# ----------------------------------------------------------------------------- directions


def test_noise_sigma_on_flat_patch() -> None:
    grey = flat(0.5, 128)
    for sigma in (15, 25, 50):
        out, p = D.add_noise(grey, np.random.default_rng(sigma), sigma=sigma)
        assert p["sigma"] == sigma and not p["poisson"] and p["channel_correlated"] == 0
        assert abs(float(out.std()) - sigma / 255) < 0.05 * sigma / 255
        assert abs(float(out.mean()) - 0.5) < 0.01


def test_noise_channel_correlation_and_poisson() -> None:
    grey = flat(0.5)
    out, _ = D.add_noise(grey, 0, sigma=20, channel_correlated=1.0)
    assert np.allclose(out[..., 0], out[..., 1]) and np.allclose(out[..., 1], out[..., 2])
    ramp = np.repeat(np.linspace(0.05, 0.95, 96, dtype=np.float32)[None, :, None], 96, 0)
    ramp = np.repeat(ramp, 3, 2)
    out, p = D.add_noise(ramp, 0, sigma=0.0, poisson=20.0)
    resid = out - ramp
    assert p["poisson"] and p["peak"] == 20.0
    assert resid[:, 60:80].std() > 1.5 * resid[:, 5:25].std()  # shot noise grows with signal


def test_noise_severity_monotone() -> None:
    grey = flat(0.5)
    stds = [float(D.degrade(grey, "noise", seed=1, severity=s).image.std())
            for s in (0.1, 0.5, 0.9)]
    assert stds[0] < stds[1] < stds[2]


@pytest.mark.parametrize("kind", ["motion", "gaussian", "defocus"])
def test_blur_lowers_laplacian_variance(img: np.ndarray, kind: str) -> None:
    out, p = D.add_blur(img, np.random.default_rng(2), kind, severity=0.3)
    assert p["kind"] == kind
    assert lap_var(out) < 0.6 * lap_var(img)
    assert abs(float(out.mean()) - float(img.mean())) < 0.01  # kernels preserve energy


def test_kernels_are_normalised() -> None:
    rng = np.random.default_rng(0)
    for k in (D.motion_kernel(rng, 21, 0.7), D.gaussian_kernel(2.0, 0.8, 0.4), D.disk_kernel(3.5),
              D.sinc_kernel(1.5, 13)):
        assert k.dtype == np.float32 and k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
        assert math.isclose(float(k.sum()), 1.0, rel_tol=1e-5)
    k = D.motion_kernel(rng, 15, 0.9)
    assert k.min() >= 0 and (k > 0).sum() < 0.6 * k.size  # a thin path, not a blob


def test_motion_kernels_do_not_shift_the_image() -> None:
    rng = np.random.default_rng(3)
    for size, shake in ((7, 0.0), (15, 0.5), (23, 1.0), (31, 0.8)):
        k = D.motion_kernel(rng, size, shake)
        ys, xs = np.mgrid[:size, :size]
        c = (size - 1) / 2
        assert abs(float((k * xs).sum()) - c) < 1e-3 and abs(float((k * ys).sum()) - c) < 1e-3
        edges = np.concatenate([k[0], k[-1], k[:, 0], k[:, -1]])
        assert edges.max() > 0  # scaled until the path reaches the kernel's edge


def test_straight_motion_is_a_line() -> None:
    k = D.motion_kernel(np.random.default_rng(5), 25, 0.0)
    ys, xs = np.nonzero(k > 1e-3)
    w = k[ys, xs]
    cov = np.cov(np.stack([xs, ys]), aweights=w)
    ev = np.linalg.eigvalsh(cov)
    assert ev[0] < 0.05 * ev[1]


def test_haze_raises_dark_channel_lowers_saturation(img: np.ndarray) -> None:
    out, p = D.add_haze(img, np.random.default_rng(1), severity=0.5)
    assert dark_channel(out) > dark_channel(img) + 0.1
    assert saturation(out) < 0.8 * saturation(img)
    assert len(p["airlight"]) == 3 and 0.0 < p["transmission"][0] <= p["transmission"][2] <= 1.0
    assert p["depth"]["kind"] == "pseudo"


def test_haze_with_given_depth_and_airlight(img: np.ndarray) -> None:
    depth = np.tile(np.linspace(1.0, 0.0, img.shape[0], dtype=np.float32)[:, None], (1, 128))
    out, p = D.add_haze(img, 0, beta=2.0, airlight=[0.9, 0.9, 0.9], depth=depth)
    assert p["depth"]["kind"] == "given" and p["airlight"] == [0.9, 0.9, 0.9]
    top, bottom = np.abs(out - img)[:10].mean(), np.abs(out - img)[-10:].mean()
    assert top > 3 * bottom  # far (top) rows hazier than near ones
    d, _ = D.pseudo_depth(img, 0, near=0.2)
    assert d.shape == img.shape[:2] and d.min() >= 0.2 - 1e-6 and d.max() <= 1.0 + 1e-6


def test_lowlight_lowers_luminance(img: np.ndarray) -> None:
    means = [float(D.luminance(D.degrade(img, "lowlight", seed=3, severity=s).image).mean())
             for s in (0.0, 0.5, 1.0)]
    assert means[0] < float(D.luminance(img).mean()) * 0.8
    assert means[0] > means[1] > means[2]
    _, p = D.add_lowlight(img, 0, bits=6)
    assert p["bits"] == 6 and math.isclose(sum(p["gains"]) / 3, 1.0, rel_tol=1e-6)


def _orientation(image: np.ndarray) -> tuple[float, float]:
    """Dominant gradient angle (degrees) and coherence of the structure tensor."""
    y = D.luminance(image)
    gx, gy = cv2.Sobel(y, cv2.CV_32F, 1, 0), cv2.Sobel(y, cv2.CV_32F, 0, 1)
    jxx, jyy, jxy = float((gx * gx).sum()), float((gy * gy).sum()), float((gx * gy).sum())
    ang = 0.5 * math.degrees(math.atan2(2 * jxy, jxx - jyy))
    coherence = math.hypot(jxx - jyy, 2 * jxy) / (jxx + jyy)
    return ang, coherence


@pytest.mark.parametrize("angle", [0.0, 25.0, -30.0])
def test_rain_adds_oriented_high_frequency(angle: float) -> None:
    base = flat(0.35, 128)
    out, p = D.add_rain(base, np.random.default_rng(1), angle=angle, layers=1, severity=0.5)
    assert p["angle"] == angle and len(p["layer_params"]) == 1
    assert lap_var(out) > lap_var(base) + 1e-4
    assert out.mean() > base.mean()  # streaks are bright
    grad_angle, coherence = _orientation(out)
    assert coherence > 0.5
    assert abs(((grad_angle + angle) + 90) % 180 - 90) < 8  # gradients across the streaks


def test_rain_density_and_layers(img: np.ndarray) -> None:
    light, _ = D.add_rain(img, 0, severity=0.0, angle=10, length=20)
    heavy, p = D.add_rain(img, 0, severity=1.0, angle=10, length=20)
    assert p["layers"] == 3 and len(p["layer_params"]) == 3
    assert np.abs(heavy - img).mean() > 2 * np.abs(light - img).mean()


def _blob_count(image: np.ndarray) -> int:
    y = D.luminance(image)
    hat = cv2.morphologyEx(y, cv2.MORPH_TOPHAT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE,
                                                                          (9, 9)))
    n, _ = cv2.connectedComponents((hat > 0.2).astype(np.uint8))
    return n - 1


def test_snow_adds_bright_small_blobs(coffee: np.ndarray) -> None:
    out, p = D.add_snow(coffee, np.random.default_rng(2), severity=0.5, veil=0.0)
    assert len(p["layer_params"]) == p["layers"] == 3
    radii = [lp["radius"] for lp in p["layer_params"]]
    assert radii == sorted(radii) and radii[-1] == pytest.approx(p["size"])
    assert _blob_count(out) > _blob_count(coffee) + 25
    assert D.luminance(out).mean() > D.luminance(coffee).mean()


def test_snow_veil_brightens_and_flattens(coffee: np.ndarray) -> None:
    no_veil, _ = D.add_snow(coffee, 1, veil=0.0, density=0.02)
    veiled, _ = D.add_snow(coffee, 1, veil=0.3, density=0.02)
    assert dark_channel(veiled) > dark_channel(no_veil) + 0.05


# ----------------------------------------------------------------------------- low resolution


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_lowres_shapes(scale: int) -> None:
    image = np.random.default_rng(0).random((101, 77, 3), dtype=np.float32)
    out, p = D.add_lowres(image, 0, scale)
    assert out.shape == (101 // scale, 77 // scale, 3)
    assert p["lr_size"] == [101 // scale, 77 // scale] and p["crop"] == [101 // scale * scale,
                                                                          77 // scale * scale]
    real, rp = D.add_lowres(image, 0, scale, realistic=True)
    assert real.shape == out.shape and rp["chain"] and json.dumps(rp)
    again, rp2 = D.add_lowres(image, 0, scale, realistic=True)
    assert np.array_equal(real, again) and rp == rp2
    same, _ = D.add_lowres(image, 0, scale, keep_size=True)
    assert same.shape == image.shape


def test_bicubic_downscale_matches_the_sampling_grid() -> None:
    s = 4
    ramp = np.tile(np.arange(64, dtype=np.float32)[None, :, None], (16, 1, 3)) / 64
    small = D.bicubic_downscale(ramp, s)
    centres = (np.arange(16) * s + (s - 1) / 2) / 64  # footprint centres
    assert np.allclose(small[2, 2:-2, 0], centres[2:-2], atol=1e-5)
    const = D.bicubic_downscale(np.full((30, 30, 3), 0.3, np.float32), 3)
    assert np.allclose(const, 0.3, atol=1e-6)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_downscale_matches_antialiased_bicubic(img: np.ndarray, scale: int) -> None:
    """Away from the borders (symmetric padding there, as MATLAB), equal to Pillow's bicubic."""
    from PIL import Image

    h, w = img.shape[0] // scale, img.shape[1] // scale
    crop = img[: h * scale, : w * scale]
    ref = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(crop[..., c]), "F")
                               .resize((w, h), Image.BICUBIC)) for c in range(3)], -1)
    ours = D.bicubic_downscale(img, scale)
    assert np.abs(ours - ref)[3:-3, 3:-3].max() < 1e-5


def test_lowres_keep_size_is_aligned(img: np.ndarray) -> None:
    out, _ = D.add_lowres(img, 0, 2, keep_size=True)
    assert out.shape == img.shape
    assert np.abs(out - img).mean() < 0.05 and lap_var(out) < lap_var(img)


def test_lowres_severity_maps_to_scale(img: np.ndarray) -> None:
    scales = [D.degrade(img, "sr", seed=0, severity=s).params["steps"][0]["scale"]
              for s in (0.0, 0.5, 1.0)]
    assert scales == [2, 3, 4]


# ----------------------------------------------------------------------------- mixtures


def test_mixture_order_and_record(img: np.ndarray) -> None:
    d = D.degrade(img, "noise+rain+haze", seed=1, severity="medium", noise={"sigma": 10})
    assert d.degradations == ["haze", "rain", "noise"]
    steps = d.params["steps"]
    assert all(s["severity"] == 0.5 for s in steps) and steps[2]["sigma"] == 10
    json.dumps(d.params)
    given = D.degrade(img, ["noise", "haze"], seed=1, order="given")
    assert given.degradations == ["noise", "haze"]
    aliases = D.degrade(img, ["derain", "light_enhancement"], seed=1)
    assert aliases.degradations == ["rain", "lowlight"]


def test_mixture_with_lowres_changes_size(img: np.ndarray) -> None:
    small = D.degrade(img, "lowres+noise", seed=0, scale=2)
    assert small.image.shape == (64, 64, 3) and small.degradations == ["lowres", "noise"]
    kept = D.degrade(img, "lowres+noise", seed=0, scale=2, keep_size=True)
    assert kept.image.shape == img.shape


def test_overrides_flat_and_errors(img: np.ndarray) -> None:
    d = D.degrade(img, "noise", seed=0, sigma=25)
    assert d.params["steps"][0]["sigma"] == 25
    d = D.degrade(img, "rain+noise", seed=0, sigma=25)  # only noise takes sigma
    assert d.params["steps"][1]["sigma"] == 25
    with pytest.raises(ValueError, match="several steps"):
        D.degrade(img, "rain+snow", seed=0, angle=10)
    with pytest.raises(ValueError, match="unknown parameter"):
        D.degrade(img, "noise", seed=0, nonsense=1)
    with pytest.raises(D.DegradationError):
        D.degrade(img, "fog", seed=0)
    with pytest.raises(UsageError):
        D.degrade(img, "noise+noise", seed=0)
    with pytest.raises(ValueError):
        D.degrade(img, "noise", seed=0, severity=1.5)
    with pytest.raises(ValueError):
        D.degrade(img, "haze", seed=0, noise={"sigma": 5})
    assert D.degrade(img, "none", seed=0).params["steps"] == []


def test_random_degradation_varies_and_records(img: np.ndarray) -> None:
    small = img[:64, :64]
    seen, kinds = set(), set()
    for seed in range(40):
        d = D.random_degradation(small, seed, mixture_prob=0.3, keep_size=True)
        assert d.image.shape == small.shape and d.params["seed"] == seed
        assert d.params["primary"] in d.degradations
        assert d.degradations == sorted(d.degradations, key=D.ORDER.index)
        json.dumps(d.params)
        seen.add(len(d.degradations))
        kinds.update(d.degradations)
    assert seen >= {1, 2} and kinds == set(DEGRADATIONS)
    a = D.random_degradation(small, 7, mixture_prob=1.0)
    b = D.random_degradation(small, 7, mixture_prob=1.0)
    assert np.array_equal(a.image, b.image) and len(a.degradations) in (2, 3)


def test_random_degradation_mix_weights(img: np.ndarray) -> None:
    small = img[:48, :48]
    for seed in range(10):
        d = D.random_degradation(small, seed, mix={"derain": 1.0, "noise": 0.0})
        assert d.degradations == ["rain"]
    clean = D.random_degradation(small, 0, clean_prob=1.0)
    assert clean.params["steps"] == [] and np.array_equal(clean.image, small)
    with pytest.raises(ValueError):
        D.random_degradation(small, 0, mix={"rain": 0.0})


# ----------------------------------------------------------------------------- torch


def test_degrade_tensor_shapes_and_reproducibility(img: np.ndarray) -> None:
    batch = torch.from_numpy(np.stack([img[:64, :64], img[64:, 64:]])).permute(0, 3, 1, 2)
    out, params = D.degrade_tensor(batch, rng=3)
    assert out.shape == batch.shape and out.dtype == batch.dtype and len(params) == 2
    assert all(isinstance(p["seed"], int) for p in params)
    again, _ = D.degrade_tensor(batch, rng=3)
    assert torch.equal(out, again)
    kept, _ = D.degrade_tensor(batch, "lowres", rng=0, scale=4)
    assert kept.shape == batch.shape
    small, _ = D.degrade_tensor(batch, "lowres", rng=0, scale=4, keep_size=False)
    assert small.shape == (2, 3, 16, 16)
    half, p = D.degrade_tensor(batch.half(), "noise", rng=0, severity=0.5)
    assert half.dtype == torch.float16 and p[0]["steps"][0]["sigma"] == pytest.approx(28.0)
    with pytest.raises(ValueError):
        D.degrade_tensor(batch[:, :1], rng=0)
    with pytest.raises(ValueError):
        D.degrade_tensor(batch, rng=0, sigma=5)  # overrides need named degradations


def test_full_size_speed_sanity() -> None:
    """Every degradation runs on a 512 x 512 image (no timing assertion; see the report)."""
    image = np.ascontiguousarray(data.astronaut(), dtype=np.float32) / 255.0
    for name in (*DEGRADATIONS, "jpeg"):
        d = D.degrade(image, name, seed=0, severity=1.0)
        assert d.image.dtype == np.float32 and np.isfinite(d.image).all()
