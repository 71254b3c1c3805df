"""`fape score` library: exact PSNR/SSIM, offline NIQE, missing weights, pairing, odd inputs."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fapecli.errors import UsageError
from fapecli.io import from_array, write_image
from fapecli.scoring import metrics as M
from fapecli.scoring import niqe, score
from fapecli.scoring.pairing import loose_stem, pair_images
from fapecli.weights import torch_hub_dir


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test at once (nothing here may use the network)."""

    def refuse(self: socket.socket, address: object) -> None:
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _distort(img: np.ndarray, seed: int = 0, sigma: float = 0.05) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, img.shape)
    return np.clip(img + noise, 0.0, 1.0).astype(np.float32)


def _y(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma as BasicSR computes it (written out independently of fape's code)."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    return (16.0 + 65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def _sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
    channel_axis = 2 if a.ndim == 3 else None
    return structural_similarity(
        a.astype(np.float64),
        b.astype(np.float64),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=channel_axis,
    )


def _sk_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return peak_signal_noise_ratio(b.astype(np.float64), a.astype(np.float64), data_range=1.0)


# --------------------------------------------------------------------------- PSNR / SSIM


@pytest.mark.parametrize("y_channel", [False, True])
def test_psnr_ssim_agree_with_scikit_image(photo: np.ndarray, y_channel: bool) -> None:
    out = _distort(photo)
    report = score([out], [photo], metrics=["psnr", "ssim"], y_channel=y_channel)
    values = report.rows[0].values
    a, b = (_y(out), _y(photo)) if y_channel else (out, photo)
    assert abs(values["psnr"] - _sk_psnr(a, b)) < 0.01
    assert abs(values["ssim"] - _sk_ssim(a, b)) < 0.001
    assert report.summary["psnr"].direction == "higher"


def test_crop_border_and_strips_are_exact(
    photo: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row strips (forced small here) and crop_border give the same numbers as one pass."""
    monkeypatch.setattr(M, "_strip_rows", lambda width, channels: 37)
    out = _distort(photo, seed=3)
    got = M.ssim(out, photo, y_channel=True, crop_border=4)
    want = _sk_ssim(_y(out)[4:-4, 4:-4], _y(photo)[4:-4, 4:-4])
    assert abs(got - want) < 1e-9
    got_psnr = M.psnr(out, photo, crop_border=4)
    assert abs(got_psnr - _sk_psnr(out[4:-4, 4:-4], photo[4:-4, 4:-4])) < 1e-9


def test_psnr_matches_pyiqa_on_y() -> None:
    """pyiqa's PSNR (BT.601 'ycbcr' luma) gives the same value; its eps costs < 0.001 dB."""
    import pyiqa
    import torch

    rng = np.random.default_rng(1)
    ref = rng.random((48, 40, 3)).astype(np.float32)
    out = _distort(ref, seed=2)
    metric = pyiqa.create_metric(
        "psnr", test_y_channel=True, color_space="ycbcr", crop_border=2, device="cpu"
    )

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).permute(2, 0, 1)[None]

    theirs = float(metric(tensor(out), tensor(ref)))
    assert abs(M.psnr(out, ref, y_channel=True, crop_border=2) - theirs) < 0.01


def test_grey_pairs_use_the_grey_plane(photo: np.ndarray) -> None:
    grey = photo.mean(axis=2, keepdims=True)
    out = _distort(grey, seed=4)
    report = score([out], [grey], metrics="psnr,ssim", y_channel=True)
    values = report.rows[0].values
    assert abs(values["psnr"] - _sk_psnr(out[..., 0], grey[..., 0])) < 0.01
    assert abs(values["ssim"] - _sk_ssim(out[..., 0], grey[..., 0])) < 0.001


def test_sixteen_bit_precision_is_kept(tmp_path: Path) -> None:
    """A 16-bit PNG is scored at 16 bits: rounding it to 8 bits would change PSNR a lot."""
    rng = np.random.default_rng(5)
    ref16 = (rng.random((40, 50, 3)) * 65535).astype(np.uint16)
    out16 = np.clip(ref16.astype(np.int32) + rng.integers(-40, 41, ref16.shape), 0, 65535)
    out16 = out16.astype(np.uint16)
    write_image(from_array(ref16), tmp_path / "gt" / "a.png")
    write_image(from_array(out16), tmp_path / "out" / "a.png")
    report = score([tmp_path / "out"], [tmp_path / "gt"], metrics="psnr,ssim")
    want = _sk_psnr(out16 / 65535.0, ref16 / 65535.0)
    assert report.rows[0].values["psnr"] == pytest.approx(want, abs=0.01)
    assert want > 60  # at 8 bits the two images would be (almost) identical
    assert abs(report.rows[0].values["ssim"] - _sk_ssim(out16 / 65535.0, ref16 / 65535.0)) < 1e-3


def test_alpha_is_dropped(tmp_path: Path, photo: np.ndarray) -> None:
    small = photo[:64, :64]
    alpha = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64, 1)
    out = _distort(small, seed=6)
    write_image(from_array(np.concatenate([out, alpha], axis=2)), tmp_path / "o" / "x.png")
    write_image(from_array(small), tmp_path / "g" / "x.png")
    report = score([tmp_path / "o"], [tmp_path / "g"], metrics="psnr")
    quantised = np.round(out * 255) / 255
    assert report.rows[0].values["psnr"] == pytest.approx(_sk_psnr(quantised, small), abs=0.01)
    assert any("alpha" in note for note in report.notes)


def test_size_mismatch(photo: np.ndarray) -> None:
    big, small = photo[:100, :120], photo[10:90, 20:100]
    report = score([small, photo[:50, :50]], [big, photo[:50, :50]], metrics="psnr,ssim")
    assert report.rows[0].values == {"psnr": None, "ssim": None}
    assert "size mismatch" in report.errors[0].message and report.errors[0].metric is None
    assert report.rows[1].values["psnr"] == math.inf  # the other pair still scored

    resized = score([small], [big], metrics="psnr", resize_ref=True)
    assert resized.rows[0].values["psnr"] is not None
    assert "resized" in resized.rows[0].notes[0]

    cropped = score([photo[:80, :80]], [photo[:100, :120]], metrics="psnr", center_crop=True)
    assert cropped.rows[0].values["psnr"] == pytest.approx(
        _sk_psnr(photo[:80, :80], photo[10:90, 20:100])
    )


# --------------------------------------------------------------------------- NIQE


def test_niqe_runs_offline_and_prefers_the_clean_image(photo: np.ndarray) -> None:
    noisy = _distort(photo, seed=7, sigma=0.08)
    report = score([photo, noisy])  # no refs: the no-reference defaults
    clean_v, noisy_v = (row.values["niqe"] for row in report.rows)
    assert math.isfinite(clean_v) and math.isfinite(noisy_v)
    assert clean_v < noisy_v
    assert report.summary["niqe"].lower_better
    assert {"musiq", "maniqa", "clipiqa", "topiq_nr"} <= set(report.unavailable)


def test_niqe_parameters_are_the_published_model(tmp_path: Path) -> None:
    """The parameters come from the BasicSR package, which ships NIQE's published model
    (MATLAB release ``modelparameters.mat``; pyiqa's ``niqe_modelparameters.mat`` holds the same
    numbers). pyiqa's file cannot be downloaded here, so this checks shapes, symmetry and
    positive definiteness, a few entries against the values in that release, and the file
    fape writes for pyiqa; equality with pyiqa's own file is checked in the next test."""
    params = niqe.load_params()
    assert params.mu.shape == (36,) and params.cov.shape == (36, 36)
    assert np.allclose(params.cov, params.cov.T)
    assert np.linalg.eigvalsh(params.cov).min() > 0
    assert params.mu[:4] == pytest.approx([2.60131368, 0.90570272, 0.81204778, 0.09042671])
    assert params.cov[0, :2] == pytest.approx([0.4534781, 0.0961011], abs=1e-7)

    import scipy.io

    written = niqe.params_file(params)  # into fape's own cache (a temporary one in tests)
    assert written.is_relative_to(Path(os.environ["XDG_CACHE_HOME"]) / "fape")
    assert written.name == "niqe_modelparameters.mat"
    data = scipy.io.loadmat(written)
    assert np.array_equal(np.ravel(data["mu_prisparam"]), params.mu)
    assert np.array_equal(data["cov_prisparam"], params.cov)


def test_niqe_reproduces_pyiqa_calibration() -> None:
    """pyiqa publishes its NIQE scores of ResultsCalibra/dist_dir (calibration_summary.csv,
    "niqe(ours)": I04 3.6549, I06 3.2342), computed with its niqe_modelparameters.mat. The
    same scores from BasicSR's parameters show the two files hold the same model. The images
    ship with the pyiqa wheel; skipped where they are absent."""
    import importlib.util

    spec = importlib.util.find_spec("ResultsCalibra")
    folder = Path(next(iter(spec.submodule_search_locations))) / "dist_dir" if spec else None
    if folder is None or not (folder / "I04.bmp").is_file():
        pytest.skip("pyiqa's calibration images are not installed")
    report = score([folder / "I04.bmp", folder / "I06.bmp"], metrics="niqe")
    got = [row.values["niqe"] for row in report.rows]
    assert got == pytest.approx([3.6549, 3.2342], abs=2e-3)


# --------------------------------------------------------------------------- missing weights


def test_missing_weights_are_reported_and_others_still_run(photo: np.ndarray) -> None:
    out = _distort(photo)
    report = score([out], [photo], metrics="psnr,lpips,ssim", device="cpu")
    reason = report.unavailable["lpips"]
    assert "LPIPS_v0.1_alex-df73285e.pth" in reason
    assert str(torch_hub_dir() / "pyiqa") in reason
    assert report.metrics == ["psnr", "ssim"]
    assert report.rows[0].values["psnr"] is not None and report.rows[0].values["ssim"] is not None
    assert M.missing_weights("dists")  # its pyiqa file and torchvision's VGG16 are both missing
    assert any("vgg16-397923af.pth" in m for m in M.missing_weights("dists"))


def test_undeclared_pyiqa_metric_never_downloads() -> None:
    rng = np.random.default_rng(8)
    report = score([rng.random((64, 64, 3)).astype(np.float32)], metrics="brisque", device="cpu")
    assert "brisque_svm_weights.pth" in report.unavailable["brisque"]
    assert "does not download" in report.unavailable["brisque"]
    import sys

    import pyiqa.utils.download_util as download_util

    original = download_util.load_file_from_url
    assert original.__module__ == "pyiqa.utils.download_util"  # the guard put it back
    for name, module in list(sys.modules.items()):
        if name.startswith("pyiqa") and hasattr(module, "load_file_from_url"):
            assert module.load_file_from_url is original, name


def test_full_reference_metric_without_refs(photo: np.ndarray) -> None:
    report = score([photo], metrics="psnr,niqe")
    assert "give references" in report.unavailable["psnr"]
    assert report.metrics == ["niqe"]


def test_loader_builds_metrics() -> None:
    from fapecli.loader import load_model

    metric = load_model("ssim", device="cpu")
    img = np.random.default_rng(9).random((32, 32, 3)).astype(np.float32)
    assert metric(img, img) == pytest.approx(1.0)


class _Dummy:
    """Stands in for a pyiqa metric: the mean of the output."""

    def __init__(self, policy: str) -> None:
        self.info = M.MetricInfo("dummy", "dummy", "FR", True, policy, None)
        self.calls: list[tuple[int, int]] = []

    def __call__(self, out, ref=None) -> float:
        self.calls.append(tuple(out.shape[-2:]))
        return float(out.mean())


@pytest.mark.parametrize("policy", ["tile", "downscale"])
def test_large_images_are_tiled_or_downscaled(policy: str) -> None:
    img = np.random.default_rng(10).random((300, 500, 3)).astype(np.float32)
    tensor = M.to_tensor(img)
    dummy = _Dummy(policy)
    value, note = M.run_learned(dummy, tensor, tensor, max_pixels=100 * 100)
    assert value == pytest.approx(float(img.mean()), abs=1e-3)
    assert note and all(h * w <= 300 * 500 for h, w in dummy.calls)
    if policy == "downscale":
        assert dummy.calls[0][0] * dummy.calls[0][1] <= 100 * 100


# --------------------------------------------------------------------------- pairing and report


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(from_array(np.zeros((12, 12, 3), np.uint8)), path)
    return path


def test_pairing_by_relative_path_stem_and_suffix(tmp_path: Path) -> None:
    out, gt = tmp_path / "out", tmp_path / "gt"
    _touch(out / "a" / "x.png")
    _touch(gt / "a" / "x.jpg")  # relative path, other extension
    _touch(gt / "b" / "x.png")  # same stem elsewhere: path wins
    _touch(out / "y.png")
    _touch(gt / "deep" / "y.bmp")  # stem
    _touch(out / "z_fape.png")
    _touch(gt / "Z.png")  # suffix + case
    _touch(out / "lonely.png")
    _touch(gt / "orphan.png")
    pairing = pair_images([out], [gt])
    got = {p.name: (p.ref.relative_to(gt).as_posix(), p.matched_by) for p in pairing.pairs}
    assert got == {
        "a/x.png": ("a/x.jpg", "path"),
        "y.png": ("deep/y.bmp", "stem"),
        "z_fape.png": ("Z.png", "suffix"),
    }
    assert [p.name for p in pairing.unmatched_outputs] == ["lonely.png"]
    assert sorted(p.name for p in pairing.unmatched_refs) == ["orphan.png", "x.png"]
    assert loose_stem("img_001_SR") == "img_001" and loose_stem("rain-lq") == "rain"


def test_ambiguous_and_single_file_pairs(tmp_path: Path) -> None:
    _touch(tmp_path / "out" / "k.png")
    _touch(tmp_path / "gt" / "1" / "k.png")
    _touch(tmp_path / "gt" / "2" / "k.png")
    pairing = pair_images([tmp_path / "out"], [tmp_path / "gt"])
    assert not pairing.pairs and pairing.problems and "k.png" in pairing.problems[0][0]
    single = pair_images([tmp_path / "out" / "k.png"], [tmp_path / "gt" / "2" / "k.png"])
    assert single.pairs[0].matched_by == "given"


def test_report_json_and_csv(tmp_path: Path, photo: np.ndarray) -> None:
    small = photo[:40, :40]
    write_image(from_array(small), tmp_path / "o" / "same.png")
    write_image(from_array(small), tmp_path / "g" / "same.png")
    _touch(tmp_path / "o" / "extra.png")
    seen: list[tuple[int, int, str]] = []
    report = score(
        [tmp_path / "o"],
        [tmp_path / "g"],
        metrics=["psnr", "ssim"],
        progress=lambda *a: seen.append(a),
    )
    assert seen == [(1, 1, "same.png")]
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["images"][0]["scores"]["psnr"] == "inf"
    assert data["metrics"]["ssim"] == {
        "mode": "FR", "direction": "higher", "lower_better": False,
        "mean": pytest.approx(1.0), "std": 0.0, "count": 1,
    }  # fmt: skip
    assert data["unmatched"]["outputs"][0].endswith("extra.png")
    rows = report.csv_rows()
    assert rows[0] == ["name", "output", "ref", "psnr", "ssim", "errors"]
    assert rows[1][3] == "inf" and len(report.summary_rows()) == 3


def test_metric_directions_come_from_pyiqa() -> None:
    infos = {info.name: info for info in M.list_metrics()}
    assert set(M.DEFAULT_FR + M.DEFAULT_NR) <= set(infos)
    assert [infos[n].direction for n in ("psnr", "ssim", "lpips", "dists", "niqe", "musiq")] == [
        "higher", "higher", "lower", "lower", "lower", "higher",
    ]  # fmt: skip
    assert infos["fid"].mode == "set" and infos["lpips"].mode == "FR"
    with pytest.raises(UsageError, match="unknown metric"):
        score([np.zeros((8, 8, 3), np.float32)], metrics="no-such-metric")
