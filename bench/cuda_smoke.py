"""CUDA smoke test of the FLUX path: a mid-size random FLUX transformer + VAE in bf16.

Builds the models from configs (no weights needed), injects the Frequency-Aware LoRA-MoE
through the same loader code as real weights, then times one restoration forward and one
training step (forward + backward through the adapters, base frozen, gradient checkpointing)
and records the peak CUDA memory of each. Writes a Markdown report::

    .venv/bin/python bench/cuda_smoke.py --out bench/results/cuda-smoke.md
    .venv/bin/python bench/cuda_smoke.py --device cpu --size 64 --preset tiny   # a dry run

It checks what a tiny CPU test cannot: bf16 kernels on the GPU, that gradients reach every
adapter and nothing of the base, that outputs are finite, and how memory scales with size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BenchError, command_line, machine, md_table, now

# mid-size: FLUX.1's layout (double + single blocks, 16-channel latents, 2x2 packing) at
# about 1/10 of its width and depth; "tiny" is for CPU dry runs of this script
PRESETS = {
    "mid": dict(
        transformer=dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8,
                         attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512,
                         pooled_projection_dim=256, guidance_embeds=True,
                         axes_dims_rope=(8, 28, 28)),
        vae=dict(in_channels=3, out_channels=3, latent_channels=16,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4,
                 block_out_channels=(64, 128, 256, 256), layers_per_block=1,
                 norm_num_groups=32, sample_size=512, shift_factor=0.1159,
                 scaling_factor=0.3611)),
    "tiny": dict(
        transformer=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                         pooled_projection_dim=16, guidance_embeds=False,
                         axes_dims_rope=(2, 2, 4)),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                 layers_per_block=1, norm_num_groups=4, sample_size=32, shift_factor=0.1,
                 scaling_factor=0.5)),
}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _image(size: int, device, batch: int = 1):
    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.rand(batch, 3, size // 8, size // 8, generator=g)
    x = torch.nn.functional.interpolate(base, size=(size, size), mode="bicubic")
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1).to(device)


def run(args: argparse.Namespace) -> tuple[list[list[object]], dict[str, object]]:
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from fapecli.execution.conditioning import plan_for_task
    from fapecli.execution.flux_load import build_flux_executor

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("no CUDA device here (torch.cuda.is_available() is False); "
                         "use --device cpu --preset tiny for a dry run")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    preset = PRESETS[args.preset]
    info: dict[str, object] = {"preset": args.preset, "dtype": str(dtype).removeprefix("torch.")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
        info["cuda"] = torch.version.cuda
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        torch.manual_seed(0)
        FluxTransformer2DModel(**preset["transformer"]).save_pretrained(base / "transformer")
        AutoencoderKL(**preset["vae"]).save_pretrained(base / "vae")
        plan = plan_for_task("denoise")

        # inference: bf16 base and adapters, one step
        _reset(device)
        ex = build_flux_executor(base, device=device, dtype=dtype)
        info["transformer parameters"] = sum(p.numel() for p in ex.transformer.parameters())
        info["adapter parameters"] = sum(p.numel() for p in ex.adapter_parameters())
        info["adapted layers"] = len(ex.frequency_layers())
        for size in args.sizes:
            x = _image(size, device)
            _reset(device)
            with torch.inference_mode():
                cond = ex.plan_tokens(plan)
                ex(x[..., : size // 2, : size // 2], tokens=cond)  # warm-up (kernels, cuDNN)
                _sync(device)
                t = time.perf_counter()
                y = ex(x, tokens=cond)
                _sync(device)
                dt = time.perf_counter() - t
            finite = bool(torch.isfinite(y).all())
            rows.append(["restore (one step)", f"{size}x{size}", 1, f"{dt:.3f}",
                         _gb(_peak(device)), "yes" if finite else "NO", "–"])
            if not finite:
                raise BenchError(f"restore at {size}px produced NaN/inf in {info['dtype']}")
        del ex

        # training: fp32 adapters under bf16 autocast, frozen base, gradient checkpointing
        _reset(device)
        ex = build_flux_executor(base, device=device, dtype=dtype, training=True)
        ex.train()
        params = list(ex.adapter_parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)
        for size in args.sizes:
            x = _image(size, device, batch=args.batch)
            target = _image(size, device, batch=args.batch)
            _reset(device)
            timings = []
            for _ in range(2):  # the second step is the timed one (allocator warmed)
                opt.zero_grad(set_to_none=True)
                _sync(device)
                t = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16,
                                    enabled=device.type == "cuda"):
                    loss = (ex(x, plan) - target).float().abs().mean()
                loss.backward()
                opt.step()
                _sync(device)
                timings.append(time.perf_counter() - t)
            with_grad = sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)
            base_grads = sum(p.grad is not None for n, p in ex.named_parameters()
                             if n.startswith(("transformer.", "vae.")) and ".lora_" not in n
                             and "router" not in n and not p.requires_grad)
            ok = bool(torch.isfinite(loss)) and with_grad > 0 and base_grads == 0
            rows.append(["train step (fwd+bwd+AdamW)", f"{size}x{size}", args.batch,
                         f"{timings[-1]:.3f}", _gb(_peak(device)),
                         "yes" if bool(torch.isfinite(loss)) else "NO",
                         f"{with_grad}/{len(params)}"])
            if not ok:
                raise BenchError(f"train step at {size}px: loss {float(loss)}, {with_grad} "
                                 f"adapter tensors with gradient, {base_grads} base tensors")
    return rows, info


def _gb(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    ap.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")],
                    default=[512, 1024], help="image sides, comma-separated")
    ap.add_argument("--batch", type=int, default=1, help="training batch")
    ap.add_argument("--out", type=Path, help="write the Markdown report here")
    args = ap.parse_args(argv)
    try:
        rows, info = run(args)
    except BenchError as exc:
        print(f"cuda_smoke: {exc}", file=sys.stderr)
        return 2
    table = md_table(["job", "image", "batch", "seconds", "peak CUDA memory", "finite",
                      "adapter tensors with gradient"], rows)
    text = "\n".join([
        "# FLUX path: CUDA smoke test (random mid-size config)", "",
        f"- Command: `{command_line()}`", f"- Date: {now()}",
        f"- Machine: {json.dumps(machine())}",
        *(f"- {k}: {v}" for k, v in info.items()), "",
        "Random weights (no download): the timings and memory are for this reduced config, "
        "not FLUX.1 itself (see the README's GPU memory table for that).", "", table, "",
    ])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
