"""bench/quality.py's scoring and cache rules (the benchmark itself needs ../shared/data)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("quality")
    finally:
        sys.path.remove(str(BENCH))


def _photo(h: int = 64, w: int = 72) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.random((h, w, 3)).astype(np.float32)
    return np.round(x * 255) / 255  # on the 8-bit grid, as every scored output is


def test_register_undoes_an_integer_shift(quality) -> None:
    gt = _photo()
    moved = np.roll(gt, (2, -3), axis=(0, 1))
    out, ref = quality.register(moved, gt, 4)
    assert out.shape == ref.shape == (56, 64, 3)
    np.testing.assert_array_equal(out, ref)


def test_aligned_score_forgives_the_shift_and_reports_the_plain_one(quality) -> None:
    gt = _photo()
    moved = np.roll(gt, (1, 2), axis=(0, 1))
    plain = quality.score(moved, gt, 0)
    aligned = quality.score(moved, gt, 0, align=3)
    assert "psnr_unaligned" not in plain
    assert aligned["psnr_unaligned"] == pytest.approx(plain["psnr"])
    assert aligned["ssim_unaligned"] == pytest.approx(plain["ssim"])
    assert plain["psnr"] < 15 and aligned["psnr"] > 60 and aligned["ssim"] > 0.999


def _spec(quality, name: str):
    return next(s for s in quality.SETS if s.name == name)


def test_levin09_recipe_says_it_is_aligned(quality) -> None:
    spec = _spec(quality, "Levin09")
    assert spec.align > 0 and f"±{spec.align} px" in spec.recipe()


def test_seed_cache_skips_sets_made_by_an_older_generator(quality, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(quality, "OUT_DIR", tmp_path / "out")
    blur, haze = _spec(quality, "CBSD68-motionblur"), _spec(quality, "CBSD68-haze")
    assert blur.revisions == {"blur": 2} and haze.revisions == {"haze": 1}

    def report(spec, revisions):
        row = {"method": "input", "settings": "identity", "per_image": {"a.png": {"psnr": 20.0}}}
        entry = {"name": spec.name, "recipe": spec.recipe(), "rows": [row]}
        return entry | ({"revisions": revisions} if revisions is not None else {})

    old = tmp_path / "old.json"
    # a report from before revisions existed: every degradation was at revision 1
    old.write_text(json.dumps({"sets": [report(blur, None), report(haze, None)]}))
    assert quality.seed_cache(old, [blur, haze]) == 1  # haze only
    assert quality.Cache(haze, enabled=True).get(quality.baselines_for(haze)[0])
    assert not quality.Cache(blur, enabled=True).get(quality.baselines_for(blur)[0])
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"sets": [report(blur, {"blur": 2})]}))
    assert quality.seed_cache(new, [blur]) == 1
    assert quality.Cache(blur, enabled=True).get(quality.baselines_for(blur)[0])


def test_the_model_reference_names_task_experts(quality, tmp_path: Path) -> None:
    """A benchmarked model folder with experts records each expert's sha256 beside its own."""
    import torch

    from fapecli.execution.compact import create_model
    from fapecli.weights import sha256_file

    torch.manual_seed(0)
    create_model("fape-tiny").save_pretrained(tmp_path / "m")
    create_model("fape-tiny").save_pretrained(tmp_path / "m" / "experts" / "denoise")
    ref = quality.resolve_model(str(tmp_path / "m"))
    assert ref.weights == tmp_path / "m" / "model.safetensors"
    want = sha256_file(tmp_path / "m" / "experts" / "denoise" / "model.safetensors")
    assert ref.experts == {"denoise": want} and ref.sha256 != want
