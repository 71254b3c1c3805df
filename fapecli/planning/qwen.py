"""The Qwen2.5-VL planner (`fape plan --planner qwen`): ask a frozen vision-language model.

The model sees the image (resized to about `QwenPlannerConfig.max_pixels`, sides multiples
of 28), a universal instruction (one categorical answer in a fixed one-line format), the
expert rule (which band each impairment belongs to) and the feature pool rendered as short
hints. Its answer ``Task: ..., Focus: ..., Rationale: ..., Pipeline: a -> b`` is read by
`parse_answer`, a tolerant parser. An answer that cannot be read, names a task outside the
list or contradicts strong measured cues is re-asked once with a restricted choice; if that
fails too the rule planner's plan stands in (``Plan.fallback`` says why) and a
`PlannerWarning` is issued.

Weights load through `fapecli.loader.load_model` (kind ``"planner"`` in weights.toml, or any
folder holding a transformers ``qwen2_5_vl`` checkpoint) after the memory guard of
`fapecli.execution.memory` has checked that the device can hold them. transformers is
imported only when a model is loaded; ``trust_remote_code`` is never used.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fapecli.errors import FapeError, UsageError, WeightsError, first_line
from fapecli.loader import register_builder
from fapecli.planning import DEFAULT_QWEN_MODEL as DEFAULT_MODEL
from fapecli.planning.features import FeaturePool, extract_features
from fapecli.planning.plan import Plan
from fapecli.planning.rules import PRESENT, STEPS, plan_from_features, sr_scale
from fapecli.tasks import NONE, TASK_NAMES, band_of, get_task, normalize_task
from fapecli.weights import ModelEntry

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage

    from fapecli.io import Image

MODEL_TYPE = "qwen2_5_vl"  # config.json "model_type" of a Qwen2.5-VL checkpoint
PATCH_FACTOR = 28  # patch 14 x spatial merge 2: the processor works in 28 px cells


class PlannerWarning(UserWarning):
    """The language-model planner's answer was not usable; the rule plan was used instead."""


@dataclass
class QwenPlannerConfig:
    """How the planner asks: image size, generation settings, re-ask thresholds."""

    max_new_tokens: int = 128
    do_sample: bool = False  # greedy decoding by default (reproducible plans)
    temperature: float = 0.3  # only used when do_sample is True
    top_p: float = 0.9  # only used when do_sample is True
    max_pixels: int = 512 * 512  # image budget given to the vision tower
    hint_threshold: float = 0.3  # feature-pool scores shown as "present-ish" hints
    reask: bool = True  # one restricted re-ask before falling back to the rules
    strong_cue: float = 0.8  # a rule score this high for another task ...
    weak_cue: float = 0.2  # ... while the answered task scores below this: contradiction
    hidden: str = "answer"  # hidden states kept: "answer", "prompt" or "none"
    activation_gib: float = 1.0  # working memory on top of the weights (memory guard)

    def __post_init__(self) -> None:
        if self.hidden not in ("answer", "prompt", "none"):
            raise ValueError(f"hidden must be answer, prompt or none, not {self.hidden!r}")


# ------------------------------------------------------------------------------ prompts

SYSTEM_TEXT = (
    "You are the planning stage of an image restoration tool. You look at one photograph "
    "and decide which single restoration it needs most."
)

TOKENS: tuple[str, ...] = tuple(get_task(t).token for t in TASK_NAMES)

INSTRUCTION_TEXT = """\
Look at the photo and choose exactly one restoration task from this list:
{choices}.
How each impairment shows itself:
- rain: thin bright streaks that run in parallel in one direction across otherwise crisp edges;
- snow: scattered roundish white flecks of uneven size, bigger ones closer to the camera;
- haze: a milky, washed-out veil that thickens with distance and drains the colour;
- blur: the edges themselves are smeared or doubled and fine detail is gone everywhere;
- noise: speckled grain sitting on top of edges that are still sharp;
- low light: the whole frame is dark and most pixels crowd the shadow end of the histogram;
- low resolution: a small picture with blocky, jagged or aliased detail."""

EXPERT_RULE_TEXT = """\
Band rule: rain, snow, noise, blur and low resolution are fine-scale defects, so their \
Focus is high; haze and low light are smooth defects spread over the whole picture, so \
their Focus is low. A clean photo gets Task: none, Focus: none.
If several impairments are mixed, name only the dominant one, the one that damages the \
picture most (a very dark picture counts as low light first)."""

FORMAT_TEXT = """\
Reply with a single line and nothing else, exactly in this form:
Task: <task>, Focus: <high|low>, Rationale: <one short sentence naming what you see>, \
Pipeline: <step> -> <step> -> <step>
The pipeline lists two to four concrete processing steps in plain words; never write a \
task name in it."""

REASK_TEXT = """\
A previous answer could not be used ({reason}).
Answer again and choose the task only among: {choices}."""

# A phrase per cue, so the hints read as evidence rather than bare numbers.
CUE_TEXT = {
    "derain": "oriented bright streaks",
    "desnow": "small isolated bright blobs",
    "dehaze": "low-contrast veil (dark channel, saturation)",
    "deblur": "weak fine-scale edge energy",
    "denoise": "grain in flat regions",
    "lowlight": "low global luminance",
    "sr": "small native size or blockiness",
}


def _token(task: str) -> str:
    return NONE if task == NONE else get_task(task).token


def render_hints(pool: FeaturePool, threshold: float = 0.3) -> list[str]:
    """The feature pool as short lines: cues at or above ``threshold``, strongest first."""
    ranked = sorted(pool.scores.items(), key=lambda kv: -kv[1])
    lines = [f"{_token(t)}: {s:.2f} ({CUE_TEXT.get(t, t)})" for t, s in ranked if s >= threshold]
    h, w = pool.size
    if not lines:
        top, score = ranked[0] if ranked else (NONE, 0.0)
        lines.append(f"no cue reaches {threshold:.2f} (strongest {_token(top)} at {score:.2f}); "
                     "the photo may be clean")
    lines.append(f"native size: {w}x{h} px")
    return lines


def build_prompt(
    pool: FeaturePool,
    *,
    choices: list[str] | None = None,
    reason: str | None = None,
    hint_threshold: float = 0.3,
) -> str:
    """The user text: instruction, expert rule, hints, format (and the re-ask restriction)."""
    allowed = ", ".join(TOKENS) + ", or none when the photo is already clean"
    parts = [INSTRUCTION_TEXT.format(choices=allowed), EXPERT_RULE_TEXT]
    hints = render_hints(pool, hint_threshold)
    parts.append("Measured cues (evidence from 0 to 1; a hint, not a verdict):\n"
                 + "\n".join(f"- {h}" for h in hints))
    if choices:
        parts.append(REASK_TEXT.format(reason=reason or "it was unclear",
                                       choices=", ".join(_token(c) for c in choices)))
    parts.append(FORMAT_TEXT)
    return "\n\n".join(parts)


def planner_image(rgb: np.ndarray, max_pixels: int = 512 * 512,
                  factor: int = PATCH_FACTOR) -> PILImage.Image:
    """``rgb`` (float in [0, 1] or uint8) as a PIL image of at most ``max_pixels`` pixels,
    aspect kept, both sides multiples of ``factor`` (never upscaled beyond one cell)."""
    from PIL import Image as PILImage

    a = np.asarray(rgb)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    a = a[..., :3]
    if a.dtype != np.uint8:
        scale = 65535.0 if a.dtype == np.uint16 else 1.0
        a = (np.clip(a.astype(np.float32) / scale, 0, 1) * 255 + 0.5).astype(np.uint8)
    h, w = a.shape[:2]
    s = min(1.0, math.sqrt(max_pixels / float(h * w)))
    nh = max(factor, round(h * s / factor) * factor)
    nw = max(factor, round(w * s / factor) * factor)
    if nh * nw > max_pixels:  # rounding up overshot the budget: round both sides down
        nh = max(factor, math.floor(h * s / factor) * factor)
        nw = max(factor, math.floor(w * s / factor) * factor)
    img = PILImage.fromarray(np.ascontiguousarray(a))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), PILImage.Resampling.BICUBIC)
    return img


# ------------------------------------------------------------------------------- parser

# Alternative names a model may write for a task, as regular expressions (lower case).
_SYNONYMS: tuple[tuple[str, str], ...] = (
    (NONE, r"none|clean|nothing|no[ _-]?(?:restoration|degradation|impairment|defect)s?"),
    ("lowlight", r"light[ _-]?enhance\w*|low[ _-]?light(?:[ _-]?enhance\w*)?|lowlight"
                 r"|exposure[ _-]?correction|brighten\w*|under-?expos\w*|dark(?:ness)?"),
    ("sr", r"super[ _-]?resol\w*|sr|upscal\w*|up-?sampl\w*|low[ _-]?res(?:olution)?"
           r"|resolution[ _-]?enhance\w*"),
    ("derain", r"de-?rain\w*|rain[ _-]?(?:streak[ _-]?)?removal|rain\w*"),
    ("desnow", r"de-?snow\w*|snow[ _-]?removal|snow\w*"),
    ("dehaze", r"de-?haz\w*|haze[ _-]?removal|de-?fog\w*|haz[ey]\w*|fog\w*"),
    ("deblur", r"de-?blur\w*|blur[ _-]?removal|motion[ _-]?deblur\w*|blur\w*|sharpen\w*"),
    ("denoise", r"de-?nois\w*|noise[ _-]?(?:removal|reduction)|nois[ey]\w*|grain\w*"),
)
_FIELDS = {"task": "task", "focus": "focus", "band": "focus", "frequency": "focus",
           "rationale": "rationale", "reason": "rationale", "pipeline": "pipeline",
           "steps": "pipeline", "plan": "pipeline"}
_FIELD_RE = re.compile(r"(?<![a-z])(" + "|".join(_FIELDS) + r")\s*[:=]", re.IGNORECASE)
_ARROW_RE = re.compile(r"\s*(?:-+>|–+>|—+>|=+>|→|⟶|⇒|➔|➜|➝|»|>)\s*")
_NUMBERING_RE = re.compile(r"^\s*(?:step\s*\d+\s*[:.)-]?|\d+\s*[.):]|[-*•])\s*", re.IGNORECASE)


@dataclass
class ParsedAnswer:
    """A readable answer: the plan tuple plus how much of it the model actually gave."""

    task: str  # canonical task name or "none"
    band: str  # "high", "low" or "none" (always the expert rule's band for the task)
    rationale: str
    pipeline: list[str]
    text: str  # the answer as given
    focus_given: bool = True  # False: Focus was missing or unreadable (band from the rule)
    focus_conflict: bool = False  # the model's Focus disagreed with the expert rule
    pipeline_given: bool = True  # False: the task's default pipeline was filled in
    ok: bool = True


@dataclass
class ParseFailure:
    """An answer that could not be read, and why."""

    reason: str
    text: str
    ok: bool = False


def resolve_task(value: str) -> str | None:
    """A canonical task name (or "none") for a model's task word or phrase, else None.

    Exact names, tokens and aliases first; then the earliest synonym found in the phrase.
    """
    v = re.sub(r"[*_`'\"\[\]<>]+", " ", value.lower()).strip(" .,:;!-")
    try:
        return normalize_task(v.replace(" ", "_"))
    except KeyError:
        pass
    best: tuple[int, str] | None = None
    for task, pattern in _SYNONYMS:
        m = re.search(rf"(?<![a-z])(?:{pattern})(?![a-z])", v)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), task)
    return best[1] if best else None


def _clean(text: str) -> str:
    """Drop markdown emphasis and code fences, keep the words."""
    text = text.replace("**", "").replace("__", "").replace("`", "")
    return re.sub(r"^\s*#+\s*", "", text, flags=re.MULTILINE)


def _fields(text: str) -> dict[str, str]:
    matches = list(_FIELD_RE.finditer(text))
    out: dict[str, str] = {}
    for i, m in enumerate(matches):
        key = _FIELDS[m.group(1).lower()]
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        if key not in out:
            out[key] = text[m.end():end]
    return out


def _first_line(value: str) -> str:
    lines = [ln.strip() for ln in value.strip().splitlines()]
    return lines[0] if lines else ""


def _pipeline(value: str) -> list[str]:
    value = value.strip()
    lines = [ln.strip() for ln in value.splitlines() if ln.strip()]
    if not lines:
        return []
    if len(lines) > 1 and all(_NUMBERING_RE.match(ln) for ln in lines[1:]):
        steps = lines  # a list, one step per line
    else:
        first = re.split(r"(?<=[a-z)])\.\s+(?=[A-Z])", lines[0])[0]  # drop chatter after it
        steps = _ARROW_RE.split(first)
        if len(steps) == 1:
            steps = re.split(r"\s*;\s*", first)
    out = []
    for s in steps:
        s = _NUMBERING_RE.sub("", s).strip().strip(",;.").strip()
        if s:
            out.append(s)
    return out


def parse_answer(text: str) -> ParsedAnswer | ParseFailure:
    """Read ``Task: ..., Focus: high|low, Rationale: ..., Pipeline: a -> b`` tolerantly.

    Case-insensitive; ignores text around the line, markdown emphasis, field order; accepts
    ``->``, ``→``, ``=>`` or ``>`` between steps and synonyms of the task names. A missing
    Focus takes the expert rule's band (and so does a Focus that contradicts the rule); a
    missing Pipeline takes the task's default steps. Without a readable task it fails.
    """
    if not text or not text.strip():
        return ParseFailure("the answer is empty", text or "")
    fields = _fields(_clean(text))
    if "task" not in fields:
        return ParseFailure("no 'Task:' field", text)
    raw_task = re.split(r"[,;(\n]", fields["task"].strip(), maxsplit=1)[0].strip()
    task = resolve_task(raw_task)
    if task is None:
        return ParseFailure(f"task {raw_task[:40]!r} is not one of {', '.join(TOKENS)}", text)
    rule_band = band_of(task)
    focus = _first_line(fields.get("focus", "")).lower()
    m = re.search(r"(?<![a-z])(high|low|none|hf|lf)(?![a-z])", focus)
    given = {"hf": "high", "lf": "low"}.get(m.group(1), m.group(1)) if m else None
    pipeline = _pipeline(fields.get("pipeline", ""))
    rationale = " ".join(fields.get("rationale", "").split()).strip(" ,;")
    return ParsedAnswer(
        task=task,
        band=rule_band,
        rationale=rationale,
        pipeline=pipeline or list(STEPS[task]),
        text=text,
        focus_given=given is not None,
        focus_conflict=given is not None and given != rule_band,
        pipeline_given=bool(pipeline),
    )


def contradiction(task: str, scores: dict[str, float], *, strong: float = 0.8,
                  weak: float = 0.2) -> str | None:
    """Why ``task`` contradicts the measured cues (another task's score >= ``strong`` while
    the answered task's is < ``weak``; any strong cue contradicts "none"), else None."""
    others = {t: s for t, s in scores.items() if t != task}
    if not others:
        return None
    top = max(others, key=lambda t: others[t])
    mine = 0.0 if task == NONE else scores.get(task, 0.0)
    if others[top] >= strong and mine < weak:
        return (f"it answered {_token(task)} (evidence {mine:.2f}) while the measured cues "
                f"point to {_token(top)} ({others[top]:.2f})")
    return None


def restricted_choices(scores: dict[str, float], weak: float = 0.2) -> list[str]:
    """The re-ask's choice: up to three tasks with some evidence (at least two), strongest
    first, plus "none" when nothing is clearly present."""
    ranked = sorted(scores, key=lambda t: -scores[t])
    picks = [t for t in ranked if scores[t] >= weak][:3]
    for t in ranked:
        if len(picks) >= 2:
            break
        if t not in picks:
            picks.append(t)
    if not ranked or scores[ranked[0]] < PRESENT:
        picks.append(NONE)
    return picks


# ------------------------------------------------------------------------------ planner


@dataclass
class QwenPlanResult:
    """What the planner produced for one image."""

    plan: Plan  # source "qwen", or the rule plan (source "rules", fallback set)
    rules: Plan  # the rule planner's plan from the same feature pool (for comparisons)
    pool: FeaturePool
    answers: list[str] = field(default_factory=list)  # every raw answer, in order
    prompts: list[str] = field(default_factory=list)  # the user text of every question
    hidden: torch.Tensor | None = None  # last-layer states [tokens, hidden_size], or None
    warnings: list[str] = field(default_factory=list)

    @property
    def fell_back(self) -> bool:
        return self.plan.fallback is not None


class QwenPlanner:
    """A loaded Qwen2.5-VL model and processor that turn an image into a `Plan`."""

    def __init__(self, model: Any, processor: Any, *, name: str = "qwen",
                 config: QwenPlannerConfig | None = None) -> None:
        self.model = model
        self.processor = processor
        self.name = name
        self.config = config or QwenPlannerConfig()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "text_config", cfg).hidden_size)

    @classmethod
    def from_folder(cls, folder: str | Path, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None, name: str | None = None,
                    config: QwenPlannerConfig | None = None) -> QwenPlanner:
        """Load a transformers Qwen2.5-VL checkpoint folder after the memory guard."""
        import torch

        from fapecli.execution.memory import check_fits

        folder = Path(folder)
        name = name or folder.name
        config = config or QwenPlannerConfig()
        dtype = dtype or torch.float32
        check_fits(estimate_planner(folder, dtype, name=name,
                                    activation_gib=config.activation_gib), device)
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        try:
            processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                str(folder), dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"cannot load Qwen planner {name!r}: {first_line(exc)}",
                               folder) from None
        model.to(torch.device(device)).eval()
        return cls(model, processor, name=name, config=config)

    # -------------------------------------------------------------- one question
    def chat_text(self, prompt: str) -> str:
        """The full model input text (chat template when the processor has one)."""
        if getattr(self.processor, "chat_template", None):
            messages = [
                {"role": "system", "content": [{"type": "text", "text": SYSTEM_TEXT}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
            ]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
        return (f"<|im_start|>system\n{SYSTEM_TEXT}<|im_end|>\n<|im_start|>user\n"
                f"<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
                f"<|im_start|>assistant\n")

    def generate(self, image: PILImage.Image, prompt: str) -> tuple[str, torch.Tensor | None]:
        """Ask once: the decoded answer and the last-layer hidden states it asked for."""
        import torch

        cfg = self.config
        inputs = self.processor(text=[self.chat_text(prompt)], images=[image],
                                return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        gen: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample}
        if cfg.do_sample:
            gen.update(temperature=cfg.temperature, top_p=cfg.top_p)
        else:
            gen.update(temperature=None, top_p=None, top_k=None)
        tok = getattr(self.processor, "tokenizer", None)
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(tok, "eos_token_id", None)
        if pad is not None:
            gen["pad_token_id"] = pad
        caught: list[torch.Tensor] = []
        norm = _final_norm(self.model) if cfg.hidden != "none" else None
        handle = (norm.register_forward_hook(lambda _m, _i, out: caught.append(out.detach()))
                  if norm is not None else None)
        try:
            with torch.inference_mode():
                out = self.model.generate(**inputs, **gen)
        except torch.OutOfMemoryError:
            raise FapeError(f"Qwen planner {self.name!r} ran out of memory on {self.device} "
                            "(use a GPU with more memory or a smaller max_pixels)") from None
        finally:
            if handle is not None:
                handle.remove()
        new = out[0, inputs["input_ids"].shape[1]:]
        answer = self.processor.batch_decode(new[None], skip_special_tokens=True)[0].strip()
        return answer, _hidden_states(caught, cfg.hidden, len(new))

    # -------------------------------------------------------------- one image
    def run(self, image: Image | np.ndarray | str | Path, *, warn: bool = True) -> QwenPlanResult:
        """Plan one image; ``warn`` issues a `PlannerWarning` when the rules stand in."""
        rgb, size = _pixels(image)
        cfg = self.config
        pool = extract_features(rgb, size=size)
        rules = plan_from_features(pool)
        picture = planner_image(rgb, cfg.max_pixels)
        result = QwenPlanResult(plan=rules, rules=rules, pool=pool)

        prompt = build_prompt(pool, hint_threshold=cfg.hint_threshold)
        answer, hidden = self.generate(picture, prompt)
        result.prompts.append(prompt)
        result.answers.append(answer)
        verdict = self.judge(answer, pool.scores)
        reasons = [f"answer 1: {verdict}"] if isinstance(verdict, str) else []
        if isinstance(verdict, str) and cfg.reask:
            choices = restricted_choices(pool.scores, cfg.weak_cue)
            prompt = build_prompt(pool, choices=choices, reason=verdict,
                                  hint_threshold=cfg.hint_threshold)
            answer, hidden = self.generate(picture, prompt)
            result.prompts.append(prompt)
            result.answers.append(answer)
            verdict = self.judge(answer, pool.scores, allowed=choices)
            if isinstance(verdict, str):
                limited = ", ".join(_token(c) for c in choices)
                reasons.append(f"answer 2 (choice limited to {limited}): {verdict}")
        if isinstance(verdict, ParsedAnswer):
            result.plan = plan_from_answer(verdict, pool)
            result.hidden = hidden
            return result
        why = "; ".join(reasons)
        result.plan = replace(rules, raw=answer, fallback=f"qwen answer unusable ({why})")
        message = f"{self.name}: no usable answer ({why}); using the rule planner's plan"
        result.warnings.append(message)
        if warn:
            warnings.warn(message, PlannerWarning, stacklevel=2)
        return result

    def judge(self, answer: str, scores: dict[str, float],
              allowed: list[str] | None = None) -> ParsedAnswer | str:
        """The parsed answer when it can be used, else the reason it cannot."""
        parsed = parse_answer(answer)
        if isinstance(parsed, ParseFailure):
            return parsed.reason
        if allowed is not None and parsed.task not in allowed:
            return f"it answered {_token(parsed.task)}, outside the offered choice"
        why = contradiction(parsed.task, scores, strong=self.config.strong_cue,
                            weak=self.config.weak_cue)
        return why if why else parsed

    def plan(self, image: Image | np.ndarray | str | Path) -> Plan:
        return self.run(image).plan


def plan_from_answer(answer: ParsedAnswer, pool: FeaturePool) -> Plan:
    """The plan of an accepted answer; further tasks present in the pool become secondary."""
    scores = dict(pool.scores)
    task = answer.task
    secondary = ([] if task == NONE else
                 sorted((t for t, s in scores.items() if s >= PRESENT and t != task),
                        key=lambda t: -scores[t]))
    sr_used = task == "sr" or "sr" in secondary
    return Plan(
        task=task,
        band=answer.band,
        pipeline=list(answer.pipeline),
        rationale=answer.rationale,
        scores=scores,
        secondary=secondary,
        features=dict(pool.raw),
        source="qwen",
        raw=answer.text,
        scale=sr_scale(pool.size) if sr_used else None,
    )


def _pixels(image: Image | np.ndarray | str | Path) -> tuple[np.ndarray, tuple[int, int] | None]:
    from fapecli.io import Image, read_image

    if isinstance(image, (str, Path)):
        image = read_image(image)
    if isinstance(image, Image):
        return image.rgb, (image.height, image.width)
    return np.asarray(image), None


def _final_norm(model: Any) -> Any:
    """The language model's final norm (its output is the last-layer hidden state)."""
    for path in ("model.language_model.norm", "language_model.norm", "model.norm"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def _hidden_states(caught: list, mode: str, n_new: int) -> torch.Tensor | None:
    """``[tokens, hidden]`` from the hooked norm outputs of one generate call.

    The first call holds the prompt; each later one the state of one new token. "answer"
    keeps the states that emitted the answer tokens (the prompt's last position, then every
    generated token but the last), "prompt" the whole prompt.
    """
    import torch

    if mode == "none" or not caught:
        return None
    first = caught[0][0]
    if mode == "prompt":
        return first
    steps = [first[-1:]] + [c[0, -1:] for c in caught[1:]]
    return torch.cat(steps)[: max(n_new, 1)]


# ------------------------------------------------------------------- memory and loading


def estimate_planner(folder: str | Path, dtype: torch.dtype, *, name: str = "qwen",
                     activation_gib: float = 1.0) -> Any:
    """The memory `Estimate` of a Qwen2.5-VL folder: parameters from the safetensors headers,
    or (without weights) from a meta-device model built from config.json."""
    from fapecli.execution.memory import GIB, Estimate, folder_params

    folder = Path(folder)
    try:
        params = folder_params(folder, _MetaQwen)
    except FileNotFoundError:
        raise WeightsError(f"Qwen planner {name!r} needs config.json, which was not found",
                           folder) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"Qwen planner {name!r}: unreadable config.json ({exc})",
                           folder) from None
    return Estimate(name, params, dtype, activation_gib * GIB)


class _MetaQwen:
    """Adapter for `memory.folder_params`: builds the model class from a config dict."""

    @staticmethod
    def from_config(config: dict) -> Any:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig.from_dict(config))


@register_builder("planner")
def build_planner(entry: ModelEntry, files: dict[str, Path], device: torch.device,
                  dtype: torch.dtype) -> QwenPlanner:
    """A Qwen2.5-VL planner from a weights.toml entry (all its files in one folder) or a path."""
    if "" in files:
        folder = files[""] if files[""].is_dir() else files[""].parent
    else:
        if "config.json" not in files:
            raise WeightsError(f"planner {entry.name!r} lists no config.json in weights.toml")
        folder = files["config.json"].parent
        apart = [rel for rel, p in files.items() if p.resolve() != (folder / rel).resolve()]
        if apart:
            raise WeightsError(f"planner {entry.name!r}: {apart[0]} was found outside "
                               f"{folder}; keep all of the model's files in one folder")
    return QwenPlanner.from_folder(folder, device=device, dtype=dtype, name=entry.name)


def load_planner(name: str | Path = DEFAULT_MODEL, *, device: str | torch.device | None = "auto",
                 precision: str | torch.dtype | None = "auto") -> QwenPlanner:
    """The Qwen planner ``name`` (weights.toml entry or folder) through the shared loader."""
    from fapecli.loader import load_model

    model = load_model(name, device=device, precision=precision)
    if not isinstance(model, QwenPlanner):
        raise UsageError(f"--planner-model {name}: not a Qwen2.5-VL planner "
                         f"(a folder with a {MODEL_TYPE} config.json, or a 'planner' model)")
    return model


__all__ = [
    "DEFAULT_MODEL", "ParseFailure", "ParsedAnswer", "PlannerWarning", "QwenPlanResult",
    "QwenPlanner", "QwenPlannerConfig", "build_prompt", "contradiction", "estimate_planner",
    "load_planner", "parse_answer", "planner_image", "render_hints", "resolve_task",
    "restricted_choices",
]
