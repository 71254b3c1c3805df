from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fapecli.execution.compact import (
    PRESETS,
    FapeS,
    FapeSConfig,
    count_parameters,
    create_model,
    get_config,
    prepare_input,
)
from fapecli.execution.conditioning import (
    NUM_PLAN_TOKENS,
    PlanEncoder,
    plan_features,
    plan_for_task,
    plan_tokens,
)
from fapecli.execution.moe import collect_moe_layers, moe_regulariser, routing_summary
from fapecli.planning.plan import Plan


@pytest.fixture(scope="module")
def tiny() -> FapeS:
    torch.manual_seed(0)
    return create_model("fape-tiny").eval()


def _randomise_experts(model: FapeS, std: float = 0.2) -> None:
    with torch.no_grad():
        for m in collect_moe_layers(model).values():
            for b in m.lora_B:
                b.normal_(0, std)


def test_preset_sizes() -> None:
    counts = {name: count_parameters(FapeS(cfg)) for name, cfg in PRESETS.items()}
    assert counts["fape-s"] <= 8_000_000 and counts["fape-m"] <= 8_000_000
    assert counts["fape-tiny"] < counts["fape-xs"] < counts["fape-s"] < counts["fape-m"]
    assert counts["fape-tiny"] < 100_000


def test_config_overrides_and_validation() -> None:
    cfg = get_config("fape-tiny", moe_ranks=(8, 16))
    assert cfg.moe_ranks == (8, 16) and PRESETS["fape-tiny"].moe_ranks == (2, 2)
    assert FapeSConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError):
        FapeSConfig(channels=(8, 16), blocks=(1,), heads=(1, 1))
    with pytest.raises(KeyError):
        get_config("fape-xxl")


def test_moe_wraps_the_configured_projections(tiny: FapeS) -> None:
    names = list(collect_moe_layers(tiny))
    assert names == tiny.moe_layers and names
    assert all(n.endswith(("fuse_proj", "ffn.project_out")) for n in names)
    assert not any(n.startswith("cond.") for n in names)
    # the executor trains its projections too: the wrapped bases are not frozen
    assert all(m.base.weight.requires_grad for m in collect_moe_layers(tiny).values())


@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (2, 3, 17, 9), (1, 3, 5, 7), (1, 3, 32, 32)])
def test_forward_shapes_any_size(tiny: FapeS, shape: tuple[int, ...]) -> None:
    x = torch.rand(*shape)
    with torch.no_grad():
        y = tiny(x, [plan_for_task("derain")] * shape[0])
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()


def test_plan_tokens() -> None:
    enc = PlanEncoder(16)
    plans = [plan_for_task("dehaze"), Plan(task="none", band="none"),
             Plan(task="sr", band="high", scale=4, scores={"sr": 0.8, "noise": 2.0},
                  secondary=["denoise"])]
    tokens = plan_tokens(plans, enc)
    assert tokens.shape == (3, NUM_PLAN_TOKENS, 16)
    f = plan_features(plans)
    assert f["task"].tolist() == [2, 7, 6] and f["band"].tolist() == [1, 2, 0]
    assert f["scores"][2, 6].item() == pytest.approx(0.8)
    assert f["scores"][2, 7].item() == pytest.approx(2 / 3)  # log2(4) / 3
    assert f["tasks"][2].tolist() == [0, 0, 0, 0, 1, 0, 1]
    assert f["tasks"][1].sum() == 0


def test_save_load_round_trip_fp32(tiny: FapeS, tmp_path: Path) -> None:
    _randomise_experts(tiny)
    x = torch.rand(1, 3, 24, 40)
    plan = plan_for_task("deblur")
    with torch.no_grad():
        ref = tiny(x, plan)
    out = tiny.save_pretrained(tmp_path / "m")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "FapeS" and config["name"] == "fape-tiny"
    loaded = FapeS.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, plan), ref, rtol=0, atol=0)
    # a lone .safetensors file carries its config in the metadata
    shutil.copy(out / "model.safetensors", tmp_path / "lone.safetensors")
    lone = FapeS.from_pretrained(tmp_path / "lone.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(lone(x, plan), ref, rtol=0, atol=0)


def test_save_fp16_storage(tiny: FapeS, tmp_path: Path) -> None:
    _randomise_experts(tiny)
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        ref = tiny(x)
    out = tiny.save_pretrained(tmp_path / "half", dtype=torch.float16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    size32 = tiny.save_pretrained(tmp_path / "full") / "model.safetensors"
    assert (out / "model.safetensors").stat().st_size < 0.6 * size32.stat().st_size
    loaded = FapeS.from_pretrained(out)
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(tiny: FapeS, dtype: torch.dtype, tmp_path: Path) -> None:
    path = tiny.save_pretrained(tmp_path / "m")
    model = FapeS.from_pretrained(path, dtype=dtype)
    assert model.dtype == dtype
    x = torch.rand(1, 3, 20, 28)
    with torch.no_grad():
        y = model(x, plan_for_task("denoise"))
        ref = tiny(x, plan_for_task("denoise"))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert (y - ref).abs().mean() < 0.05


def test_forced_plan_changes_output_once_experts_trained() -> None:
    torch.manual_seed(1)
    model = create_model("fape-tiny").eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        same_a = model(x, plan_for_task("derain"))
        same_b = model(x, plan_for_task("dehaze"))
    torch.testing.assert_close(same_a, same_b, rtol=0, atol=0)  # B = 0: plan has no effect
    _randomise_experts(model)
    for m in collect_moe_layers(model).values():  # let the plan dominate the router
        with torch.no_grad():
            m.gate_raw.copy_(torch.tensor([4.0, -6.0]))
    with torch.no_grad():
        a = model(x, plan_for_task("derain"))
        b = model(x, plan_for_task("dehaze"))
    assert (a - b).abs().max() > 1e-4


def test_training_step_and_regulariser() -> None:
    torch.manual_seed(2)
    model = create_model("fape-tiny").train()
    _randomise_experts(model, 0.05)
    x = torch.rand(2, 3, 16, 16)
    y = model(x, [plan_for_task("derain"), plan_for_task("lowlight")])
    reg = moe_regulariser(model)
    assert reg.item() > 0
    (torch.nn.functional.mse_loss(y, x) + 1e-3 * reg).backward()
    assert model.cond.task.weight.grad is not None  # the plan encoder learns through routing
    summary = routing_summary(model)
    assert sum(summary["overall"].values()) == pytest.approx(1.0)


def test_prepare_input_for_sr() -> None:
    img = torch.rand(1, 3, 10, 12)
    assert prepare_input(img, Plan(task="sr", band="high", scale=2)).shape == (1, 3, 20, 24)
    assert prepare_input(img, plan_for_task("derain")) is img
    assert prepare_input(img, None) is img


def test_restore_helper(tiny: FapeS) -> None:
    img = torch.rand(1, 3, 30, 20)
    out = tiny.restore(img, Plan(task="sr", band="high", scale=2), tile=32, overlap=8)
    assert out.shape == (1, 3, 60, 40) and out.min() >= 0 and out.max() <= 1


def test_light_blocks_start_as_the_identity_and_learn() -> None:
    """Top-level light blocks added to a trained model leave its output unchanged at first
    (zero layer scales), and their scales get gradients, so training can use them."""
    torch.manual_seed(0)
    base = create_model("fape-tiny").eval()
    _randomise_experts(base)
    grown = create_model("fape-tiny", light_blocks=(1, 2)).eval()
    missing, unexpected = grown.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing
    assert all(k.startswith(("light_enc.", "light_dec.")) for k in missing)
    x = torch.rand(1, 3, 32, 48)
    plan = plan_for_task("denoise")
    with torch.no_grad():
        assert torch.allclose(grown(x, plan), base(x, plan), atol=1e-6)
    grown.train()
    (grown(x, plan) - x.flip(-1)).square().mean().backward()
    assert grown.light_dec[1].gamma.grad.abs().sum() > 0
    assert grown.light_enc[0].beta.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="light_blocks"):
        FapeSConfig(light_blocks=(1,))


def test_refine_head_starts_as_the_identity_and_learns() -> None:
    """A refinement head grown onto a trained model leaves its output unchanged at first (zero
    output conv) and gets gradients, so training can use it."""
    torch.manual_seed(0)
    base = create_model("fape-tiny").eval()
    _randomise_experts(base)
    grown = create_model("fape-tiny", head_channels=8, head_blocks=2).eval()
    missing, unexpected = grown.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("head.") for k in missing)
    x = torch.rand(1, 3, 32, 48)
    plan = plan_for_task("denoise")
    with torch.no_grad():
        assert torch.equal(grown(x, plan), base(x, plan))
    grown.train()
    (grown(x, plan) - x.flip(-1)).square().mean().backward()
    assert grown.head.project_out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="head_channels"):
        FapeSConfig(head_channels=0, head_blocks=1)
