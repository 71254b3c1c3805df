"""The label-free feature pool: each cue rises with its own degradation."""

from __future__ import annotations

import numpy as np
import pytest

from fapecli.planning.features import FeaturePool, extract_features, luma, score_features
from fapecli.tasks import TASK_NAMES

skimage_data = pytest.importorskip("skimage.data")


def _img(name: str) -> np.ndarray:
    a = getattr(skimage_data, name)()
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a, dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return _img("coffee")  # 400 x 600 colour photo


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return _img("chelsea")  # 300 x 451 colour photo


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return _img("camera")  # 512 x 512 grey photo, three equal channels


@pytest.fixture(scope="module")
def clean_pool(coffee: np.ndarray) -> FeaturePool:
    return extract_features(coffee)


def _degrade(image: np.ndarray, name: str, seed: int = 0, **kw) -> np.ndarray:
    from fapecli.training.degrade import degrade

    return degrade(image, name, seed=seed, **kw).image


def _noisy(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0, sigma / 255, image.shape), 0, 1).astype(np.float32)


def test_pool_has_every_task_and_raw_cue(clean_pool: FeaturePool, coffee: np.ndarray) -> None:
    assert set(clean_pool.scores) == set(TASK_NAMES)
    assert all(0.0 <= v <= 1.0 for v in clean_pool.scores.values())
    assert clean_pool.size == coffee.shape[:2]
    assert clean_pool.seconds > 0
    for key in ("rain.excess", "rain.peak_share", "snow.excess", "noise.sigma", "noise.sigma_luma",
                "noise.sigma_chroma", "blur.sharpness", "blur.lap_var", "haze.dark_channel",
                "haze.saturation", "light.mean", "light.p99", "size.side", "sr.blockiness"):
        assert key in clean_pool.raw
        assert np.isfinite(clean_pool.raw[key])
    assert clean_pool.scores == score_features(clean_pool.raw)


def test_clean_photo_has_no_strong_evidence(clean_pool: FeaturePool) -> None:
    assert max(clean_pool.scores.values()) < 0.5, clean_pool.scores


def test_noise_cue_rises_with_sigma(coffee: np.ndarray) -> None:
    pools = [extract_features(_noisy(coffee, s)) for s in (0, 10, 25, 50)]
    sig = [p.raw["noise.sigma"] for p in pools]
    assert sig == sorted(sig), sig
    assert sig[0] < 4 < 8 < sig[1]
    assert abs(sig[2] - 25) < 5 and abs(sig[3] - 50) < 10
    assert pools[0].scores["denoise"] < 0.2 < 0.8 < pools[2].scores["denoise"]


def test_grey_noise_measured_on_luma(camera: np.ndarray) -> None:
    g = camera[:, :, :1]
    noisy = np.repeat(_noisy(g, 25), 3, axis=2)
    pool = extract_features(noisy)
    assert pool.raw["color.grey"] == 1.0
    assert pool.raw["noise.sigma_chroma"] == 0.0
    assert abs(pool.raw["noise.sigma"] - 25) < 5


def test_jpeg_compressed_clean_photo_is_not_noise(coffee: np.ndarray) -> None:
    pool = extract_features(_degrade(coffee, "jpeg", quality=30))
    assert pool.scores["denoise"] < 0.3


def test_blur_empties_the_fine_band(coffee: np.ndarray) -> None:
    sharp = extract_features(coffee)
    soft = extract_features(_degrade(coffee, "blur", kind="gaussian", sigma=3.0, aspect=1.0))
    motion = extract_features(_degrade(coffee, "blur", seed=3, kind="motion", size=21))
    horizontal = extract_features(_degrade(coffee, "blur", kind="gaussian", sigma=4.0,
                                           aspect=0.1, theta=0.0))
    for p in (soft, motion, horizontal):
        assert p.raw["blur.fine_ratio"] < 0.5 * sharp.raw["blur.fine_ratio"]
        assert p.raw["blur.sharpness"] < sharp.raw["blur.sharpness"]
        assert p.scores["deblur"] > 0.7 > 0.1 > sharp.scores["deblur"]
    assert horizontal.raw["blur.direction"] == 0.0


def test_blur_cue_is_insensitive_to_noise(coffee: np.ndarray) -> None:
    pool = extract_features(_noisy(coffee, 25))
    assert pool.scores["deblur"] < 0.3


def test_haze_raises_veil_and_lowers_contrast(coffee: np.ndarray, clean_pool: FeaturePool) -> None:
    hazy = extract_features(_degrade(coffee, "haze", severity="severe"))
    assert hazy.raw["haze.dark_channel_norm"] > clean_pool.raw["haze.dark_channel_norm"]
    assert hazy.raw["haze.saturation"] < clean_pool.raw["haze.saturation"]
    assert hazy.raw["haze.local_contrast"] < clean_pool.raw["haze.local_contrast"]
    assert hazy.scores["dehaze"] > 0.7 > clean_pool.scores["dehaze"]


def test_darkness_raises_low_light(coffee: np.ndarray, clean_pool: FeaturePool) -> None:
    dark = extract_features(np.clip(coffee * 0.12, 0, 1) ** 1.2)
    assert dark.raw["light.mean"] < 0.1 < clean_pool.raw["light.mean"]
    assert dark.scores["lowlight"] > 0.8 > 0.1 > clean_pool.scores["lowlight"]


def test_grey_images_do_not_read_as_low_light_or_haze(camera: np.ndarray) -> None:
    pool = extract_features(camera)
    assert pool.raw["color.grey"] == 1.0
    assert pool.raw["haze.saturation"] == 0.0
    assert pool.scores["lowlight"] < 0.1
    assert pool.scores["dehaze"] < 0.5


def test_rain_streaks_raise_the_rain_cue(chelsea: np.ndarray) -> None:
    clean = extract_features(chelsea)
    rainy = extract_features(_degrade(chelsea, "rain", seed=1, severity="severe", length=30,
                                      angle=10.0, veil=0.0))
    assert rainy.raw["rain.excess"] > clean.raw["rain.excess"] + 2
    assert rainy.raw["rain.length"] > 12
    assert rainy.scores["derain"] > 0.7 > clean.scores["derain"]


def test_snow_flakes_raise_the_snow_cue(chelsea: np.ndarray) -> None:
    clean = extract_features(chelsea)
    snowy = extract_features(_degrade(chelsea, "snow", seed=2, severity="severe", veil=0.0))
    assert snowy.raw["snow.excess"] > clean.raw["snow.excess"] + 500
    assert snowy.raw["snow.ratio"] > clean.raw["snow.ratio"]
    assert snowy.scores["desnow"] > 0.5 > clean.scores["desnow"]


def test_small_size_leans_sr_but_not_a_mid_size_clean_photo(chelsea: np.ndarray) -> None:
    tiny = extract_features(chelsea, size=(75, 112))
    assert tiny.size == (75, 112)
    assert tiny.scores["sr"] > 0.9
    mid = extract_features(chelsea)  # 300 x 451: small-ish but clean
    assert mid.scores["sr"] < 0.5
    lowres = extract_features(_degrade(chelsea, "lowres", scale=4))
    assert lowres.scores["sr"] > 0.9


def test_accepts_uint8_grey_and_rgba(camera: np.ndarray) -> None:
    u8 = (camera * 255).astype(np.uint8)
    a = extract_features(u8[:, :, 0])
    b = extract_features(camera)
    assert a.raw["color.grey"] == 1.0
    assert a.scores == b.scores
    rgba = np.concatenate([camera, np.ones_like(camera[:, :, :1])], axis=2)
    assert extract_features(rgba).scores == b.scores
    with pytest.raises(ValueError):
        extract_features(np.zeros((4, 4, 2), np.float32))


def test_tiny_and_flat_images_do_not_crash() -> None:
    for shape in ((8, 8, 3), (33, 17, 3), (64, 700, 3)):
        pool = extract_features(np.full(shape, 0.5, np.float32))
        assert all(np.isfinite(v) for v in pool.raw.values())
        assert set(pool.scores) == set(TASK_NAMES)


def test_luma_weights() -> None:
    px = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], np.float32)
    assert np.allclose(luma(px), [[0.299, 0.587, 0.114]], atol=1e-6)
