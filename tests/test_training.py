"""`fape train` machinery: config, data, losses, discriminator, checkpoints, loop (CPU, tiny)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fapecli.errors import UsageError, WeightsError
from fapecli.training.config import TrainConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small natural photos (scikit-image's bundled samples) as PNG files."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for i, im in enumerate([data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]):
        Image.fromarray(np.ascontiguousarray(im[::5, ::5])).save(folder / f"{i:02d}.png")
    return folder


def tiny(image_dir: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config("tiny", [f"data.clean_dirs=['{image_dir}']", f"out_dir='{out}'",
                                "threads=1", "logging.progress=none", *extra])


def quiet(_: str) -> None:
    pass


# ----------------------------------------------------------------------------- config
def test_config_defaults_recipes_and_overrides(tmp_path: Path) -> None:
    cfg = load_config(None)
    assert set(cfg.data.mix) == {"rain", "snow", "haze", "blur", "noise", "lowlight", "lowres"}
    fape_s = load_config("fape-s")
    assert fape_s.model.preset == "fape-s" and fape_s.schedule.steps >= 1000
    cfg = load_config("tiny", ["schedule.steps=7", "optim.grad_clip=2", "loss.adv=0",
                               "schedule.bf16=false", "data.mix.rain=2.5",
                               "data.clean_dirs=a,b", "optim.betas=[0.8, 0.9]",
                               "model.overrides.cond_dim=16", "out_dir=x y"])
    assert cfg.schedule.steps == 7 and cfg.optim.grad_clip == 2.0
    assert isinstance(cfg.optim.grad_clip, float) and cfg.schedule.bf16 is False
    assert cfg.data.mix["rain"] == 2.5 and cfg.data.mix["snow"] == 1.0
    assert cfg.data.clean_dirs == ["a", "b"] and cfg.optim.betas == [0.8, 0.9]
    assert cfg.model.overrides == {"cond_dim": 16} and cfg.out_dir == "x y"
    path = tmp_path / "r.toml"
    path.write_text('seed = 3\n[data]\ncrop = 48\nmix = {noise = 1.0}\n')
    cfg = load_config(path, ["seed=4"])
    assert (cfg.seed, cfg.data.crop, cfg.data.batch_size) == (4, 48, 4)
    assert cfg.data.mix == {"noise": 1.0}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("schedule.stepz=3", "unknown config key 'schedule.stepz'"),
        ("nope=1", "unknown config key 'nope'"),
        ("schedule.steps=abc", "expected int"),
        ("schedule.steps=1.5", "expected int"),
        ("schedule.bf16=maybe", "expected bool"),
        ("loss.perceptual_kind=vgg", "perceptual_kind must be one of"),
        ("data.mix.fog=1", "unknown degradation"),
        ("seed.x=1", "has no sub-keys"),
        ("steps", "key.sub=value"),
        ("data.mixture_prob=2", "must lie in [0, 1]"),
    ],
)
def test_config_errors(override: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        load_config("tiny", [override])
    assert message in str(info.value)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data]\ncrop = 'big'\n")
    with pytest.raises(UsageError, match=r"data\.crop"):
        load_config(bad)
    bad.write_text("[dataa]\ncrop = 3\n")
    with pytest.raises(UsageError, match="dataa"):
        load_config(bad)


# ------------------------------------------------------------------------------- data
def test_dataset_is_deterministic_and_holds_out_validation(image_dir: Path, tmp_path: Path) -> None:
    from fapecli.planning.plan import Plan
    from fapecli.training.data import StepBatchSampler, TrainSet, load_items, validation_set

    cfg = tiny(image_dir, tmp_path, "data.crop=40", "data.mixture_prob=0.5").data
    train_items, val_items = load_items(cfg)
    assert len(val_items) == 2 and len(train_items) == 2
    assert {i.name for i in val_items} == {str(image_dir / "00.png"), str(image_dir / "01.png")}
    ds = TrainSet(train_items, cfg, seed=5)
    lq, gt, plan = ds[3]
    assert lq.shape == gt.shape == (3, 40, 40) and lq.dtype == torch.float32
    assert isinstance(plan, Plan)
    lq2, gt2, plan2 = TrainSet(train_items, cfg, seed=5)[3]
    assert torch.equal(lq, lq2) and torch.equal(gt, gt2) and plan == plan2
    assert not torch.equal(TrainSet(train_items, cfg, seed=6)[3][1], gt)
    tasks = set()
    for i in range(40):
        lq, gt, plan = ds[i]
        assert lq.shape == gt.shape == (3, 40, 40)  # lowres comes back at crop size
        tasks.add(plan.task)
    assert len(tasks) >= 4
    cfg.rule_plan_prob = 1.0  # the rule planner's plan of the crop, SR decided by the truth
    ruled = TrainSet(train_items, cfg, seed=5)
    assert all(ruled[i][2].source == "rules" for i in range(4))
    v1, v2 = validation_set(val_items, cfg), validation_set(val_items, cfg)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(v1, v2, strict=True))
    assert [p.task for _, _, p in v1] == ["derain", "desnow"]
    assert list(StepBatchSampler(2, start_step=3, rank=1, world=2, steps=5)) == [[14, 15],
                                                                                 [18, 19]]


def test_loader_workers_do_not_change_batches(image_dir: Path, tmp_path: Path) -> None:
    from fapecli.training.data import TrainSet, load_items, make_loader

    cfg = tiny(image_dir, tmp_path).data
    ds = TrainSet(load_items(cfg)[0], cfg, seed=1)
    batches = []
    for workers in (0, 1):
        cfg.workers = workers
        batches.append(list(make_loader(ds, cfg, start_step=2, steps=4, rank=1, world=2)))
    for (lq0, gt0, p0), (lq1, gt1, p1) in zip(*batches, strict=True):
        assert torch.equal(lq0, lq1) and torch.equal(gt0, gt1) and p0 == p1
    with pytest.raises(UsageError, match="not a folder"):
        load_items(tiny(tmp_path / "nowhere", tmp_path).data)


def test_paired_folders_upsample_small_lq(tmp_path: Path) -> None:
    from PIL import Image

    from fapecli.training.data import TrainSet, load_items

    root = tmp_path / "pairs"
    (root / "gt").mkdir(parents=True)
    (root / "lq").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(
            root / "gt" / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (32, 24, 3), dtype=np.uint8)).save(
            root / "lq" / f"{i}.png")
    cfg = load_config("tiny", [f"data.paired_dirs=['{root}']", "data.val_count=0",
                               "data.val_paired=1", "data.paired_tasks.pairs=sr"]).data
    train_items, val_items = load_items(cfg)
    assert len(train_items) == 2 and len(val_items) == 1
    assert train_items[0].lq.shape == train_items[0].gt.shape and train_items[0].scale == 2
    lq, gt, plan = TrainSet(train_items, cfg, seed=0)[0]
    assert lq.shape == gt.shape == (3, 32, 32)
    assert plan.task in ("sr", "none") or plan.secondary  # planner errors are simulated


def test_noisy_plan_and_rule_plan_fix_the_size_cue() -> None:
    from fapecli.planning.plan import Plan
    from fapecli.training.data import noisy_plan, rule_plan

    rng = np.random.default_rng(0)
    p = noisy_plan(["derain", "dehaze"], None, rng, noise=0.1, error_prob=0.0)
    assert p.task == "derain" and p.secondary == ["dehaze"] and p.source == "truth"
    assert p.scores["derain"] > 0.4 and p.scores["denoise"] < 0.5
    wrong = noisy_plan(["derain"], None, rng, noise=0.1, error_prob=1.0)
    assert wrong.task != "derain"
    sr = noisy_plan(["sr"], 3, rng, noise=0.1, error_prob=0.0)
    assert sr.scale == 3 and sr.band == "high"

    def planner(_: np.ndarray, size: tuple[int, int] | None = None) -> Plan:  # fooled by size
        return Plan(task="sr", band="high", secondary=["denoise"], scores={"sr": 1.0})

    fixed = rule_plan(planner, np.zeros((8, 8, 3), np.float32), ["denoise"], None)
    assert fixed.task == "denoise" and "sr" not in fixed.tasks and fixed.scores["sr"] == 0.0
    kept = rule_plan(planner, np.zeros((8, 8, 3), np.float32), ["sr"], 4)
    assert kept.task == "sr" and kept.scale == 4


# ----------------------------------------------------------------------------- losses
def test_metrics_and_perceptual_fallbacks() -> None:
    from fapecli.training.losses import FFTLoss, MSSSIMLoss, ms_ssim, psnr, ssim

    x = torch.rand(2, 3, 48, 48)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    assert torch.allclose(ms_ssim(x, x), torch.ones(2), atol=1e-5)
    assert (psnr(x, x) > 90).all() and (ssim(y, x) < 1).all()
    assert 20 < float(psnr(y, x, y_channel=False).mean()) < 35
    assert float(FFTLoss()(x, x)) == 0.0 and float(FFTLoss()(y, x)) > 0
    assert float(MSSSIMLoss()(y, x)) > 0


def test_lpips_fallback_is_chosen_and_reported() -> None:
    from fapecli.training.losses import FFTLoss, MSSSIMLoss, build_perceptual

    p = build_perceptual("lpips", "fft")
    assert p.kind == "fft" and isinstance(p.module, FFTLoss)
    assert p.report == "perceptual=fft (lpips weights not found: LPIPS_v0.1_vgg-a78928a0.pth)"
    p = build_perceptual("lpips", "msssim")
    assert isinstance(p.module, MSSSIMLoss) and p.report.startswith("perceptual=msssim (lpips")
    assert build_perceptual("none").module is None


def test_lpips_is_used_when_its_weights_are_found(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    from fapecli.training.losses import LPIPSLoss, build_perceptual

    torch.manual_seed(0)
    features = make_layers(cfgs["D"])  # VGG-16's conv trunk, random weights
    save_file({f"features.{k}": v for k, v in features.state_dict().items()},
              str(tmp_path / "vgg16-397923af.safetensors"))
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1)
            for i, c in enumerate((64, 128, 256, 512, 512))}
    save_file(lins, str(tmp_path / "LPIPS_v0.1_vgg-a78928a0.safetensors"))
    monkeypatch.setenv("FAPE_WEIGHTS", str(tmp_path))
    p = build_perceptual("lpips", "fft")
    assert p.kind == "lpips" and isinstance(p.module, LPIPSLoss)
    assert p.report == "perceptual=lpips-vgg"
    x = torch.rand(1, 3, 32, 32)
    y = torch.rand(1, 3, 32, 32, requires_grad=True)
    assert float(p.module(x, x)) == 0.0
    value = p.module(y, x)
    value.backward()
    assert float(value.detach()) > 0 and y.grad.abs().sum() > 0
    assert not any(q.requires_grad for q in p.module.parameters())


def test_generator_loss_terms_and_frequency_regulariser() -> None:
    from fapecli.execution.compact import create_model
    from fapecli.execution.conditioning import plan_for_task
    from fapecli.execution.moe import collect_moe_layers
    from fapecli.training.losses import d_adv_loss, g_adv_loss, generator_loss

    torch.manual_seed(0)
    model = create_model("fape-tiny")
    for layer in collect_moe_layers(model).values():  # trained-looking experts (B != 0)
        for b in layer.lora_B:
            torch.nn.init.normal_(b, std=0.5)
    x = torch.rand(2, 3, 32, 32)
    out = model(x, [plan_for_task("derain")] * 2)
    w = {"l2": 1.0, "l1": 0.5, "perceptual": 0.0, "adv": 0.0, "freq": 0.0}
    base, terms = generator_loss(out, x, w, model=model)
    assert set(terms) == {"l2", "l1"}
    total, terms = generator_loss(out, x, w | {"freq": 10.0}, model=model)
    assert terms["freq"] > 0
    assert math.isclose(float((total - base).detach()), 10.0 * terms["freq"], rel_tol=1e-4)
    lora = [p for layer in collect_moe_layers(model).values() for p in layer.lora_B]
    grads = torch.autograd.grad(total - base, lora, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    logits = torch.tensor([2.0, -1.0])
    assert float(g_adv_loss(logits, "ns")) > 0 and float(g_adv_loss(logits, "hinge")) < 0
    assert float(d_adv_loss(logits, -logits, "hinge")) < float(d_adv_loss(-logits, logits,
                                                                          "hinge"))


def test_psnr_loss_is_minus_psnr_and_weighs_samples_by_their_own_error() -> None:
    from fapecli.training.losses import generator_loss, log_mse

    gt = torch.zeros(2, 3, 8, 8)
    out = gt.clone()
    out[0] += 0.1  # MSE 1e-2: 20 dB
    out[1] += 0.01  # MSE 1e-4 (+ the 1e-4 floor): 37 dB
    value = log_mse(out, gt)
    assert math.isclose(float(value), (10 * math.log10(1.01e-2) + 10 * math.log10(2e-4)) / 2,
                        rel_tol=1e-5)
    total, terms = generator_loss(out, gt, {"psnr": 0.1})
    assert set(terms) == {"psnr"} and math.isclose(float(total), 0.1 * terms["psnr"], rel_tol=1e-6)
    leaf = out.clone().requires_grad_(True)
    log_mse(leaf, gt).backward()
    per_sample = leaf.grad.abs().flatten(1).mean(1)
    # under L2 the 20 dB sample would get 10x the gradient; here the 37 dB one gets more
    assert per_sample[1] > per_sample[0]


# ---------------------------------------------------------------------- discriminator
def test_discriminator_conv_backbone_shapes() -> None:
    from fapecli.training.discriminator import (
        BlurPool,
        ConvBackbone,
        MultiLevelDiscriminator,
        build_discriminator,
    )

    d = MultiLevelDiscriminator(ConvBackbone(8), 8)
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    assert d.level_logits(x).shape == (3, 3) and d(x).shape == (3,)
    d(x).sum().backward()
    assert x.grad.abs().sum() > 0
    assert set(d.trainable_state_dict()) == set(d.state_dict())
    assert BlurPool(2)(torch.ones(1, 2, 8, 8)).shape == (1, 2, 4, 4)
    assert torch.allclose(BlurPool(2)(torch.ones(1, 2, 8, 8)), torch.ones(1, 2, 4, 4))
    auto, report = build_discriminator("auto", width=8)
    assert auto.kind == "conv" and report.startswith("discriminator=conv (siglip weights")
    with pytest.raises(WeightsError):
        build_discriminator("siglip")


@pytest.mark.parametrize("version", ["siglip", "siglip2"])
def test_discriminator_siglip_backbone(version: str) -> None:
    from transformers import (
        Siglip2VisionConfig,
        Siglip2VisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from fapecli.training.discriminator import MultiLevelDiscriminator, SiglipBackbone

    torch.manual_seed(0)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 4,
             "num_attention_heads": 2, "patch_size": 8}
    if version == "siglip":
        tower = SiglipVisionModel(SiglipVisionConfig(image_size=32, **small))
    else:
        tower = Siglip2VisionModel(Siglip2VisionConfig(num_patches=16, **small))
    d = MultiLevelDiscriminator(SiglipBackbone(tower), 8)
    assert d.kind == "siglip" and d.backbone.layers == [1, 2, 4]  # 25 / 50 / 100 % depth
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    assert d.level_logits(x).shape == (3, 2)
    d(x).sum().backward()
    assert x.grad.abs().sum() > 0  # the generator gets gradients through the frozen tower
    assert not any(p.requires_grad for p in d.backbone.parameters())
    assert all(p.grad is not None for p in d.heads.parameters())
    state = d.trainable_state_dict()
    assert state and not any(k.startswith("backbone.") for k in state)
    d.train()
    assert not d.backbone.tower.training


def test_siglip_found_through_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    from fapecli.training.discriminator import build_discriminator

    folder = tmp_path / "weights" / "siglip2-vision"
    Siglip2VisionModel(Siglip2VisionConfig(hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=2, num_attention_heads=2,
                                           patch_size=8, num_patches=16)).save_pretrained(folder)
    manifest = tmp_path / "weights.toml"
    manifest.write_text('[models.siglip2-vision]\nkind = "backbone"\n'
                        '[[models.siglip2-vision.files]]\npath = "config.json"\n'
                        '[[models.siglip2-vision.files]]\npath = "model.safetensors"\n')
    monkeypatch.setenv("FAPE_WEIGHTS_MANIFEST", str(manifest))
    monkeypatch.setenv("FAPE_WEIGHTS", str(tmp_path / "weights"))
    d, report = build_discriminator("auto", width=8)
    assert d.kind == "siglip" and report.startswith("discriminator=siglip (siglip2-vision")
    assert d(torch.rand(1, 3, 32, 32)).shape == (1,)


# --------------------------------------------------------------------------- checkpoint
def test_checkpoint_encoding_round_trip() -> None:
    from fapecli.training.checkpoint import decode, encode

    obj = {"state": {0: {"step": 3, "t": torch.arange(4.0)}}, "groups": [{"betas": (0.9, 0.99),
           "d": 1.2345678901234567e-07, "g": math.inf, "params": [0, 1]}], "none": None}
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(encode(obj, tensors, "x"))
    back = decode(json.loads(text), tensors)
    assert back["state"][0]["step"] == 3 and torch.equal(back["state"][0]["t"], torch.arange(4.0))
    assert back["groups"][0]["betas"] == (0.9, 0.99) and back["groups"][0]["g"] == math.inf
    assert back["groups"][0]["d"] == obj["groups"][0]["d"] and back["none"] is None


# --------------------------------------------------------------------------------- loop
def test_tiny_overfit_loss_goes_down(image_dir: Path, tmp_path: Path) -> None:
    """One fixed noisy/clean pair (a paired folder): the loss must fall well below its start."""
    from PIL import Image

    pair = tmp_path / "pair"
    (pair / "gt").mkdir(parents=True)
    (pair / "lq").mkdir()
    clean = np.asarray(Image.open(image_dir / "02.png"), dtype=np.float32) / 255
    noisy = clean + np.random.default_rng(0).normal(0, 25 / 255, clean.shape)
    Image.fromarray((clean * 255).round().astype(np.uint8)).save(pair / "gt" / "a.png")
    Image.fromarray((noisy.clip(0, 1) * 255).round().astype(np.uint8)).save(pair / "lq" / "a.png")
    cfg = tiny(image_dir, tmp_path / "run", "data.clean_dirs=[]", f"data.paired_dirs=['{pair}']",
               "data.paired_tasks={pair='denoise'}", "data.val_count=0", "data.val_paired=0",
               "schedule.steps=80", "schedule.val_every=0", "schedule.ckpt_every=0",
               "logging.log_every=16", "optim.d0=5e-2", "loss.adv=0")
    result = train_quiet(cfg)
    with open(tmp_path / "run" / "log.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 5 and losses[-1] < 0.75 * losses[0], losses
    assert result.step == 80 and result.final_dir is not None


def train_quiet(cfg: TrainConfig, **kw):
    from fapecli.training.loop import train

    return train(cfg, emit=quiet, **kw)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder))


def test_resume_is_bit_exact(image_dir: Path, tmp_path: Path) -> None:
    from fapecli.execution.compact import FapeS

    straight = tiny(image_dir, tmp_path / "a", "schedule.steps=6", "schedule.ckpt_every=3",
                    "loss.adv_start=2")
    a = train_quiet(straight)
    assert a.reports[0].startswith("perceptual=fft (lpips weights not found")
    half = tmp_path / "a" / "checkpoints" / "step-0000003"
    resumed = tiny(image_dir, tmp_path / "b", "schedule.steps=6", "schedule.ckpt_every=3",
                   "loss.adv_start=2", f"resume='{half}'")
    b = train_quiet(resumed)
    assert b.step == 6
    for name in ("model/model.safetensors", "ema/model.safetensors",
                 "discriminator.safetensors", "training_state.safetensors"):
        ta = _tensors(tmp_path / "a" / "checkpoints" / "step-0000006" / name)
        tb = _tensors(tmp_path / "b" / "checkpoints" / "step-0000006" / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    sa = json.loads((tmp_path / "a/checkpoints/step-0000006/training_state.json").read_text())
    sb = json.loads((tmp_path / "b/checkpoints/step-0000006/training_state.json").read_text())
    assert sa["optimizers"] == sb["optimizers"] and sa["schedulers"] == sb["schedulers"]
    # the deliverable: EMA weights in float16, loadable by the executor
    final = _tensors(tmp_path / "a" / "final" / "model.safetensors")
    assert all(v.dtype == torch.float16 for v in final.values() if v.is_floating_point())
    model = FapeS.from_pretrained(tmp_path / "a" / "final")
    assert model.config.extra["training"]["steps"] == 6
    # resume=auto finds the latest checkpoint of out_dir and has nothing left to do
    again = train_quiet(tiny(image_dir, tmp_path / "a", "schedule.steps=6", "resume=auto"))
    assert again.step == 6
    with open(tmp_path / "a" / "log.csv", encoding="utf-8") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4, 5, 6]


def test_adapters_only_trains_lora_routers_and_plan_encoder(image_dir: Path) -> None:
    from fapecli.execution.compact import create_model
    from fapecli.training.loop import select_trainable

    model = create_model("fape-tiny")
    params = select_trainable(model, "adapters")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and len(params) == len(names)
    assert all(("lora_" in n or "text_router" in n or "gate_raw" in n or n.startswith("cond."))
               for n in names)
    assert not any(".base." in n for n in names)
    assert len(select_trainable(model, "all")) == len(list(model.parameters()))


def test_head_only_training_leaves_the_rest_as_it_was(image_dir: Path, tmp_path: Path) -> None:
    """``model.train_params=head`` grows a refinement head onto a warm start and trains it
    alone: every other tensor of the exported model equals the source's."""
    from fapecli.execution.compact import create_model
    from fapecli.training.loop import select_trainable

    torch.manual_seed(3)
    create_model("fape-tiny").save_pretrained(tmp_path / "src")
    args = ("schedule.steps=3", "loss.adv=0", "schedule.val_every=0", "schedule.ckpt_every=0",
            "optim.d0=1e-2", f"model.warm_start='{tmp_path / 'src'}'",
            "model.overrides={head_channels=8,head_blocks=1}", "model.train_params=head")
    result = train_quiet(tiny(image_dir, tmp_path / "run", *args))
    src, out = _tensors(tmp_path / "src" / "model.safetensors"), _tensors(
        result.final_dir / "model.safetensors")
    head = [k for k in out if k.startswith("head.")]
    assert head and set(out) - set(head) == set(src)
    for k in src:
        assert torch.equal(out[k], src[k].half()), k
    assert out["head.project_out.weight"].abs().sum() > 0  # the head itself moved
    with pytest.raises(UsageError, match="leaves nothing to train"):
        select_trainable(create_model("fape-tiny"), "head")


def test_warm_start_averages_several_folders(tmp_path: Path) -> None:
    """``a,b`` starts from the mean of two models; a tensor only one of them holds with the
    model's shape stays fresh."""
    from fapecli.execution.compact import create_model
    from fapecli.training.loop import warm_start

    torch.manual_seed(1)
    a = create_model("fape-tiny", blocks=(1, 1, 1, 2))
    torch.manual_seed(2)
    b = create_model("fape-tiny")  # one latent block fewer than a
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    target = create_model("fape-tiny", blocks=(1, 1, 1, 2))
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = warm_start(target, f"{tmp_path / 'a'},{tmp_path / 'b'}")
    assert report.startswith("warm start from the average of")
    sa, sb, tgt = a.state_dict(), b.state_dict(), target.state_dict()
    name = "embed.1.weight"
    assert not torch.equal(sa[name], sb[name])
    torch.testing.assert_close(tgt[name], (sa[name] + sb[name]) / 2)
    only_a = [k for k in sa if k not in sb]
    assert only_a and all(torch.equal(tgt[k], fresh[k]) for k in only_a)
    with pytest.raises(UsageError, match="warm_start"):
        warm_start(target, f"{tmp_path / 'a'},{tmp_path / 'missing'}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match=r"model\.warm_start: not a readable safetensors") as err:
        warm_start(target, tmp_path / "bad")
    assert "bad" in str(err.value) and "\n" not in str(err.value)


def test_warm_start_copies_matching_tensors(image_dir: Path, tmp_path: Path) -> None:
    """A shallower preset with the MoE on more layers starts from a deeper model's tensors:
    plain and MoE-wrapped projections match through ``base.``, the rest starts fresh."""
    from fapecli.execution.compact import FapeS, create_model
    from fapecli.training.loop import warm_start

    source = create_model("fape-tiny", blocks=(1, 1, 2, 2), moe_targets=("latent.*.fuse_proj",))
    source.save_pretrained(tmp_path / "src")
    target = create_model("fape-tiny", blocks=(0, 1, 1, 1), decoder_blocks=(0, 1, 1))
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = warm_start(target, tmp_path / "src")
    src, tgt = source.state_dict(), target.state_dict()
    # plain in the source, MoE-wrapped here: the wrapped layer's base gets the weights
    assert "encoders.1.0.fuse_proj.weight" in src
    assert torch.equal(tgt["encoders.1.0.fuse_proj.base.weight"],
                       src["encoders.1.0.fuse_proj.weight"])
    assert torch.equal(tgt["latent.0.fuse_proj.base.weight"], src["latent.0.fuse_proj.base.weight"])
    # LoRA experts the source lacks keep their fresh initialisation
    lora = [k for k in tgt if k.startswith("encoders.1.0.fuse_proj.") and ".base." not in k]
    assert lora and all(torch.equal(tgt[k], fresh[k]) for k in lora)
    copied = int(report.split(": ")[1].split(" of ")[0])
    assert 0 < copied < len(tgt)
    # the warm-started model saves and reloads as its own (shallower) architecture
    target.save_pretrained(tmp_path / "dst")
    assert FapeS.from_pretrained(tmp_path / "dst").config.blocks == (0, 1, 1, 1)
    # through the recipe: the report reaches the log, a wrong folder is a usage error
    args = ("schedule.steps=1", "loss.adv=0", "schedule.val_every=0", "schedule.ckpt_every=1",
            f"model.warm_start='{tmp_path / 'src'}'")
    result = train_quiet(tiny(image_dir, tmp_path / "run", *args))
    assert any(r.startswith("warm start from") for r in result.reports)
    assert any("optim.d0" in r for r in result.reports)  # the default d0 is pointed out
    # a resume takes weights and step size from its checkpoint: neither report applies
    resumed = train_quiet(tiny(image_dir, tmp_path / "run", *args, "resume=auto"))
    assert resumed.step == 1
    assert not any("warm start" in r or "optim.d0" in r for r in resumed.reports)
    cfg = tiny(image_dir, tmp_path / "run3", "schedule.steps=1", "loss.adv=0",
               "schedule.val_every=0", "schedule.ckpt_every=0", "optim.d0=1e-3",
               f"model.warm_start='{tmp_path / 'src'}'")
    assert not any("optim.d0" in r for r in train_quiet(cfg).reports)
    with pytest.raises(UsageError, match="warm_start"):
        train_quiet(tiny(image_dir, tmp_path / "run2", f"model.warm_start='{tmp_path}'"))
