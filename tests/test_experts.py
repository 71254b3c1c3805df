from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fapecli import loader
from fapecli.cli import app
from fapecli.errors import WeightsError
from fapecli.execution.compact import FapeS, create_model
from fapecli.execution.experts import TaskExperts, expert_folders, load_compact
from fapecli.io import from_array, write_image
from fapecli.planning.plan import Plan
from fapecli.restore import restore_image


def _tiny(seed: int) -> FapeS:
    torch.manual_seed(seed)
    model = create_model("fape-tiny")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("out."):
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture
def routed(tmp_path: Path) -> Path:
    """A base model folder with a denoising expert beside it."""
    folder = tmp_path / "model"
    _tiny(0).save_pretrained(folder)
    _tiny(1).save_pretrained(folder / "experts" / "denoise")
    return folder


@pytest.fixture(autouse=True)
def _fresh_loader():
    loader.clear_cache()
    yield
    loader.clear_cache()


def test_a_single_task_plan_routes_to_its_expert(routed: Path, photo: np.ndarray) -> None:
    net = loader.load_model(routed, device="cpu")
    assert isinstance(net, TaskExperts) and set(net.experts) == {"denoise"}
    base = FapeS.from_pretrained(routed)
    expert = FapeS.from_pretrained(routed / "experts" / "denoise")
    assert net.for_plan(Plan(task="denoise", band="high")) is net.experts["denoise"]
    mixed = Plan(task="denoise", band="high", secondary=["derain"])
    assert net.for_plan(mixed) is net.base and net.for_plan(None) is net.base
    assert net.for_plan(Plan(task="derain", band="high")) is net.base

    image = from_array(photo[:32, :48])
    for task, alone in (("denoise", expert), ("derain", base)):
        got = restore_image(image, net, task=task)
        assert got.expert == (task if task == "denoise" else None)
        np.testing.assert_array_equal(got.image.pixels,
                                      restore_image(image, alone, task=task).image.pixels)
    # the two networks differ, so the routing is visible in the output
    routed_out = restore_image(image, net, task="denoise").image.pixels
    assert np.abs(routed_out - restore_image(image, base, task="denoise").image.pixels).max() > 1e-3
    # called directly with one plan, the wrapper routes too; with tokens alone it is the base
    x = torch.from_numpy(photo[:32, :48]).permute(2, 0, 1)[None].contiguous()
    plan = Plan(task="denoise", band="high")
    with torch.no_grad():
        assert torch.equal(net(x, plan), expert(x, plan))
        tokens = base.plan_tokens(plan)
        assert torch.equal(net(x, tokens=tokens), base(x, tokens=tokens))


def test_the_cli_restores_with_experts(routed: Path, photo: np.ndarray, tmp_path: Path) -> None:
    """`fape restore` with a denoising plan writes what the expert alone writes."""
    from fapecli.io import read_image

    src = tmp_path / "a.png"
    write_image(from_array((photo[:40, :40] * 255).round().astype(np.uint8)), src)
    outs = {}
    for name, model in (("routed", routed), ("expert", routed / "experts" / "denoise")):
        r = CliRunner().invoke(app, ["restore", str(src), "-o", str(tmp_path / name),
                                     "--model", str(model), "--task", "denoise", "--json"])
        assert r.exit_code == 0, r.output
        record = json.loads(r.stdout.splitlines()[-1])
        assert record["plan"]["task"] == "denoise"
        assert record["expert"] == ("denoise" if name == "routed" else None)
        outs[name] = read_image(tmp_path / name / "a.png").pixels
    np.testing.assert_array_equal(outs["routed"], outs["expert"])


def test_a_model_without_experts_loads_as_itself(tmp_path: Path) -> None:
    _tiny(0).save_pretrained(tmp_path / "plain")
    assert type(load_compact(tmp_path / "plain")) is FapeS
    assert expert_folders(tmp_path / "plain") == {}


def test_a_manifest_model_has_the_experts_it_lists(tmp_path: Path, monkeypatch) -> None:
    """From weights.toml, only listed experts load (each found and checked as a file of the
    model); an expert folder on disk that the manifest does not list is not used."""
    root = tmp_path / "weights"
    _tiny(0).save_pretrained(root / "toy")
    _tiny(1).save_pretrained(root / "toy" / "experts" / "denoise")
    _tiny(2).save_pretrained(root / "toy" / "experts" / "derain")  # on disk, not listed
    listed = ["toy/config.json", "toy/model.safetensors", "toy/experts/denoise/config.json",
              "toy/experts/denoise/model.safetensors"]
    body = '[models.toy]\nkind = "executor"\n' + "".join(
        f'[[models.toy.files]]\npath = "{f}"\n' for f in listed)
    (tmp_path / "weights.toml").write_text(body, encoding="utf-8")
    monkeypatch.setenv("FAPE_WEIGHTS_MANIFEST", str(tmp_path / "weights.toml"))
    monkeypatch.setenv("FAPE_WEIGHTS", str(root))
    net = loader.load_model("toy", device="cpu")
    assert isinstance(net, TaskExperts) and set(net.experts) == {"denoise"}
    # a listed expert that is missing is the manifest's usual missing-file error
    shutil.rmtree(root / "toy" / "experts" / "denoise")
    loader.clear_cache()
    with pytest.raises(WeightsError, match="experts/denoise"):
        loader.load_model("toy", device="cpu")


def test_a_corrupt_base_is_a_one_line_error(routed: Path) -> None:
    (routed / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="cannot load executor") as err:
        loader.load_model(routed, device="cpu")
    assert "\n" not in str(err.value)


def test_bad_expert_folders_are_clear_errors(routed: Path) -> None:
    (routed / "experts" / ".ipynb_checkpoints").mkdir()  # hidden folders are skipped
    assert set(load_compact(routed).experts) == {"denoise"}
    shutil.copytree(routed / "experts" / "denoise", routed / "experts" / "sharpen")
    with pytest.raises(WeightsError, match="named after a task") as err:
        load_compact(routed)
    assert "sharpen" in str(err.value)
    shutil.rmtree(routed / "experts" / "sharpen")
    (routed / "experts" / "denoise" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="denoise expert"):
        load_compact(routed)
    (routed / "experts" / "denoise" / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"expert without model\.safetensors"):
        load_compact(routed)
