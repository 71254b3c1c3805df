"""The rule planner: the FAPE-IR expert rule applied to the feature pool directly.

Each task's evidence score comes from `fapecli.planning.features`. The rule:

1. A task is present when its score reaches ``PRESENT`` (0.5); none present -> "none".
2. The dominant task is the present one with the highest score (to two decimals; ties go to
   the more specific cue, `RELIABILITY`), except that a globally dark
   picture (low-light evidence at ``DOMINANT_LOWLIGHT`` or more) is treated as low light
   first (darkness amplifies every other impairment and hides the others' cues), and that
   when both bright-spot cues fire, `rain_over_snow` decides (long streak pieces: rain;
   many isolated bright blobs: snow).
3. The band follows the task (`fapecli.tasks.band_of`: streaks, flakes, grain, smear and
   missing resolution are high-frequency work; veil and exposure are low-frequency).
4. The other present tasks, strongest first, are the secondary ones (a mixture).
5. The pipeline lists plain-language steps (never task names) for the dominant task, then
   the core step of each secondary one; the rationale cites the measured numbers.
"""

from __future__ import annotations

import math

import numpy as np

from fapecli.planning.features import FeaturePool, extract_features, rain_scores
from fapecli.planning.plan import Plan
from fapecli.tasks import NONE, band_of

PRESENT = 0.5  # evidence score from which a task counts as present
DOMINANT_LOWLIGHT = 0.7  # low-light evidence that makes low light dominant in a mixture
# Tie-break between saturated scores, most specific cue first: a smeared or noisy picture
# can show streak- or blob-like structure, the reverse hardly happens.
RELIABILITY = ("lowlight", "denoise", "sr", "deblur", "dehaze", "derain", "desnow")
RAIN_STREAK_LENGTH = 14.0  # px at the working scale: the streak length where rain = snow

STEPS: dict[str, list[str]] = {
    "derain": ["estimate streak orientation", "suppress oriented bright high-frequency streaks",
               "restore edges and texture under the streaks"],
    "desnow": ["locate small bright flakes", "fill flake regions from their surroundings",
               "restore fine texture"],
    "dehaze": ["estimate airlight and transmission", "remove the veil and restore contrast",
               "recover colour saturation and tone"],
    "deblur": ["estimate smear direction and extent", "sharpen smeared edges",
               "suppress ringing"],
    "denoise": ["estimate grain level", "suppress random grain in flat regions",
                "keep edges and fine texture"],
    "lowlight": ["lift exposure with a smooth tone curve", "suppress amplified sensor grain",
                 "restore natural colour"],
    "sr": ["upscale by the planned factor", "reconstruct fine texture and sharp edges",
           "suppress aliasing and compression blocks"],
    NONE: ["pass the image through unchanged"],
}
CORE_STEP: dict[str, str] = {task: steps[1] for task, steps in STEPS.items() if task != NONE}


def sr_scale(size: tuple[int, int]) -> int:
    """The upscaling factor for a picture of ``size``: 4 for tiny, 3 or 2 for larger ones.

    The smallest of 2 and 3 that brings the long side to 1024 px, else 4.
    """
    long_side = max(size)
    for factor in (2, 3):
        if long_side * factor >= 1024:
            return factor
    return 4


def rain_over_snow(raw: dict[str, float]) -> float:
    """Positive when the bright spots look like rain rather than snow.

    Long streak pieces (3 ln(length / RAIN_STREAK_LENGTH)) and a dense bright-line layer
    (0.36 x line excess in %) favour rain; isolated bright blobs on flat background
    (3 x excess per 10^5 flat px, in thousands) favour snow. Weights fitted on synthetic
    rain and snow of training photos.
    """
    length = max(raw.get("rain.length", 0.0), 1.0)
    return (3 * math.log(length / RAIN_STREAK_LENGTH) + 0.36 * raw.get("rain.excess", 0.0)
            - 3 * raw.get("snow.flat_excess", 0.0) / 1000 + 0.1)


def _dominant(scores: dict[str, float], raw: dict[str, float]) -> str:
    present = {t: s for t, s in scores.items() if s >= PRESENT}
    if not present:
        return NONE
    if scores.get("lowlight", 0.0) >= DOMINANT_LOWLIGHT:
        return "lowlight"
    if "derain" in present and "desnow" in present:
        drop = "desnow" if rain_over_snow(raw) > 0 else "derain"
        del present[drop]  # stays a secondary task
    return max(present, key=lambda t: (round(present[t], 2), -RELIABILITY.index(t)))


def _why(task: str, f: dict[str, float]) -> str:
    """The measured cue of one task, as a phrase with numbers."""
    if task == "derain":
        sparse, dense = rain_scores(f)
        if dense > sparse:
            return (f"dense parallel streaks (coherent line density {f['rain.dense']:.1f} at "
                    f"{f['rain.dense_angle']:.0f}°)")
        return (f"strong oriented bright streaks (line excess {f['rain.excess']:.1f} % of "
                f"pixels at {f['rain.angle']:.0f}°, dominant in {f['rain.tiles']:.0%} of "
                f"tiles, pieces {f['rain.length']:.0f} px long)")
    if task == "desnow":
        return (f"many small isolated bright blobs ({f['snow.evidence']:.0f} more bright than "
                f"dark per 10^5 px, {f['snow.white']:.0%} of them white)")
    if task == "dehaze":
        return (f"a milky low-contrast veil (haze index {f['haze.index']:.2f}: dark channel "
                f"{f['haze.dark_channel_norm']:.2f} of airlight {f['haze.airlight']:.2f}, "
                f"saturation {f['haze.saturation']:.2f}, local contrast "
                f"{f['haze.local_contrast']:.2f})")
    if task == "deblur":
        return (f"smeared edges (fine/coarse band energy {f['blur.fine_ratio']:.2f} along "
                f"{f['blur.direction']:.0f}°, sharp photos above 0.3)")
    if task == "denoise":
        return (f"grain on intact edges (noise sigma {f['noise.sigma']:.1f}/255, luma "
                f"{f['noise.sigma_luma']:.1f}, chroma {f['noise.sigma_chroma']:.1f})")
    if task == "lowlight":
        return (f"a globally dark exposure (mean luminance {f['light.mean']:.2f}, "
                f"99th percentile {f['light.p99']:.2f})")
    if task == "sr":
        return (f"a small native size ({f['size.width']:.0f}x{f['size.height']:.0f} px, "
                f"JPEG blockiness {f['sr.blockiness']:.2f})")
    raise KeyError(task)


def _rationale(task: str, secondary: list[str], pool: FeaturePool) -> str:
    f = pool.raw
    if task == NONE:
        top = max(pool.scores, key=lambda t: pool.scores[t])
        return (f"no impairment cue passes its threshold (strongest {top} at "
                f"{pool.scores[top]:.2f}): mean luminance {f['light.mean']:.2f}, noise sigma "
                f"{f['noise.sigma']:.1f}/255, fine/coarse band energy {f['blur.fine_ratio']:.2f}")
    text = _why(task, f)
    if secondary:
        text += "; also " + "; ".join(_why(t, f) for t in secondary)
    elif task not in ("deblur", "sr") and f["blur.fine_ratio"] >= 0.3:
        text += f" and otherwise sharp edges (fine/coarse band energy {f['blur.fine_ratio']:.2f})"
    return text


def _pipeline(task: str, secondary: list[str], scale: int | None) -> list[str]:
    steps = list(STEPS[task])
    if task == "sr" and scale:
        steps[0] = f"upscale by {scale}x"
    for t in secondary:
        step = f"upscale by {scale}x" if t == "sr" and scale else CORE_STEP[t]
        if step not in steps:
            steps.append(step)
    return steps


def plan_from_features(pool: FeaturePool, *, scale: int | None = None) -> Plan:
    """Apply the expert rule to a feature pool (``scale`` overrides the guessed SR factor)."""
    scores = dict(pool.scores)
    task = _dominant(scores, pool.raw)
    secondary = sorted((t for t, s in scores.items() if s >= PRESENT and t != task),
                       key=lambda t: -scores[t]) if task != NONE else []
    sr_used = task == "sr" or "sr" in secondary
    factor = (scale or sr_scale(pool.size)) if sr_used else None
    return Plan(
        task=task,
        band=band_of(task),
        pipeline=_pipeline(task, secondary, factor),
        rationale=_rationale(task, secondary, pool),
        scores=scores,
        secondary=secondary,
        features=dict(pool.raw),
        source="rules",
        scale=factor,
    )


def plan_image(rgb: np.ndarray, *, size: tuple[int, int] | None = None) -> Plan:
    """Extract the feature pool of one image and plan its restoration by the rule."""
    return plan_from_features(extract_features(rgb, size=size))
