"""Training data: (lq, gt, plan) crops from clean folders (degraded on the fly) and paired folders.

* Clean folders (``data.clean_dirs``; a folder with a ``gt/`` subfolder means that subfolder):
  a random crop with a random flip / rot90, then :func:`~fapecli.training.degrade.
  random_degradation` at crop level. Low resolution comes back upsampled to the crop size
  (``keep_size``) by `fapecli.resample.upsample`, as the executor's input is at inference
  (:func:`fapecli.execution.compact.prepare_input`).
* Paired folders (``data.paired_dirs``, ``gt/`` + ``lq/`` with matching file stems): crops at
  the same place; a smaller lq (SR pairs) is upsampled to the gt size once, the same way.
* Decoding happens once: every image is kept in memory as uint8.
* Determinism: sample ``i`` is drawn from ``default_rng([seed, i])``; the batch of step ``s``
  on rank ``r`` of ``w`` holds samples ``(s * w + r) * B + j``. So a run is reproducible
  whatever the number of DataLoader workers, and resuming at step ``s`` only needs ``s``.
* Validation: the first ``val_count`` clean images and ``val_paired`` paired images by sorted
  path are held out of training; each clean one gets one degradation (cycling through the
  tasks with a positive mix ratio) with a fixed seed (``VAL_SEED + i``, the same for every
  run), on a centre crop of ``val_crop``.

Conditioning (which plan the executor sees): with probability ``rule_plan_prob`` the rule
planner's plan of the lq crop (what inference sees, errors included), otherwise the
ground-truth plan of the applied degradations with noisy evidence scores (``score_noise``)
and, with probability ``plan_error_prob``, a wrong dominant task: the executor learns to use
the plan but not to trust it blindly. The rule planner's size cue is meaningless on a crop,
so its ``sr`` decision is replaced by the truth (see :func:`rule_plan`). Validation always uses
the exact ground-truth plan.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fapecli.errors import UsageError
from fapecli.planning.plan import Plan
from fapecli.resample import upsample
from fapecli.tasks import NONE, TASK_NAMES, band_of, get_task, normalize_task
from fapecli.training.config import DataConfig

VAL_SEED = 20_250_000
NEUTRAL_SIZE = (1024, 1024)  # the size the rule planner is told for a crop (no SR cue)


# ---------------------------------------------------------------------------------- files
def _images_in(folder: Path) -> list[Path]:
    from fapecli.io import is_image_name, is_junk

    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and is_image_name(p.name) and not is_junk(p.name)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def list_clean(dirs: Sequence[str]) -> list[Path]:
    """Clean images of every folder (``<dir>/gt`` when present), sorted by path."""
    out: list[Path] = []
    for d in dirs:
        folder = Path(d)
        if not folder.is_dir():
            raise UsageError("data.clean_dirs: not a folder", folder)
        found = _images_in(folder / "gt" if (folder / "gt").is_dir() else folder)
        if not found:
            raise UsageError("data.clean_dirs: no images in folder", folder)
        out += found
    return sorted(out)


def list_pairs(dirs: Sequence[str]) -> list[tuple[Path, Path]]:
    """(gt, lq) paths matched by file stem in ``<dir>/gt`` and ``<dir>/lq``, sorted by path."""
    out: list[tuple[Path, Path]] = []
    for d in dirs:
        folder = Path(d)
        if not (folder / "gt").is_dir() or not (folder / "lq").is_dir():
            raise UsageError("data.paired_dirs: needs gt/ and lq/ subfolders", folder)
        lq = {p.relative_to(folder / "lq").with_suffix(""): p for p in _images_in(folder / "lq")}
        pairs = [(g, lq[k]) for g in _images_in(folder / "gt")
                 if (k := g.relative_to(folder / "gt").with_suffix("")) in lq]
        if not pairs:
            raise UsageError("data.paired_dirs: no gt/lq pairs with matching names", folder)
        out += pairs
    return sorted(out)


def load_uint8(path: Path) -> np.ndarray:
    """An image file as H x W x 3 uint8 RGB (decoded through fapecli.io)."""
    from fapecli.io import read_image

    rgb = read_image(path, max_pixels=None).rgb
    return np.ascontiguousarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8))


@dataclass
class Item:
    """One training or validation image: gt (uint8), lq for pairs, and what is known of it."""

    gt: np.ndarray
    lq: np.ndarray | None = None
    task: str | None = None  # pairs: the restoration task, when known
    scale: int | None = None  # pairs: the SR factor when lq was smaller
    name: str = ""


def load_items(cfg: DataConfig) -> tuple[list[Item], list[Item]]:
    """(training items, validation items), decoded once; validation = first N by sorted path."""
    clean = list_clean(cfg.clean_dirs)
    pairs = list_pairs(cfg.paired_dirs)
    if len(clean) <= cfg.val_count and clean:
        raise UsageError(f"data.val_count={cfg.val_count} leaves no clean training images "
                         f"({len(clean)} found)")
    if not clean and not pairs:
        raise UsageError("no training images: set data.clean_dirs and/or data.paired_dirs")
    tasks = {k: normalize_task(v) for k, v in cfg.paired_tasks.items()}
    items = [Item(load_uint8(p), name=str(p)) for p in clean]
    paired = []
    for g, q in pairs:
        gt, lq = load_uint8(g), load_uint8(q)
        ratio = gt.shape[0] / lq.shape[0]
        scale = round(ratio) if ratio > 1.05 else None
        folder = g.parent.parent.name
        paired.append(Item(gt, upsample(lq, gt.shape[:2]), tasks.get(folder), scale, str(g)))
    nv, npv = cfg.val_count, min(cfg.val_paired, max(0, len(paired) - 1))
    return items[nv:] + paired[npv:], items[:nv] + paired[:npv]


# ---------------------------------------------------------------------------------- plans
def _steps_tasks(params: dict) -> tuple[list[str], int | None]:
    """Task names of a Degraded's params, primary first, and the SR scale if any."""
    steps = params.get("steps", [])
    names = [get_task(s["degradation"]).name for s in steps]
    primary = params.get("primary")
    if primary and primary != NONE:
        p = get_task(primary).name
        names = [p, *[n for n in names if n != p]]
    scale = next((int(s["scale"]) for s in steps if s["degradation"] == "lowres"), None)
    return names, scale


def truth_plan(tasks: Sequence[str], scale: int | None = None) -> Plan:
    """The exact ground-truth plan of a list of tasks (dominant first)."""
    if not tasks:
        return Plan(task=NONE, band=NONE, source="truth")
    return Plan(task=tasks[0], band=band_of(tasks[0]), secondary=list(tasks[1:]),
                scores={t: 1.0 for t in tasks}, source="truth",
                scale=scale if "sr" in tasks else None)


def noisy_plan(tasks: Sequence[str], scale: int | None, rng: np.random.Generator,
               noise: float, error_prob: float) -> Plan:
    """A ground-truth plan with noisy evidence and, sometimes, a wrong dominant task."""
    tasks = list(tasks)
    scores = {t: float(np.clip(0.75 + noise * rng.standard_normal(), 0, 1)) for t in tasks}
    for t in TASK_NAMES:
        if t not in scores:
            scores[t] = float(np.clip(0.5 * noise * abs(rng.standard_normal()), 0, 1))
    if rng.random() < error_prob:
        wrong = [t for t in (*TASK_NAMES, NONE) if t != (tasks[0] if tasks else NONE)]
        pick = str(wrong[int(rng.integers(len(wrong)))])
        if pick != NONE:
            true = tasks[0] if tasks else None
            if true:
                scores[true], scores[pick] = scores[pick], scores[true]
            else:
                scores[pick] = float(np.clip(0.6 + noise * rng.standard_normal(), 0, 1))
        tasks = ([] if pick == NONE else [pick]) + [t for t in tasks if t != pick][:1]
    if not tasks:
        return Plan(task=NONE, band=NONE, scores=scores, source="truth")
    return Plan(task=tasks[0], band=band_of(tasks[0]), secondary=tasks[1:], scores=scores,
                scale=scale if "sr" in tasks else None, source="truth")


def _rule_planner() -> Callable[[np.ndarray], Plan] | None:
    try:
        from fapecli.planning.rules import plan_image
    except ImportError:
        return None
    return plan_image


def rule_plan(planner: Callable[[np.ndarray], Plan], lq: np.ndarray, truth: Sequence[str],
              scale: int | None) -> Plan:
    """The rule planner's plan of an lq crop, with the size-based SR cue replaced by the truth.

    A training crop is small whatever the image it came from, so the planner's "small image
    means super-resolution" rule would fire on every crop; at inference it sees whole images.
    The planner is told a neutral size (:data:`NEUTRAL_SIZE`) and the truth decides ``sr``.
    """
    plan = planner(lq, size=NEUTRAL_SIZE)
    is_sr = "sr" in truth
    tasks = [t for t in plan.tasks if t != "sr"]
    if is_sr:
        tasks = ["sr", *tasks] if truth and truth[0] == "sr" else [*tasks, "sr"]
    scores = dict(plan.scores)
    scores["sr"] = 1.0 if is_sr else 0.0
    if not tasks:
        return Plan(task=NONE, band=NONE, scores=scores, features=plan.features,
                    source=plan.source)
    return Plan(task=tasks[0], band=band_of(tasks[0]), secondary=tasks[1:], scores=scores,
                features=plan.features, source=plan.source, scale=scale if is_sr else None,
                rationale=plan.rationale, pipeline=plan.pipeline)


# -------------------------------------------------------------------------------- crops
def _crop_box(h: int, w: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


def _pad_to(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if h >= size and w >= size:
        return img
    return cv2.copyMakeBorder(img, 0, max(0, size - h), 0, max(0, size - w), cv2.BORDER_REFLECT_101)


def _augment(arrs: list[np.ndarray], k: int, flip: bool) -> list[np.ndarray]:
    out = []
    for a in arrs:
        a = np.rot90(a, k)
        out.append(np.ascontiguousarray(a[:, ::-1] if flip else a))
    return out


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """H x W x 3 (uint8 or float in [0, 1]) -> 3 x H x W float32."""
    arr = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class TrainSet(Dataset):
    """Map-style: ``ds[i]`` is the deterministic ``i``-th random training sample."""

    def __init__(self, items: list[Item], cfg: DataConfig, seed: int) -> None:
        if not items:
            raise UsageError("no training images left after holding out the validation set")
        self.items, self.cfg, self.seed = items, cfg, seed
        weights = [cfg.paired_weight if it.lq is not None else 1.0 for it in items]
        self.cum = np.cumsum(weights).tolist()
        self.mix = {k: v for k, v in cfg.mix.items() if v > 0}
        self.planner = _rule_planner() if cfg.rule_plan_prob > 0 else None

    def __len__(self) -> int:  # nominal: the stream is infinite, indexed by sample number
        return 2**62

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, Plan]:
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, int(index)])
        item = self.items[bisect.bisect_right(self.cum, rng.random() * self.cum[-1])]
        gt = _pad_to(item.gt, cfg.crop)
        y, x = _crop_box(*gt.shape[:2], cfg.crop, rng)
        k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
        win = (slice(y, y + cfg.crop), slice(x, x + cfg.crop))
        if item.lq is None:
            from fapecli.training.degrade import random_degradation

            (gt,) = _augment([gt[win]], k, flip)
            clean = gt.astype(np.float32) / 255.0
            d = random_degradation(clean, rng, mix=self.mix, mixture_prob=cfg.mixture_prob,
                                   keep_size=True, clean_prob=cfg.clean_prob)
            lq = d.image
            tasks, scale = _steps_tasks(d.params)
        else:
            gt, lq = _augment([gt[win], _pad_to(item.lq, cfg.crop)[win]], k, flip)
            tasks, scale = ([item.task] if item.task else []), item.scale
        if self.planner is not None and (rng.random() < cfg.rule_plan_prob or
                                         (item.lq is not None and not item.task)):
            lq_f = lq.astype(np.float32) / 255.0 if lq.dtype == np.uint8 else lq
            plan = rule_plan(self.planner, lq_f, tasks, scale)
        else:
            plan = noisy_plan(tasks, scale, rng, cfg.score_noise, cfg.plan_error_prob)
        return to_tensor(lq), to_tensor(gt), plan


def _centre(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    sh, sw = min(size, h), min(size, w)
    y, x = (h - sh) // 2, (w - sw) // 2
    return img[y:y + sh, x:x + sw]


def validation_set(items: list[Item], cfg: DataConfig,
                   multiple: int = 8) -> list[tuple[torch.Tensor, torch.Tensor, Plan]]:
    """Fixed (lq, gt, plan) triples (1 x 3 x H x W) of the held-out images, ground-truth plans."""
    from fapecli.training.degrade import degrade

    tasks = [get_task(d).name for d, v in cfg.mix.items() if v > 0]
    out = []
    clean_i = 0
    for item in items:
        gt = _centre(item.gt, cfg.val_crop)
        h, w = (gt.shape[0] // multiple) * multiple, (gt.shape[1] // multiple) * multiple
        gt = gt[:h, :w]
        if item.lq is None:
            task = tasks[clean_i % len(tasks)]
            d = degrade(gt.astype(np.float32) / 255.0, task, seed=VAL_SEED + clean_i,
                        keep_size=True)
            clean_i += 1
            names, scale = _steps_tasks(d.params)
            lq, plan = d.image, truth_plan(names, scale)
        else:
            lq = _centre(item.lq, cfg.val_crop)[:h, :w]
            plan = truth_plan([item.task] if item.task else [], item.scale)
        out.append((to_tensor(lq)[None], to_tensor(gt)[None], plan))
    return out


# ------------------------------------------------------------------------------ loading
class StepBatchSampler(Sampler[list[int]]):
    """Sample indices of steps ``start, start + 1, ...``: rank ``r`` of ``world`` gets its slice."""

    def __init__(self, batch_size: int, start_step: int = 0, rank: int = 0,
                 world: int = 1, steps: int | None = None) -> None:
        self.b, self.start, self.rank, self.world, self.steps = (
            batch_size, start_step, rank, world, steps)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while self.steps is None or step < self.steps:
            base = (step * self.world + self.rank) * self.b
            yield list(range(base, base + self.b))
            step += 1

    def __len__(self) -> int:
        return 2**62 if self.steps is None else max(0, self.steps - self.start)

    def state_dict(self) -> dict[str, int]:
        return {"batch_size": self.b, "start_step": self.start, "world": self.world}


def collate(batch: list[tuple[torch.Tensor, torch.Tensor, Plan]],
            ) -> tuple[torch.Tensor, torch.Tensor, list[Plan]]:
    lq, gt, plans = zip(*batch, strict=True)
    return torch.stack(lq), torch.stack(gt), list(plans)


def _worker_init(worker_id: int) -> None:
    cv2.setNumThreads(1)  # workers are the parallelism; keep OpenCV from oversubscribing


def make_loader(ds: TrainSet, cfg: DataConfig, *, start_step: int, steps: int, rank: int = 0,
                world: int = 1) -> DataLoader:
    """An in-order loader of the batches of steps ``start_step .. steps - 1`` for this rank."""
    sampler = StepBatchSampler(cfg.batch_size, start_step, rank, world, steps)
    # an own generator, so creating the iterator does not draw from the global torch RNG
    gen = torch.Generator().manual_seed(ds.seed)
    return DataLoader(ds, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
                      generator=gen,
                      worker_init_fn=_worker_init if cfg.workers else None,
                      # spawn, not fork: a forked child inherits OpenCV's thread pool in
                      # whatever state the parent left it and can deadlock on its first use
                      multiprocessing_context="spawn" if cfg.workers else None,
                      persistent_workers=False, prefetch_factor=4 if cfg.workers else None)
