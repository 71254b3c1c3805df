"""Weight averages of exported models: `fape weights average` and its library function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from fapecli.cli import app
from fapecli.errors import UsageError
from fapecli.execution.compact import FapeS, create_model
from fapecli.training.average import average_models, mean_tensor

runner = CliRunner()


@pytest.fixture
def two_models(tmp_path: Path) -> tuple[Path, Path]:
    """Two float16 exports of one tiny architecture with different weights."""
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        model = create_model("fape-tiny")
        model.config.extra["training"] = {"steps": 10 * seed}
        model.save_pretrained(tmp_path / name, dtype=torch.float16)
    return tmp_path / "a", tmp_path / "b"


def test_uniform_average_is_a_loadable_float16_model(two_models, tmp_path: Path) -> None:
    a, b = two_models
    out = average_models([a, b], tmp_path / "ab")
    sa, sb, avg = (load_file(str(p / "model.safetensors")) for p in (a, b, out))
    name = "embed.1.weight"
    assert not torch.equal(sa[name], sb[name])
    assert avg[name].dtype == torch.float16
    expected = ((sa[name].double() + sb[name].double()) / 2).half()
    assert torch.equal(avg[name], expected)
    assert all(avg[k].dtype == v.dtype and avg[k].shape == v.shape for k, v in sa.items())
    config = json.loads((out / "config.json").read_text())
    parents = config["extra"]["average_of"]
    assert [p["model"] for p in parents] == [str(a), str(b)]
    assert [p["weight"] for p in parents] == [0.5, 0.5]
    assert [p["steps"] for p in parents] == [10, 20]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["config"]) == config
    reloaded = FapeS.from_pretrained(out)
    assert list(reloaded.config.channels) == config["channels"]
    assert not list(tmp_path.glob(".ab.*"))  # no temporary folder left behind


def test_cli_weighted_average_and_refusals(two_models, tmp_path: Path) -> None:
    a, b = two_models
    out = tmp_path / "w"
    result = runner.invoke(app, ["weights", "average", str(a), str(b), "-o", str(out),
                                 "--weights", "1,3"])
    assert result.exit_code == 0, result.output
    sa, sb, avg = (load_file(str(p / "model.safetensors")) for p in (a, b, out))
    name = "embed.1.weight"
    assert torch.equal(avg[name], (0.25 * sa[name].double() + 0.75 * sb[name].double()).half())

    before = (a / "model.safetensors").read_bytes()
    for args, message in (
        (["-o", str(a)], "overwrite one of the models"),
        (["-o", str(out)], "already exists"),
        (["-o", str(tmp_path / "x"), "--weights", "1"], "1 weights for 2 models"),
        (["-o", str(tmp_path / "x"), "--weights", "1,z"], "not a list of numbers"),
        (["-o", str(tmp_path / "x"), "--weights", "1,-1"], "non-negative"),
    ):
        result = runner.invoke(app, ["weights", "average", str(a), str(b), *args])
        assert result.exit_code == 2, args
        assert message in result.output
    assert (a / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "x").exists()

    again = runner.invoke(app, ["weights", "average", str(b), str(a), "-o", str(out),
                                "--overwrite"])
    assert again.exit_code == 0, again.output
    swapped = json.loads((out / "config.json").read_text())["extra"]["average_of"]
    assert swapped[0]["model"] == str(b)


def test_models_of_different_shapes_are_refused(two_models, tmp_path: Path) -> None:
    a, _ = two_models
    create_model("fape-tiny", blocks=(1, 1, 1, 2)).save_pretrained(tmp_path / "deep")
    with pytest.raises(UsageError, match=r"config differs .* blocks"):
        average_models([a, tmp_path / "deep"], tmp_path / "out")
    with pytest.raises(UsageError, match="no model weights"):
        average_models([a, tmp_path / "missing"], tmp_path / "out")
    with pytest.raises(UsageError, match="at least two"):
        average_models([a], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mean_tensor_keeps_integers_and_casts() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.equal(mean_tensor([a, b], [1, 1], dtype=torch.float16),
                       torch.tensor([2.0, 4.0], dtype=torch.float16))
    assert torch.equal(mean_tensor([torch.tensor([5]), torch.tensor([5])]), torch.tensor([5]))
    with pytest.raises(ValueError, match="integer"):
        mean_tensor([torch.tensor([5]), torch.tensor([6])])
