"""The FLUX executor on tiny random diffusers models built in the test (no download, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fapecli.cli import app
from fapecli.errors import FapeError
from fapecli.execution.conditioning import plan_for_task
from fapecli.execution.flux import (
    FluxAdapterConfig,
    FluxExecutor,
    pack_latents,
    unpack_latents,
)
from fapecli.execution.flux_load import build_flux_executor
from fapecli.execution.memory import MemoryGuardError

runner = CliRunner()

TINY_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                        pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
                shift_factor=0.1, scaling_factor=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers FLUX snapshot layout (transformer/ + vae/) of tiny random models."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    folder = tmp_path_factory.mktemp("flux-base")
    torch.manual_seed(0)
    FluxTransformer2DModel(**TINY_TRANSFORMER).save_pretrained(folder / "transformer")
    AutoencoderKL(**TINY_VAE).save_pretrained(folder / "vae")
    return folder


def _image(h: int = 40, w: int = 56) -> torch.Tensor:
    import cv2
    from skimage import data

    rgb = cv2.resize(data.astronaut(), (w, h), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[None]


def _randomise_adapters(ex: FluxExecutor, seed: int = 1) -> None:
    """Fresh LoRA up-projections are zero; give every adapter weight a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in ex.adapter_named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_adapters_wrap_exactly_the_attention_projections(base: Path) -> None:
    ex = build_flux_executor(base)
    names = sorted(ex.frequency_layers())
    assert names == sorted([
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
        "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.to_out.0",
        "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v",
    ])
    trainable = {id(p) for p in ex.adapter_parameters()}
    frozen = [n for n, p in ex.named_parameters() if id(p) not in trainable]
    assert frozen and not any(p.requires_grad for n, p in ex.named_parameters()
                              if id(p) not in trainable)
    assert all(n.startswith(("transformer.", "vae.")) for n in frozen)
    assert not any("lora" in n or "router" in n for n in frozen)


def test_pack_unpack_round_trip() -> None:
    z = torch.randn(2, 4, 6, 10)
    tokens = pack_latents(z)
    assert tokens.shape == (2, 15, 16)
    assert torch.equal(unpack_latents(tokens, 6, 10), z)


def test_one_step_reads_the_clean_latent(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """x0 = z_t - t * v: a transformer predicting v = 0 returns its input latent."""
    ex = build_flux_executor(base)
    z = torch.randn(1, 4, 6, 8)
    cond = ex.plan_tokens(plan_for_task("denoise"))
    seen = {}

    def zero_velocity(*, hidden_states, timestep, **kw):
        seen["t"] = float(timestep[0])
        return (torch.full_like(hidden_states, 2.0),)

    monkeypatch.setattr(ex.transformer, "forward", zero_velocity)
    out = ex.denoise(z, cond)
    assert seen["t"] == pytest.approx(0.3)
    assert torch.allclose(out, z - 0.3 * 2.0, atol=1e-6)


def test_restore_is_finite_sized_and_plan_dependent(base: Path) -> None:
    ex = build_flux_executor(base)
    _randomise_adapters(ex)
    x = _image(37, 50)  # not a multiple of 8: padded and cropped back
    with torch.inference_mode():
        a = ex(x, plan_for_task("derain"))
        b = ex(x, plan_for_task("lowlight"))
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert not torch.allclose(a, b)  # the plan reaches the transformer


def test_adapter_save_load_round_trip(base: Path, tmp_path: Path) -> None:
    ex = build_flux_executor(base)
    _randomise_adapters(ex, seed=3)
    saved = ex.save_pretrained(tmp_path / "adapters")
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["base"] == str(base.resolve()) and config["moe_ranks"] == [8, 8]
    again = build_flux_executor(adapters=saved)
    for (ka, va), (kb, vb) in zip(ex.adapter_state_dict().items(),
                                  again.adapter_state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    x = _image()
    with torch.inference_mode():
        assert torch.allclose(ex(x, plan_for_task("denoise")),
                              again(x, plan_for_task("denoise")), atol=1e-6)
    # a mismatching adapter file is refused with one line
    other = build_flux_executor(base, config=FluxAdapterConfig(moe_ranks=(4, 4)))
    with pytest.raises(ValueError, match="shape"):
        other.load_adapters(saved)


def test_fape_restore_executor_flux_end_to_end(base: Path, tmp_path: Path) -> None:
    from PIL import Image

    arr = (_image(48, 64)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "in.png")
    result = runner.invoke(app, ["restore", str(tmp_path / "in.png"), "-o", str(tmp_path / "out"),
                                 "--executor", "flux", "--model", str(base), "--task", "denoise",
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[0])
    assert record["plan"]["task"] == "denoise" and record["tiles"] >= 1
    with Image.open(record["output"]) as out:
        assert out.size == (64, 48) and out.mode == "RGB"
    # a FLUX folder without --executor flux, or a compact model with it, is a usage error
    wrong = runner.invoke(app, ["restore", str(tmp_path / "in.png"), "-o", str(tmp_path / "o2"),
                                "--model", str(base), "--task", "denoise"])
    assert wrong.exit_code == 2 and "--executor flux" in wrong.output


def test_one_training_step_changes_only_adapters(base: Path, tmp_path: Path) -> None:
    from PIL import Image
    from skimage import data

    from fapecli.training.config import load_config
    from fapecli.training.loop import train

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, im in enumerate([data.astronaut(), data.coffee(), data.chelsea()]):
        Image.fromarray(np.ascontiguousarray(im[::6, ::6])).save(photos / f"{i}.png")
    before = {n: p.detach().clone() for n, p in build_flux_executor(base).named_parameters()}
    cfg = load_config("tiny", [f"data.clean_dirs=['{photos}']", f"out_dir='{tmp_path / 'run'}'",
                               "threads=1", "logging.progress=none", "model.executor=flux",
                               f"model.base='{base}'", "model.train_params=adapters",
                               "model.preset=fape-s", "schedule.steps=2", "schedule.warmup=0",
                               "schedule.val_every=0", "schedule.ckpt_every=0", "loss.adv_start=1",
                               "data.val_count=0", "optim.d0=1e-2"])
    result = train(cfg, emit=lambda _: None)
    assert result.step == 2 and result.final_dir is not None
    trained = build_flux_executor(adapters=result.final_dir)
    adapters = {n for n, _ in trained.adapter_named_parameters()}
    changed = {n for n, p in trained.named_parameters()
               if not torch.equal(p.detach().float(), before[n].float())}
    # the conditioner and the LoRA up-projections move; nothing of the base does
    assert changed and changed <= {n for n in before if n in adapters or n.startswith("cond.")}
    assert any(".lora_" in n for n in changed)
    assert not any(n.startswith("vae.") for n in changed)


def test_memory_guard_refuses_full_size_flux_on_cpu(tmp_path: Path) -> None:
    """A FLUX.1-sized config (no weights needed) is refused before loading, with numbers."""
    big = dict(TINY_TRANSFORMER, num_layers=19, num_single_layers=38, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
               in_channels=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "FluxTransformer2DModel", **big}))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(
        {"_class_name": "AutoencoderKL", **dict(TINY_VAE, latent_channels=16)}))
    with pytest.raises(MemoryGuardError, match=r"11\.90 B parameters, too many for the CPU") as err:
        build_flux_executor(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert "\n" not in str(err.value)


def test_memory_guard_compares_the_estimate_with_free_memory(base: Path) -> None:
    from fapecli.execution.flux_load import estimate_flux
    from fapecli.execution.memory import check_fits

    parts = estimate_flux(base / "transformer", base / "vae", torch.bfloat16,
                          cfg=FluxAdapterConfig(), training=True, batch=1, side=512)
    need = check_fits(parts, "cuda", available=64 * 2**30)
    assert need > sum(p.weight_bytes for p in parts)  # activations and optimiser state count
    with pytest.raises(MemoryGuardError, match=r"needs .* but cuda has 1\.0 MiB available"):
        check_fits(parts, "cuda", available=2**20)


def test_planner_hidden_states_extend_the_conditioning(base: Path) -> None:
    ex = build_flux_executor(base, config=FluxAdapterConfig(hidden_dim=24))
    _randomise_adapters(ex, seed=5)
    plan = plan_for_task("dehaze")
    cond = ex.plan_tokens(plan, torch.randn(5, 24))
    assert cond.tokens.shape[:2] == (1, 4 + 5) and cond.context.shape == (1, 9, 32)
    x = _image()
    with torch.inference_mode():
        with_hidden = ex(x, tokens=cond)
        plain = ex(x, tokens=ex.plan_tokens(plan))
    assert with_hidden.shape == x.shape and not torch.allclose(with_hidden, plain)
    with pytest.raises(FapeError, match="are 7 wide but these adapters were trained on 24"):
        ex.plan_tokens(plan, torch.randn(3, 7))  # one line for the CLI, not a traceback


def test_cuda_smoke_script_dry_run_on_cpu(tmp_path: Path) -> None:
    """bench/cuda_smoke.py (run on a GPU for the README) works end to end on a tiny config."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "bench" / "cuda_smoke.py"
    spec = importlib.util.spec_from_file_location("cuda_smoke", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "smoke.md"
    assert module.main(["--device", "cpu", "--preset", "tiny", "--sizes", "32",
                        "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| restore (one step)",
                                                  "| train step (fwd+bwd+AdamW)"]
    assert all(" yes " in r for r in rows)
    assert module.main(["--device", "cuda"]) == 2 or torch.cuda.is_available()
