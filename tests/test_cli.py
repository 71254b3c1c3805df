"""The command line: version, help, exit codes, unbuilt commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from fapecli import __version__
from fapecli.cli import app

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"fape {__version__}"


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fapecli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"fape {__version__}"


def test_every_command_has_help() -> None:
    for command in ("plan", "restore", "score", "train", "degrade", "weights"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_weights_list_json() -> None:
    import json

    result = runner.invoke(app, ["weights", "list", "--json"])
    assert result.exit_code == 0
    records = [json.loads(line) for line in result.stdout.splitlines()]
    names = {r["name"] for r in records}
    assert "fape-s" in names
    assert set(records[0]) >= {"name", "kind", "present", "path", "licence"}
    fape_s = next(r for r in records if r["name"] == "fape-s")
    assert fape_s["present"] and Path(fape_s["path"]).name == "fape-s"  # not an expert's folder


def _write_photo(path, photo) -> None:
    from fapecli.io import from_array, write_image

    write_image(from_array(photo), path)


def test_degrade_writes_image_and_sidecar_reproducibly(tmp_path, photo) -> None:
    import json

    import numpy as np

    from fapecli.io import read_image

    src = tmp_path / "in"
    src.mkdir()
    _write_photo(src / "a.png", photo)
    (src / "broken.png").write_bytes(b"not an image")
    args = ["degrade", str(src), "--task", "noise", "-p", "noise.sigma=25", "--seed", "7"]
    first = runner.invoke(app, [*args, "-o", str(tmp_path / "o1")])
    second = runner.invoke(app, [*args, "-o", str(tmp_path / "o2")])
    assert first.exit_code == second.exit_code == 1, first.output  # broken.png fails, rest goes on
    assert "broken.png" in first.stderr
    a, b = read_image(tmp_path / "o1" / "a.png"), read_image(tmp_path / "o2" / "a.png")
    assert np.array_equal(a.pixels, b.pixels)
    sidecar = json.loads((tmp_path / "o1" / "a.json").read_text())
    assert sidecar["steps"][0]["degradation"] == "noise"
    assert sidecar["steps"][0]["sigma"] == 25
    noise = (a.pixels - photo).std()
    assert 0.07 < noise < 0.13  # sigma 25/255 ~ 0.098, a little less after clipping


def test_degrade_skips_existing_and_rejects_bad_params(tmp_path, photo) -> None:
    _write_photo(tmp_path / "a.png", photo)
    out = tmp_path / "out"
    assert runner.invoke(app, ["degrade", str(tmp_path / "a.png"), "-o", str(out)]).exit_code == 0
    before = (out / "a.png").stat().st_mtime_ns
    again = runner.invoke(app, ["degrade", str(tmp_path / "a.png"), "-o", str(out), "-t", "haze"])
    assert again.exit_code == 0 and (out / "a.png").stat().st_mtime_ns == before
    bad = runner.invoke(app, ["degrade", str(tmp_path / "a.png"), "-o", str(out), "-p", "sigma"])
    assert bad.exit_code == 2 and "DEGRADATION.NAME=VALUE" in bad.stderr
    unknown = runner.invoke(app, ["degrade", str(tmp_path / "a.png"), "-o", str(out), "-t", "fog"])
    assert unknown.exit_code == 2 and "unknown task" in unknown.stderr


def test_score_json_lines_csv_and_missing_metric(tmp_path, photo) -> None:
    import csv
    import json

    import numpy as np

    rng = np.random.default_rng(0)
    (tmp_path / "out").mkdir()
    (tmp_path / "gt").mkdir()
    for name in ("a", "b"):
        _write_photo(tmp_path / "gt" / f"{name}.png", photo)
        noisy = np.clip(photo + rng.normal(0, 0.05, photo.shape), 0, 1).astype(np.float32)
        _write_photo(tmp_path / "out" / f"{name}.png", noisy)
    csv_path = tmp_path / "scores.csv"
    args = ["score", str(tmp_path / "out"), "--ref", str(tmp_path / "gt"), "--json"]
    result = runner.invoke(app, [*args, "--metrics", "psnr,ssim", "--csv", str(csv_path)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["type"] for r in records] == ["image", "image", "summary"]
    assert 24 < records[0]["scores"]["psnr"] < 28  # sigma 0.05 -> about 26 dB
    assert records[-1]["metrics"]["psnr"]["direction"] == "higher"
    rows = list(csv.reader(csv_path.open()))
    assert rows[0][:5] == ["name", "output", "ref", "psnr", "ssim"] and len(rows) == 3
    # a metric whose weights are absent is reported, the others still come out, exit 1
    missing = runner.invoke(app, [*args, "--metrics", "psnr,lpips"])
    assert missing.exit_code == 1
    assert "lpips unavailable" in missing.stderr and ".pth" in missing.stderr
    summary = [json.loads(line) for line in missing.stdout.splitlines()][-1]
    assert summary["metrics"]["psnr"]["count"] == 2


def test_train_then_restore_with_the_trained_model(tmp_path, photo) -> None:
    """The whole loop a user runs: fape train (tiny recipe) -> fape restore --model final/."""
    from fapecli import loader

    clean = tmp_path / "clean"
    clean.mkdir()
    for i in range(4):
        _write_photo(clean / f"{i}.png", photo[i * 16 : i * 16 + 96, :96])
    run = tmp_path / "run"
    result = runner.invoke(
        app, ["train", "tiny", f"data.clean_dirs=['{clean}']", "--out", str(run), "-q"]
    )
    assert result.exit_code == 0, result.output
    final = run / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert (run / "log.csv").is_file()
    loader.clear_cache()
    restored = runner.invoke(
        app, ["restore", str(clean / "0.png"), "-o", str(tmp_path / "o"), "-m", str(final),
              "-t", "denoise"]
    )
    assert restored.exit_code == 0, restored.output
    assert (tmp_path / "o" / "0.png").is_file()
    loader.clear_cache()


def test_plan_json_lines_from_a_stdin_list(tmp_path, photo) -> None:
    import json

    from fapecli.training.degrade import degrade

    _write_photo(tmp_path / "noisy.png", degrade(photo, "noise", seed=0, noise={"sigma": 30}).image)
    _write_photo(tmp_path / "dark.png", degrade(photo, "lowlight", seed=0, severity=0.6).image)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    paths = "\n".join(str(tmp_path / n) for n in ("noisy.png", "dark.png", "broken.jpg"))
    result = runner.invoke(app, ["plan", "--json"], input=paths + "\n")
    assert result.exit_code == 1  # the broken file fails, the others are planned
    records = {Path(r["input"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert records["noisy.png"]["plan"]["task"] == "denoise"
    assert records["noisy.png"]["plan"]["band"] == "high"
    assert records["dark.png"]["plan"]["task"] == "lowlight"
    assert records["dark.png"]["plan"]["band"] == "low"
    assert "error" in records["broken.jpg"] and "broken.jpg" in result.stderr


def test_plan_line_form_round_trips(tmp_path, photo) -> None:
    from fapecli.planning.plan import Plan

    _write_photo(tmp_path / "a.png", photo)
    result = runner.invoke(app, ["plan", str(tmp_path / "a.png"), "--line"])
    assert result.exit_code == 0, result.output
    path, line = result.stdout.rstrip("\n").split("\t")
    assert path.endswith("a.png") and line.startswith("Task: ")
    assert Plan.from_line(line).band in ("high", "low", "none")
