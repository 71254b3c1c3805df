"""Top-1 accuracy of the rule planner on labelled folders (a benchmark script, not a test).

    .venv/bin/python bench/plan_accuracy.py [--data ../shared/data] [--train] [--synthetic]
        [--limit N] [--severity medium] [--threads 1] [--out bench/results/plan_accuracy.md]

Degraded test folders carry their task (Rain100L -> derain, GoPro/Levin09 -> deblur, LOL ->
lowlight, RealHazy/SOTS -> dehaze, Snow_real -> desnow, Set5/Set14 x4 LR -> sr, CBSD68 plus
Gaussian noise of sigma 15/25/50 with a fixed seed -> denoise); clean folders (CBSD68,
Set14 HR, LOL normal-light, grey Set12) should read "none". ``--train`` adds the training
split (CBSD432 and SunHays80 photos -> none, LOL low-light subset -> lowlight) and
``--synthetic`` adds degradations of CBSD432 photos made by `fapecli.training.degrade` at a
fixed severity. Prints Markdown confusion matrices (rows: truth, columns: planner), top-1
accuracy per group and per folder, and the feature-pool time per image and per megapixel.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _common import REPO, BenchError, command_line, limit_threads, machine, md_table, now

from fapecli.planning.features import extract_features
from fapecli.planning.rules import plan_from_features
from fapecli.tasks import NONE, TASK_NAMES

LABELS = (*TASK_NAMES, NONE)
NOISE_SIGMAS = (15, 25, 50)
NOISE_SEED = 2024
SYNTH_DEGRADATIONS = {"rain": "derain", "snow": "desnow", "haze": "dehaze", "blur": "deblur",
                      "noise": "denoise", "lowlight": "lowlight", "lowres": "sr"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


@dataclass(frozen=True)
class Folder:
    group: str  # "degraded", "clean", "train", "synthetic"
    path: str  # relative to the data root
    label: str  # expected task or "none"
    noise: int | None = None  # Gaussian sigma (0-255) added by this script
    degradation: str | None = None  # synthesised by fapecli.training.degrade

    @property
    def name(self) -> str:
        extra = f" +σ{self.noise}" if self.noise else ""
        extra += f" +{self.degradation}" if self.degradation else ""
        return self.path + extra


TEST: tuple[Folder, ...] = (
    Folder("degraded", "test/Rain100L/lq", "derain"),
    Folder("degraded", "real/GoPro_blur/lq", "deblur"),
    Folder("degraded", "test/Levin09/lq", "deblur"),
    Folder("degraded", "test/LOL_v1_eval15/lq", "lowlight"),
    Folder("degraded", "real/RealHazy/lq", "dehaze"),
    Folder("degraded", "real/SOTS_outdoor2/lq", "dehaze"),
    Folder("degraded", "real/Snow_real/lq", "desnow"),
    Folder("degraded", "test/Set5_SRx4/lq", "sr"),
    Folder("degraded", "test/Set14_SRx4/lq", "sr"),
    *(Folder("degraded", "test/CBSD68", "denoise", noise=s) for s in NOISE_SIGMAS),
    Folder("clean", "test/CBSD68", NONE),
    Folder("clean", "test/Set14_SRx4/gt", NONE),
    Folder("clean", "test/LOL_v1_eval15/gt", NONE),
    Folder("clean", "test/Set12_gray", NONE),
)
TRAIN: tuple[Folder, ...] = (
    Folder("train", "train/CBSD432", NONE),
    Folder("train", "train/SunHays80", NONE),
    Folder("train", "train/LOL_v1_our485_subset/lq", "lowlight"),
)
SYNTH_SOURCE = "train/CBSD432"


@dataclass
class Result:
    folder: Folder
    file: str
    predicted: str
    seconds: float
    megapixels: float
    scores: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ input


def _reader():
    """fapecli.io.read_image when available, else OpenCV; returns (rgb float32, (h, w))."""
    if importlib.util.find_spec("fapecli.io") is not None:
        try:
            from fapecli.io import read_image

            def read(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
                img = read_image(path)
                return img.rgb, (img.height, img.width)

            return read
        except ImportError:
            pass
    import cv2

    def read_cv2(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise BenchError(f"cannot read {path}")
        rgb = np.ascontiguousarray(bgr[:, :, ::-1], dtype=np.float32) / 255.0
        return rgb, rgb.shape[:2]

    return read_cv2


def _files(root: Path, folder: Folder, limit: int | None) -> list[Path]:
    d = root / folder.path
    if not d.is_dir():
        raise BenchError(f"missing folder {d} (pass --data)")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXT)
    return files[:limit] if limit else files


def _inputs(root: Path, folder: Folder, limit: int | None,
            severity: str) -> Iterator[tuple[Path, np.ndarray, tuple[int, int]]]:
    read = _reader()
    for i, path in enumerate(_files(root, folder, limit)):
        rgb, size = read(path)
        if folder.noise:
            rng = np.random.default_rng(NOISE_SEED + 1000 * folder.noise + i)
            noise = rng.normal(0.0, folder.noise / 255.0, rgb.shape).astype(np.float32)
            rgb = np.clip(rgb + noise, 0.0, 1.0)
        if folder.degradation:
            from fapecli.training.degrade import degrade

            rgb = degrade(rgb, folder.degradation, seed=i, severity=severity).image
            size = rgb.shape[:2]
        yield path, rgb, size


# ------------------------------------------------------------------------------------ run


def run(root: Path, folders: list[Folder], limit: int | None, severity: str,
        verbose: bool) -> list[Result]:
    results = []
    for folder in folders:
        n_ok = 0
        for path, rgb, size in _inputs(root, folder, limit, severity):
            t0 = time.perf_counter()
            pool = extract_features(rgb, size=size)
            plan = plan_from_features(pool)
            dt = time.perf_counter() - t0
            res = Result(folder, path.name, plan.task, dt, rgb.shape[0] * rgb.shape[1] / 1e6,
                         pool.scores)
            results.append(res)
            n_ok += plan.task == folder.label
            if verbose and plan.task != folder.label:
                print(f"  miss {folder.name}/{path.name}: {plan.task} "
                      f"{json.dumps(pool.scores)}", file=sys.stderr)
        print(f"{folder.name}: {n_ok} ok", file=sys.stderr)
    return results


def confusion(results: list[Result]) -> str:
    counts = Counter((r.folder.label, r.predicted) for r in results)
    truths = [t for t in LABELS if any(r.folder.label == t for r in results)]
    cols = [t for t in LABELS if any(r.predicted == t or r.folder.label == t for r in results)]
    rows = []
    for t in truths:
        n = sum(counts[(t, p)] for p in cols)
        rows.append([f"**{t}**", *(counts[(t, p)] or "·" for p in cols),
                     f"{counts[(t, t)] / n:.1%}"])
    return md_table(["truth \\ plan", *cols, "recall"], rows)


def report(results: list[Result], args: argparse.Namespace) -> str:
    out = [f"# Rule planner top-1 accuracy ({now()})", "",
           f"`{command_line()}` · {args.threads} thread(s) · {machine()['cpu']}", ""]
    by_group: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        by_group[r.folder.group].append(r)
    summary = []
    for group, rs in by_group.items():
        ok = sum(r.predicted == r.folder.label for r in rs)
        secs = np.array([r.seconds for r in rs])
        mps = np.array([r.megapixels for r in rs])
        summary.append([group, len(rs), f"{ok / len(rs):.1%}", f"{secs.mean() * 1e3:.0f}",
                        f"{np.median(secs) * 1e3:.0f}", f"{secs.sum() / mps.sum():.2f}"])
        out += [f"## {group}: top-1 {ok}/{len(rs)} = {ok / len(rs):.1%}", "", confusion(rs), ""]
        per = []
        for folder in dict.fromkeys(r.folder for r in rs):
            fr = [r for r in rs if r.folder == folder]
            got = Counter(r.predicted for r in fr)
            wrong = ", ".join(f"{k} {v}" for k, v in got.most_common() if k != folder.label)
            ok_f = got[folder.label]
            per.append([folder.name, folder.label, f"{ok_f}/{len(fr)}", wrong or "–"])
        out += [md_table(["folder", "truth", "correct", "misread as"], per), ""]
    out += ["## Summary", "", md_table(
        ["group", "images", "top-1", "ms/image (mean)", "ms/image (median)", "s/MP"], summary)]
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                   help="data root (default ../shared/data next to the repository)")
    p.add_argument("--train", action="store_true", help="also the training split")
    p.add_argument("--synthetic", action="store_true",
                   help="also fapecli.training.degrade degradations of CBSD432 photos")
    p.add_argument("--severity", default="medium", help="severity of --synthetic")
    p.add_argument("--limit", type=int, default=None, help="first N images of each folder")
    p.add_argument("--train-limit", type=int, default=None,
                   help="first N images of each train/synthetic folder (default --limit)")
    p.add_argument("--only", default=None, help="comma-separated groups to run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    p.add_argument("-v", "--verbose", action="store_true", help="print each miss to stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit_threads(args.threads)
    folders: list[Folder] = list(TEST)
    if args.train:
        folders += TRAIN
    if args.synthetic:
        if importlib.util.find_spec("fapecli.training.degrade") is None:
            raise BenchError("--synthetic needs fapecli.training.degrade")
        folders += [Folder("synthetic", SYNTH_SOURCE, task, degradation=deg)
                    for deg, task in SYNTH_DEGRADATIONS.items()]
    if args.only:
        keep = set(args.only.split(","))
        folders = [f for f in folders if f.group in keep]
    try:
        results = []
        for f in folders:
            test = f.group in ("degraded", "clean")
            lim = args.limit if test else (args.train_limit or args.limit)
            results += run(args.data, [f], lim, args.severity, args.verbose)
    except BenchError as exc:
        print(f"plan_accuracy: {exc}", file=sys.stderr)
        return 2
    text = report(results, args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
