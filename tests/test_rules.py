"""The rule planner: decisions on synthesised degradations and the Plan it writes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fapecli.planning.features import FeaturePool, extract_features
from fapecli.planning.plan import Plan
from fapecli.planning.rules import plan_from_features, plan_image, sr_scale
from fapecli.tasks import NONE, TASKS

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return np.ascontiguousarray(skimage_data.coffee(), dtype=np.float32) / 255.0


def _noisy(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0, sigma / 255, image.shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def plans(coffee: np.ndarray) -> dict[str, Plan]:
    from fapecli.training.degrade import degrade

    return {
        "clean": plan_image(coffee),
        "noise": plan_image(_noisy(coffee, 25)),
        "haze": plan_image(degrade(coffee, "haze", seed=0, severity="severe").image),
        "dark": plan_image(np.clip(coffee * 0.1, 0, 1) ** 1.2),
        "tiny": plan_image(coffee[::5, ::5]),
    }


@pytest.mark.parametrize(("case", "task", "band"), [
    ("clean", NONE, NONE),
    ("noise", "denoise", "high"),
    ("haze", "dehaze", "low"),
    ("dark", "lowlight", "low"),
    ("tiny", "sr", "high"),
])
def test_decisions(plans: dict[str, Plan], case: str, task: str, band: str) -> None:
    plan = plans[case]
    assert (plan.task, plan.band) == (task, band), plan.rationale
    assert plan.source == "rules"
    assert plan.features and set(plan.scores) == {t.name for t in TASKS}
    assert task not in plan.secondary


def test_sr_plan_guesses_a_scale(plans: dict[str, Plan]) -> None:
    assert plans["tiny"].scale == 4
    assert plans["noise"].scale is None
    assert sr_scale((128, 128)) == 4
    assert sr_scale((300, 400)) == 3
    assert sr_scale((400, 600)) == 2


def test_rationale_cites_numbers(plans: dict[str, Plan]) -> None:
    for plan in plans.values():
        assert re.search(r"\d+\.\d+", plan.rationale), plan.rationale
    assert "noise sigma" in plans["noise"].rationale
    assert "mean luminance" in plans["dark"].rationale


def test_pipeline_names_no_task(plans: dict[str, Plan]) -> None:
    names = {n for t in TASKS for n in (t.name, t.token)}
    for plan in plans.values():
        assert plan.pipeline
        for step in plan.pipeline:
            words = set(re.split(r"[^a-z_]+", step.lower()))
            assert not words & names, step


def test_plan_round_trips_through_json_and_line(plans: dict[str, Plan]) -> None:
    for plan in plans.values():
        again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
        assert again == plan
        parsed = Plan.from_line(plan.to_line())
        assert (parsed.task, parsed.band, parsed.pipeline) == (plan.task, plan.band,
                                                                plan.pipeline)


def _pool(**scores: float) -> FeaturePool:
    base = extract_features(np.full((64, 64, 3), 0.5, np.float32))
    full = {t.name: 0.0 for t in TASKS} | scores
    return FeaturePool(base.raw, full, (600, 800))


def test_mixture_orders_secondary_tasks() -> None:
    plan = plan_from_features(_pool(dehaze=0.9, denoise=0.6, derain=0.75, deblur=0.4))
    assert plan.task == "dehaze"
    assert plan.secondary == ["derain", "denoise"]
    assert plan.tasks == ["dehaze", "derain", "denoise"]
    assert len(plan.pipeline) > 3  # the secondary tasks add their core steps


def test_darkness_dominates_a_mixture() -> None:
    plan = plan_from_features(_pool(lowlight=0.8, denoise=0.95))
    assert (plan.task, plan.secondary) == ("lowlight", ["denoise"])


def test_nothing_present_is_none() -> None:
    plan = plan_from_features(_pool(deblur=0.49))
    assert (plan.task, plan.band, plan.secondary, plan.scale) == (NONE, NONE, [], None)


def test_scale_override() -> None:
    assert plan_from_features(_pool(sr=0.9), scale=2).scale == 2
    assert plan_from_features(_pool(sr=0.9)).scale == 2  # 600 x 800 original
