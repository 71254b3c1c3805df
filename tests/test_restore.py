"""`fape restore` end to end on a small random executor saved like a shipped checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fapecli import loader
from fapecli.cli import app
from fapecli.io import Image, from_array, read_image, write_image

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fape-tiny checkpoint with non-zero experts, so plans change the output."""
    from fapecli.execution.compact import create_model

    torch.manual_seed(0)
    model = create_model("fape-tiny")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("out."):
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def _fresh_loader():
    loader.clear_cache()
    yield
    loader.clear_cache()


def _restore(*args: str, input: bytes | str | None = None):
    return runner.invoke(app, ["restore", *args], input=input)


def _photo_file(path: Path, photo: np.ndarray, **meta) -> Path:
    image = from_array((photo * 255).round().astype(np.uint8))
    for k, v in meta.items():
        setattr(image, k, v)
    write_image(image, path)
    return path


def test_folder_is_restored_with_mirrored_tree_and_json_records(tmp_path, photo, model_dir):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    _photo_file(src / "a.png", photo[:64, :80])
    _photo_file(src / "sub" / "b.jpg", photo[:48, :48])
    (src / "sub" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    result = _restore(str(src), "-o", str(out), "-m", str(model_dir), "--task", "denoise", "--json")
    assert result.exit_code == 1  # bad.png failed, the rest went on
    records = [json.loads(line) for line in result.stdout.splitlines()]
    ok = [r for r in records if "error" not in r]
    errors = [r for r in records if "error" in r]
    assert len(ok) == 2 and len(errors) == 1 and "bad.png" in errors[0]["input"]
    assert set(ok[0]) >= {"input", "output", "plan", "seconds", "tiles"}
    assert ok[0]["plan"]["task"] == "denoise" and ok[0]["tiles"] >= 1
    assert (out / "a.png").is_file() and (out / "sub" / "b.jpg").is_file()
    assert read_image(out / "a.png").pixels.shape == (64, 80, 3)
    assert not list(out.rglob("*.part"))


def test_skip_existing_resumes_a_batch_and_overwrite_replaces(tmp_path, photo, model_dir):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b", "c"):
        _photo_file(src / f"{name}.png", photo[:32, :32])
    out = tmp_path / "out"
    args = [str(src), "-o", str(out), "-m", str(model_dir), "-t", "denoise", "--json"]
    assert _restore(*args).exit_code == 0
    (out / "b.png").unlink()  # as if the batch had been interrupted before b
    again = _restore(*args)
    assert [json.loads(r)["input"] for r in again.stdout.splitlines()] == [str(src / "b.png")]
    forced = _restore(*args, "--overwrite")
    assert len(forced.stdout.splitlines()) == 3


def test_alpha_16bit_and_grey_are_carried_through(tmp_path, photo, model_dir):
    rgba16 = np.concatenate([photo[:40, :40], np.linspace(0, 1, 1600).reshape(40, 40, 1)], 2)
    write_image(from_array((rgba16 * 65535).round().astype(np.uint16)), tmp_path / "a16.png")
    grey = (photo[:40, :40].mean(2) * 255).astype(np.uint8)
    write_image(from_array(grey), tmp_path / "g.png")
    out = tmp_path / "out"
    r = _restore(str(tmp_path / "a16.png"), str(tmp_path / "g.png"), "-o", str(out),
                 "-m", str(model_dir), "-t", "denoise")
    assert r.exit_code == 0, r.output
    a16, g = read_image(out / "a16.png"), read_image(out / "g.png")
    assert a16.bit_depth == 16 and a16.alpha is not None
    np.testing.assert_allclose(a16.alpha, rgba16[..., 3], atol=1 / 65535)
    assert g.is_grey and g.pixels.shape == (40, 40, 1)


def test_scale_upsamples_image_and_alpha(tmp_path, photo, model_dir):
    rgba = np.concatenate([photo[:24, :20], np.ones((24, 20, 1), np.float32) * 0.5], 2)
    write_image(from_array((rgba * 255).round().astype(np.uint8)), tmp_path / "s.png")
    r = _restore(str(tmp_path / "s.png"), "-o", str(tmp_path / "o"), "-m", str(model_dir),
                 "-t", "denoise", "--scale", "2", "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert "sr" in [rec["plan"]["task"], *rec["plan"]["secondary"]] and rec["plan"]["scale"] == 2
    out = read_image(tmp_path / "o" / "s.png")
    assert out.pixels.shape == (48, 40, 3) and out.alpha.shape == (48, 40)


def test_metadata_suffix_and_ext(tmp_path, photo, model_dir):
    from PIL import Image as PILImage

    exif = PILImage.Exif()
    exif[0x010F] = "fape-test-camera"
    icc = b"\x00" * 128  # opaque bytes are carried as they are by PNG
    src = tmp_path / "m.png"
    image = from_array((photo[:32, :32] * 255).astype(np.uint8))
    image.exif, image.icc_profile = b"Exif\x00\x00" + exif.tobytes(), icc
    write_image(image, src)
    r = _restore(str(src), "-o", str(tmp_path / "o"), "-m", str(model_dir), "-t", "denoise",
                 "--suffix", "_fape", "--ext", "jpg")
    assert r.exit_code == 0, r.output
    out = read_image(tmp_path / "o" / "m_fape.jpg")
    assert out.format == "jpeg" and b"fape-test-camera" in (out.exif or b"")


def test_stdin_to_stdout(tmp_path, photo, model_dir):
    src = _photo_file(tmp_path / "in.png", photo[:32, :32])
    r = runner.invoke(app, ["restore", "-", "-o", "-", "-m", str(model_dir), "-t", "denoise"],
                      input=src.read_bytes())
    assert r.exit_code == 0, r.stderr
    assert r.stdout_bytes.startswith(b"\x89PNG")


def test_plan_file_is_reused(tmp_path, photo, model_dir):
    src = _photo_file(tmp_path / "p.png", photo[:32, :32])
    plans = tmp_path / "plans.jsonl"
    record = {"input": str(src), "plan": {"task": "dehaze", "band": "low", "rationale": "mine"}}
    plans.write_text(json.dumps(record) + "\n")
    r = _restore(str(src), "-o", str(tmp_path / "o"), "-m", str(model_dir), "--plan", str(plans),
                 "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)["plan"]
    assert plan["task"] == "dehaze" and plan["rationale"] == "mine"


def test_forced_plan_changes_the_output(photo, model_dir):
    from fapecli.restore import restore_image

    net = loader.load_model(model_dir, device="cpu")
    image = from_array(photo[:32, :32])
    a = restore_image(image, net, task="derain").image.pixels
    b = restore_image(image, net, task="dehaze").image.pixels
    assert np.abs(a - b).max() > 1e-4


def test_nan_output_is_rejected(tmp_path, photo, model_dir, monkeypatch):
    from fapecli.execution.compact import FapeS

    src = _photo_file(tmp_path / "n.png", photo[:32, :32])
    monkeypatch.setattr(FapeS, "forward", lambda self, x, plans=None, tokens=None: x * np.nan)
    r = _restore(str(src), "-o", str(tmp_path / "o"), "-m", str(model_dir), "-t", "denoise")
    assert r.exit_code == 1 and "NaN" in r.stderr
    assert not (tmp_path / "o" / "n.png").exists()


def test_explain_writes_a_routing_map(tmp_path, photo, model_dir):
    src = _photo_file(tmp_path / "e.png", photo[:40, :48])
    r = _restore(str(src), "-o", str(tmp_path / "o"), "-m", str(model_dir), "-t", "derain",
                 "--explain", "--json")
    assert r.exit_code == 0, r.output
    routing = read_image(tmp_path / "o" / "e.routing.png")
    assert routing.pixels.shape[:2] == (40, 48)
    shares = json.loads(r.stdout)["routing"]
    assert abs(shares["low"] + shares["high"] - 1) < 1e-6


def test_output_that_is_an_input_is_refused(tmp_path, photo, model_dir):
    src = _photo_file(tmp_path / "same.png", photo[:32, :32])
    before = src.read_bytes()
    r = _restore(str(src), "-o", str(tmp_path), "-m", str(model_dir), "-t", "denoise")
    assert r.exit_code == 1 and "overwrite an input" in r.stderr
    assert src.read_bytes() == before


def test_missing_default_model_is_a_clear_error(tmp_path, photo, monkeypatch):
    manifest = tmp_path / "weights.toml"
    manifest.write_text('[models.fape-s]\nkind = "executor"\nbundled = true\n'
                        '[[models.fape-s.files]]\npath = "nowhere/model.safetensors"\n')
    monkeypatch.setenv("FAPE_WEIGHTS_MANIFEST", str(manifest))
    src = _photo_file(tmp_path / "d.png", photo[:32, :32])
    r = _restore(str(src), "-o", str(tmp_path / "o"))
    assert r.exit_code == 1
    assert "nowhere/model.safetensors" in r.stderr and "is missing" in r.stderr
    assert "reinstall fape" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_library_api_works_without_the_cli(photo, model_dir):
    from fapecli.restore import restore_image

    net = loader.load_model(model_dir, device="cpu")
    result = restore_image(Image(pixels=photo[:32, :32]), net, task="denoise")
    assert result.image.pixels.shape == (32, 32, 3) and result.plan.task == "denoise"


def test_ensemble_averages_mirrored_passes(tmp_path, photo, model_dir):
    from fapecli.restore import restore_image

    net = loader.load_model(model_dir, device="cpu")
    image = from_array(photo[:32, :48])
    plain = restore_image(image, net, task="derain").image.pixels
    mirror = from_array(np.ascontiguousarray(photo[:32, :48][:, ::-1]))
    flipped = restore_image(mirror, net, task="derain").image.pixels[:, ::-1]
    both = restore_image(image, net, task="derain", ensemble=True).image.pixels
    assert np.abs(plain - flipped).max() > 1e-3  # the model is not mirror-symmetric
    inside = ((plain > 0) & (plain < 1) & (flipped > 0) & (flipped < 1)).all(axis=2)
    assert inside.mean() > 0.2
    assert np.allclose(both[inside], ((plain + flipped) / 2)[inside], atol=1e-5)

    src = _photo_file(tmp_path / "a.png", photo[:40, :40])
    r = _restore(str(src), "-o", str(tmp_path / "out"), "--model", str(model_dir),
                 "--task", "denoise", "--ensemble", "--json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "a.png").is_file()
