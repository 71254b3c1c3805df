"""Weight averages of exported models: `fape weights average` and its library function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
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
    assert torch.equal(avg[name], ((sa[name].double() + 3 * sb[name].double()) / 4).half())
    shares = json.loads((out / "config.json").read_text())["extra"]["average_of"]
    assert [p["weight"] for p in shares] == [0.25, 0.75]

    before = (a / "model.safetensors").read_bytes()
    for args, message in (
        (["-o", str(a)], "overwrite one of the models"),
        (["-o", str(out)], "already exists"),
        (["-o", str(tmp_path / "x"), "--weights", "1"], "1 weights for 2 models"),
        (["-o", str(tmp_path / "x"), "--weights", "1,z"], "not a list of numbers"),
        (["-o", str(tmp_path / "x"), "--weights", "1,-1"], "non-negative"),
        (["-o", str(tmp_path / "x"), "--weights", "nan,1"], "finite"),
    ):
        result = runner.invoke(app, ["weights", "average", str(a), str(b), *args])
        assert result.exit_code == 2, args
        assert message in result.output
    assert (a / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "x").exists()

    # --overwrite replaces the folder as a whole (the uniform mix, not 1:3, afterwards) ...
    (out / "config.json").unlink()
    again = runner.invoke(app, ["weights", "average", str(b), str(a), "-o", str(out),
                                "--overwrite"])
    assert again.exit_code == 0, again.output
    avg = load_file(str(out / "model.safetensors"))
    assert torch.equal(avg[name], ((sb[name].double() + sa[name].double()) / 2).half())
    assert json.loads((out / "config.json").read_text())["extra"]["average_of"][0]["model"] \
        == str(b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "w"]
    assert (out.stat().st_mode & 0o777) == (a.stat().st_mode & 0o777)
    # ... but never a folder holding anything else
    (out / "notes.txt").write_text("mine")
    refused = runner.invoke(app, ["weights", "average", str(a), str(b), "-o", str(out),
                                  "--overwrite"])
    assert refused.exit_code == 2 and "holds more than a model" in refused.output
    assert (out / "notes.txt").read_text() == "mine"


def test_configs_differing_only_in_dtype_or_a_newer_default_average(two_models, tmp_path) -> None:
    a, b = two_models
    config = json.loads((a / "config.json").read_text())
    assert config["head_channels"] == 0
    del config["head_channels"], config["head_blocks"]  # as in a config.json from before the head
    (a / "config.json").write_text(json.dumps(config))
    torch.manual_seed(3)
    create_model("fape-tiny").save_pretrained(tmp_path / "c32")  # a float32 checkpoint
    out = average_models([a, b, tmp_path / "c32"], tmp_path / "ab")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert load_file(str(out / "model.safetensors"))["embed.1.weight"].dtype == torch.float16
    config["refine_blocks"] = 1  # a real difference is still refused
    (a / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"config differs .* refine_blocks"):
        average_models([a, b], tmp_path / "ab2")


def test_models_of_different_shapes_are_refused(two_models, tmp_path: Path) -> None:
    a, _ = two_models
    create_model("fape-tiny", blocks=(1, 1, 1, 2)).save_pretrained(tmp_path / "deep")
    with pytest.raises(UsageError, match=r"config differs .* blocks"):
        average_models([a, tmp_path / "deep"], tmp_path / "out")
    # same config, one tensor of another shape (a hand-edited file)
    state = load_file(str(a / "model.safetensors"))
    state["embed.1.weight"] = state["embed.1.weight"][:1].clone()
    (tmp_path / "cut").mkdir()
    save_file(state, str(tmp_path / "cut" / "model.safetensors"))
    (tmp_path / "cut" / "config.json").write_text((a / "config.json").read_text())
    with pytest.raises(UsageError, match=r"embed\.1\.weight has shape") as err:
        average_models([a, tmp_path / "cut"], tmp_path / "out")
    assert str(tmp_path / "cut") in str(err.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(UsageError, match="only one of it and"):
        average_models([a, tmp_path / "bad"], tmp_path / "out")
    (tmp_path / "bad" / "config.json").write_text((a / "config.json").read_text())
    with pytest.raises(UsageError, match="not a readable safetensors"):
        average_models([a, tmp_path / "bad"], tmp_path / "out")
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


def test_warm_start_average_of_three_is_the_plain_mean(tmp_path: Path) -> None:
    """``model.warm_start=A,B,C`` starts from sum/3 computed in float64, exactly as the
    average that v14 started from was made."""
    from fapecli.training.loop import warm_start

    folders = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        create_model("fape-tiny").save_pretrained(tmp_path / str(seed))
        folders.append(tmp_path / str(seed))
    target = create_model("fape-tiny")
    warm_start(target, ",".join(map(str, folders)))
    states = [load_file(str(f / "model.safetensors")) for f in folders]
    for name, value in target.state_dict().items():
        plain = (sum(s[name].double() for s in states) / 3).to(value.dtype)
        assert torch.equal(value, plain), name
