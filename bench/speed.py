"""CPU speed and peak memory of `fape restore` on 1 and 24 megapixel photos.

    .venv/bin/python bench/speed.py --model fape-s --out bench/results/speed.md \
        [--sizes 1,24] [--threads 2] [--repeat 1]

Each run is the real command line in a child process, ``fape restore IN -o OUT --model M
--task denoise --device cpu --json --overwrite``, with OMP_NUM_THREADS / MKL_NUM_THREADS /
OPENBLAS_NUM_THREADS = --threads (torch takes its thread count from OMP_NUM_THREADS). For
each run: wall time, the restore time the command reports itself (``seconds`` in its JSON:
planning + inference, no decode/encode), and the child's peak resident memory
(``ru_maxrss`` of ``os.wait4`` on that child). Start-up (interpreter, imports, model load,
first-call warm-up, a tiny file's I/O) is measured separately on a 64x64 image and
subtracted from the wall time for the per-megapixel figure. Inputs are synthetic photo-like
JPEGs (a mosaic of scikit-image sample photos, upsampled, plus seeded Gaussian noise)
cached under bench/out/speed/. Also reports the model's parameter count and FLOPs per
megapixel. Writes a Markdown table and a JSON file (same name, .json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from _common import (
    REPO,
    THREAD_VARS,
    BenchError,
    ModelRef,
    command_line,
    fmt,
    machine,
    md_table,
    now,
    resolve_model,
)

OUT_DIR = REPO / "bench" / "out" / "speed"  # gitignored: inputs and restored outputs
SEED = 0
NOISE_SIGMA = 10.0  # 0-255 units
JPEG_QUALITY = 95
STARTUP_SIZE = (64, 64)
TARGET_S_PER_MP = 1.0
TARGET_RSS_BYTES = 2 * 1024**3
TARGET_MP = 24

# ------------------------------------------------------------------------------ inputs


def photo_size(megapixels: float) -> tuple[int, int]:
    """(height, width) of a 3:2 landscape photo of about ``megapixels`` (24 -> 4000x6000)."""
    width = round(math.sqrt(megapixels * 1e6 * 1.5))
    return round(width / 1.5), width


def photo(height: int, width: int, seed: int = SEED) -> np.ndarray:
    """A photo-like uint8 RGB image: four scikit-image photos in a 2x2 mosaic, upsampled
    bicubically to the size, plus seeded Gaussian noise (sigma `NOISE_SIGMA`)."""
    from skimage import data

    tiles = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    base_h, base_w = min(height, 800), min(width, 1200)
    half_h, half_w = base_h // 2, base_w // 2
    cells = [cv2.resize(t, (half_w, half_h), interpolation=cv2.INTER_AREA) for t in tiles]
    base = np.concatenate([np.concatenate(cells[:2], 1), np.concatenate(cells[2:], 1)], 0)
    img = cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC)
    rng = np.random.default_rng(seed)
    for r in range(0, height, 512):  # in strips: bounded memory at 24 MP
        strip = img[r:r + 512].astype(np.float32)
        strip += rng.normal(0.0, NOISE_SIGMA, strip.shape).astype(np.float32)
        img[r:r + 512] = np.clip(np.round(strip), 0, 255).astype(np.uint8)
    return img


def input_file(height: int, width: int) -> Path:
    """The cached JPEG of that size (made once)."""
    path = OUT_DIR / "inputs" / f"photo_{width}x{height}_seed{SEED}.jpg"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        bgr = np.ascontiguousarray(photo(height, width)[..., ::-1])
        tmp = path.with_suffix(".part.jpg")
        if not cv2.imwrite(str(tmp), bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise BenchError(f"cannot write {tmp}")
        os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------- running


@dataclass
class Run:
    """One `fape restore` child process."""

    label: str
    width: int
    height: int
    wall_s: float
    restore_s: float | None  # the command's own "seconds" (restore_image)
    tiles: int | None
    peak_rss_bytes: int
    cpu_s: float  # the child's user + system CPU time (less sensitive to other jobs)
    load_average: float | None  # 1-minute load average when it started

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


def fape_command() -> list[str]:
    exe = Path(sys.executable).parent / "fape"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "fapecli"]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(threads)
    return env


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_restore(label: str, image: Path, args: argparse.Namespace) -> Run:
    """Run `fape restore` on one image; wall time, its JSON record, its peak RSS."""
    out_dir = OUT_DIR / "restored"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [*fape_command(), "restore", str(image), "-o", str(out_dir), "--model", args.model,
           "--task", args.task, "--device", "cpu", "--json", "--overwrite"]
    if args.tile:
        cmd += ["--tile", str(args.tile)]
    err_path = out_dir / f"{image.stem}.stderr.txt"
    load = _load1()
    with open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                                env=child_env(args.threads))
        stdout = proc.stdout.read() if proc.stdout else b""
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = err_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"`{' '.join(cmd)}` exited with {proc.returncode}: "
                         + " | ".join(tail))
    record = _json_record(stdout)
    height, width = _size(image)
    return Run(label, width, height, wall, record.get("seconds"), record.get("tiles"),
               usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime, load)


def _json_record(stdout: bytes) -> dict[str, Any]:
    for line in stdout.decode(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            record = json.loads(line)
            if "error" in record:
                raise BenchError(f"fape restore: {record['error']}")
            return record
    return {}


def _size(image: Path) -> tuple[int, int]:
    from PIL import Image as PILImage

    with PILImage.open(image) as im:
        width, height = im.size
    return height, width


def repeated(label: str, image: Path, args: argparse.Namespace) -> list[Run]:
    runs = []
    for i in range(args.repeat):
        run = run_restore(label, image, args)
        print(f"  {label} #{i + 1}: {run.wall_s:.2f} s wall, restore {fmt(run.restore_s)} s, "
              f"peak RSS {run.peak_rss_bytes / 2**20:.0f} MiB", file=sys.stderr, flush=True)
        runs.append(run)
    return runs


def model_stats(ref: ModelRef, task: str) -> dict[str, Any]:
    """Parameter count and forward FLOPs per megapixel (counted on 256x256) of the network
    that restores ``task`` (its task expert when the model has one)."""
    import torch

    from fapecli.execution.compact import FapeS, count_parameters, flops_per_megapixel
    from fapecli.tasks import normalize_task

    torch.set_num_threads(1)
    task = normalize_task(task)
    model = FapeS.from_pretrained(ref.expert_weights.get(task, ref.weights), device="cpu")
    return {"parameters": count_parameters(model), "flops_per_mp": flops_per_megapixel(model),
            "preset": model.config.name, "experts": ref.experts,
            "timed_network": f"{task} expert" if task in ref.experts else "base"}


# ---------------------------------------------------------------------------- report


def summarise(runs: list[Run], startup: dict[str, Any] | None = None) -> dict[str, Any]:
    """Median wall/restore times over repeats, the worst peak RSS, and per-MP figures net
    of the start-up run's (``startup``) wall and restore times."""
    first = runs[0]
    wall = statistics.median(r.wall_s for r in runs)
    restores = [r.restore_s for r in runs if r.restore_s is not None]
    restore = statistics.median(restores) if restores else None
    mp = first.megapixels
    startup_wall = startup["wall_s"] if startup else 0.0
    warmup = (startup or {}).get("restore_s") or 0.0
    cpu = statistics.median(r.cpu_s for r in runs)
    startup_cpu = startup["cpu_s"] if startup else 0.0
    return {
        "label": first.label, "width": first.width, "height": first.height, "megapixels": mp,
        "wall_s": wall, "startup_s": startup_wall, "warmup_s": warmup,
        "s_per_mp_wall_minus_startup": (wall - startup_wall) / mp,
        "s_per_mp_restore": None if restore is None else (restore - warmup) / mp,
        "s_per_mp_restore_raw": None if restore is None else restore / mp,
        "restore_s": restore, "tiles": first.tiles, "cpu_s": cpu,
        "cpu_s_per_mp_minus_startup": (cpu - startup_cpu) / mp,
        "peak_rss_bytes": max(r.peak_rss_bytes for r in runs),
        "load_average": [r.load_average for r in runs],
        "runs": [asdict(r) for r in runs],
    }


def _target(value: float | None, ok: bool) -> str:
    return "–" if value is None else ("✓" if ok else "✗")


def table(startup: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    headers = ["input", "MP", "wall s", "(wall − start-up) s/MP", "restore s/MP",
               "CPU s/MP", "tiles", "peak RSS", f"≤ {TARGET_S_PER_MP:g} s/MP", "< 2 GiB",
               "load avg"]
    lines = [[f"{startup['width']}x{startup['height']} (start-up: imports, model load)",
              fmt(startup["megapixels"], 4), fmt(startup["wall_s"]), "–",
              f"({fmt(startup['restore_s'])} s)", f"({fmt(startup['cpu_s'])} CPU s)",
              startup["tiles"], _gib(startup["peak_rss_bytes"]), "", "",
              _loads(startup["load_average"])]]
    for r in rows:
        s_mp, s_restore = r["s_per_mp_wall_minus_startup"], r["s_per_mp_restore"]
        ok_speed = f"{_target(s_mp, s_mp <= TARGET_S_PER_MP)} / " + _target(
            s_restore, s_restore is not None and s_restore <= TARGET_S_PER_MP)
        lines.append([
            f"{r['width']}x{r['height']} photo", fmt(r["megapixels"], 1), fmt(r["wall_s"]),
            fmt(s_mp, 3), fmt(s_restore, 3), fmt(r["cpu_s_per_mp_minus_startup"], 3),
            r["tiles"], _gib(r["peak_rss_bytes"]), ok_speed,
            _target(1.0, r["peak_rss_bytes"] < TARGET_RSS_BYTES), _loads(r["load_average"]),
        ])
    return md_table(headers, lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _loads(values: list[float | None]) -> str:
    return ", ".join("?" if v is None else f"{v:g}" for v in values)


def write_reports(info: dict[str, Any], out: Path) -> None:
    m, model = info["machine"], info["model"]
    env = ", ".join(f"{v}={info['threads']}" for v in THREAD_VARS)
    lines = [
        "# fape restore: CPU speed and memory",
        "",
        f"- Command: `{info['command']}`",
        f"- Date: {info['date']}",
        f"- Machine: nproc {m['nproc']}, {m['cpu']}, load average {m['load_average']} at "
        f"start; Python {m['python']}, torch {m['torch']}",
        f"- Model: {model['label']} (`{model['weights']}`), sha256 `{model['sha256']}`, "
        f"preset {model['preset']}, {model['parameters']:,} parameters, "
        f"{model['flops_per_mp'] / 1e9:.2f} GFLOP per megapixel (forward, counted on 256x256)"
        + (f"; timed network: the {model['timed_network']} (experts: "
           f"{', '.join(f'{t} sha256 `{h}`' for t, h in model['experts'].items())})"
           if model.get("experts") else ""),
        f"- Timed command (child process): `{info['timed_command']}` with "
        f"{env} (torch threads {info['threads']})",
        "- wall s: the whole command; start-up: the same command on a 64x64 image "
        "(interpreter, imports, model load, first-call warm-up, tiny I/O); "
        "(wall − start-up) s/MP includes JPEG decode/encode; restore s/MP is the command's "
        "own `seconds` (planning + tiled inference, no I/O) less the start-up run's (its "
        "lazy imports and first-call warm-up); CPU s/MP: the child's user + system CPU "
        "seconds less the start-up run's (with N threads, ideal wall = CPU / N; much less "
        "sensitive to other jobs than wall time); peak RSS: `ru_maxrss` of the child "
        "(os.wait4). Median over repeats, worst RSS.",
        f"- Inputs: synthetic photo-like JPEGs (q{JPEG_QUALITY}): skimage astronaut / coffee /"
        f" chelsea / rocket in a 2x2 mosaic, bicubic upsampling, Gaussian noise σ "
        f"{NOISE_SIGMA:g} (seed {SEED}).",
        f"- Targets: ≤ {TARGET_S_PER_MP:g} s/MP (shown as wall-based / restore-only) and "
        f"< 2 GiB peak RSS on the {TARGET_MP} MP photo.",
        "",
        table(info["startup"], info["sizes"]),
        "",
    ]
    if info.get("notes"):
        lines += [f"Note: {n}" for n in info["notes"]] + [""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")


def load_notes(info: dict[str, Any]) -> list[str]:
    """A warning when other processes competed for the CPUs during the runs."""
    nproc = info["machine"]["nproc"] or 1
    loads = [v for r in (info["startup"], *info["sizes"]) for v in r["load_average"]
             if v is not None]
    if loads and max(loads) > nproc:
        return [f"the machine was loaded (1-minute load average up to {max(loads):g} on "
                f"{nproc} CPUs, other jobs running): timings are pessimistic."]
    return []


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fape-s", help="model name or checkpoint folder")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "speed.md")
    p.add_argument("--sizes", default="1,24", help="megapixels, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="runs per size (median reported)")
    p.add_argument("--task", default="denoise")
    p.add_argument("--tile", type=int, default=0, help="--tile for fape restore (0: auto)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
        if not sizes or min(sizes) <= 0 or args.repeat < 1 or args.threads < 1:
            raise BenchError("--sizes must be positive numbers; --repeat, --threads >= 1")
        ref = resolve_model(args.model)
        info: dict[str, Any] = {"command": command_line(), "date": now(),
                                "machine": machine(), "threads": args.threads}
        startup_img = input_file(*STARTUP_SIZE)
        images = [(f"{mp:g} MP", input_file(*photo_size(mp))) for mp in sizes]
        print("start-up (64x64):", file=sys.stderr)
        startup = summarise(repeated("start-up", startup_img, args))
        rows = []
        for label, image in images:
            print(f"{label}:", file=sys.stderr)
            rows.append(summarise(repeated(label, image, args), startup))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info |= {
        "model": {"name": args.model, "label": ref.label, "weights": str(ref.weights),
                  "sha256": ref.sha256, **model_stats(ref, args.task)},
        "timed_command": f"fape restore IN -o OUT --model {args.model} --task {args.task} "
                         f"--device cpu --json --overwrite"
                         + (f" --tile {args.tile}" if args.tile else ""),
        "startup": startup, "sizes": rows,
        "targets": {"s_per_mp": TARGET_S_PER_MP, "peak_rss_bytes": TARGET_RSS_BYTES,
                    "megapixels": TARGET_MP},
        "load_average_end": machine()["load_average"],
    }
    info["notes"] = load_notes(info)
    write_reports(info, args.out)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
