"""The Qwen2.5-VL planner on a tiny, randomly initialised model built here (CPU, no download):
loading through the shared loader, the prompt, the answer parser, the re-ask and the fallback
to the rule planner, the CLI, and the memory guard."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fapecli.cli import app
from fapecli.loader import clear_cache, load_model
from fapecli.planning.qwen import (
    ParsedAnswer,
    ParseFailure,
    PlannerWarning,
    QwenPlanner,
    build_prompt,
    contradiction,
    parse_answer,
    planner_image,
    restricted_choices,
)

transformers = pytest.importorskip("transformers")

HIDDEN = 32
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
# No task word in the vocabulary: a random model can never write a readable answer.
WORDS = ["[UNK]", "the", "a", "photo", "is", "of", "and", "with", "to", "in", "on", ":", ",",
         ".", "->", "bright", "dark"]


def _tiny_qwen(folder: Path) -> Path:
    """Save a random Qwen2.5-VL (32-wide, 2 layers) with an in-memory tokenizer and processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vocab = {w: i for i, w in enumerate(WORDS)}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:],
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
    )
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                             "rope_theta": 10000.0},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=HIDDEN, fullatt_block_indexes=[1], window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture
def planner(tiny_folder: Path) -> QwenPlanner:
    clear_cache()
    model = load_model(tiny_folder, device="cpu")
    assert isinstance(model, QwenPlanner)
    model.config.max_new_tokens = 8
    return model


def _scripted(planner: QwenPlanner, monkeypatch, answers: list[str]) -> list[str]:
    """Make the planner answer ``answers`` in turn; returns the prompts it was asked."""
    asked: list[str] = []

    def fake(image, prompt):
        asked.append(prompt)
        return answers[len(asked) - 1], torch.zeros(3, HIDDEN)

    monkeypatch.setattr(planner, "generate", fake)
    return asked


def _dark(photo: np.ndarray) -> np.ndarray:
    return photo * 0.08  # low-light evidence 1.0, every other cue low


# ----------------------------------------------------------------------- (a) end to end


def test_random_model_falls_back_to_rules_with_a_warning(planner, photo) -> None:
    assert planner.device.type == "cpu" and planner.hidden_size == HIDDEN
    assert load_model(planner.name, device="cpu") is planner  # cached per (model, device, dtype)
    with pytest.warns(PlannerWarning, match="rule planner"):
        result = planner.run(photo)
    assert len(result.answers) == 2  # asked, re-asked with a restricted choice, gave up
    assert "choose the task only among" in result.prompts[1]
    plan = result.plan
    assert plan.source == "rules" and plan.fallback and "answer 2" in plan.fallback
    assert plan.raw == result.answers[-1] and result.hidden is None and result.fell_back
    assert plan.task == result.rules.task
    again = type(plan).from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.fallback == plan.fallback and again.raw == plan.raw


def test_library_plan_entry_point(tiny_folder, photo) -> None:
    from fapecli.planning import PLANNERS, plan

    assert "qwen" in PLANNERS
    clear_cache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = plan(photo, planner="qwen", model=tiny_folder, device="cpu")
    assert p.fallback and any(issubclass(w.category, PlannerWarning) for w in caught)


def test_well_formed_answer_is_kept(planner, photo, monkeypatch) -> None:
    answer = ("Sure. Task: deraining, Focus: high, Rationale: thin parallel streaks, "
              "Pipeline: find streak direction -> remove streaks -> restore edges")
    asked = _scripted(planner, monkeypatch, [answer])
    result = planner.run(photo)
    plan = result.plan
    assert len(asked) == 1 and plan.source == "qwen" and plan.raw == answer
    assert (plan.task, plan.band) == ("derain", "high") and plan.fallback is None
    assert plan.pipeline == ["find streak direction", "remove streaks", "restore edges"]
    assert result.hidden.shape == (3, HIDDEN)
    assert plan.scores == result.rules.scores and plan.features  # the pool travels along
    prompt = asked[0]
    for token in ("deraining", "desnowing", "dehazing", "deblur", "denoise",
                  "light_enhancement", "super_resolution"):
        assert token in prompt
    assert "Focus is high" in prompt and "dominant" in prompt and "native size" in prompt


def test_real_generation_gives_hidden_states(planner, photo) -> None:
    image = planner_image(photo, planner.config.max_pixels)
    text, hidden = planner.generate(image, "the photo is dark")
    assert isinstance(text, str)
    assert hidden.dim() == 2 and hidden.shape[1] == HIDDEN and 1 <= hidden.shape[0] <= 8
    planner.config.hidden = "prompt"
    _, prompt_hidden = planner.generate(image, "the photo is dark")
    assert prompt_hidden.shape[0] > hidden.shape[0] and prompt_hidden.shape[1] == HIDDEN
    planner.config.hidden = "none"
    assert planner.generate(image, "the photo is dark")[1] is None
    planner.config.hidden = "answer"


def test_planner_image_is_bounded_in_28px_cells() -> None:
    big = planner_image(np.zeros((1080, 1920, 3), np.float32))
    assert big.width % 28 == 0 and big.height % 28 == 0
    assert big.width * big.height <= 512 * 512 and abs(big.width / big.height - 16 / 9) < 0.1
    small = planner_image(np.zeros((60, 90, 3), np.uint8))
    assert (small.width, small.height) == (84, 56)  # small stays small (a SR cue)


def test_manifest_entries_and_missing_files(tmp_path, monkeypatch) -> None:
    from fapecli.errors import WeightsError
    from fapecli.weights import get_model

    small, large = get_model("qwen2.5-vl-3b"), get_model("qwen2.5-vl-7b")
    assert small.kind == large.kind == "planner" and small.cache == "hf"
    assert small.hf_repo == "Qwen/Qwen2.5-VL-3B-Instruct" and "non-commercial" in small.licence
    assert large.licence == "Apache-2.0"
    assert {f.path for f in large.files} >= {"config.json", "model-00005-of-00005.safetensors"}
    clear_cache()
    with pytest.raises(WeightsError, match=r"needs config\.json.*put it at"):
        load_model("qwen2.5-vl-3b", device="cpu")


# ----------------------------------------------------------------------------- (b) parser

GOOD = [
    ("Task: deraining, Focus: high, Rationale: streaks, Pipeline: a -> b",
     "derain", "high", ["a", "b"]),
    ("task: DEHAZING, focus: LOW, rationale: milky veil, pipeline: lift veil → restore colour",
     "dehaze", "low", ["lift veil", "restore colour"]),
    ("**Task:** desnowing, **Focus:** high, **Rationale:** white flecks, **Pipeline:** "
     "find flakes => fill them", "desnow", "high", ["find flakes", "fill them"]),
    ("Here is my plan.\nTask: denoising, Focus: high, Rationale: grain, Pipeline: a > b > c\n"
     "Hope this helps!", "denoise", "high", ["a", "b", "c"]),
    ("Task: low-light enhancement, Focus: low, Rationale: dark, Pipeline: brighten -> denoise",
     "lowlight", "low", ["brighten", "denoise"]),
    ("Task: SR, Focus: high, Rationale: tiny picture, Pipeline: upscale x4 -> sharpen",
     "sr", "high", ["upscale x4", "sharpen"]),
    ("Task: derain, Rationale: streaks everywhere, Pipeline: remove streaks",
     "derain", "high", ["remove streaks"]),  # Focus missing: the expert rule's band
    ("Task: dehazing, Focus: high, Rationale: haze, Pipeline: remove veil",
     "dehaze", "low", ["remove veil"]),  # a Focus against the rule: the rule wins
    ("Task: deblur, Focus: high, Rationale: smeared edges",
     "deblur", "high", None),  # Pipeline missing: the task's default steps
    ("Task: none, Focus: none, Rationale: the photo is clean, Pipeline: keep it",
     "none", "none", ["keep it"]),
    ("Task: Super-Resolution (x4), Focus: High-frequency, Rationale: blocky, "
     "Pipeline: 1. upscale; 2. sharpen", "sr", "high", ["upscale", "sharpen"]),
    ("Task: light_enhancement\nFocus: low\nRationale: underexposed\nPipeline:\n"
     "1. lift shadows\n2. reduce grain", "lowlight", "low", ["lift shadows", "reduce grain"]),
    ("`Task: motion deblurring, Focus: high, Rationale: doubled edges, Pipeline: estimate "
     "kernel --> deconvolve`", "deblur", "high", ["estimate kernel", "deconvolve"]),
]
BAD = [
    ("", "empty"),
    ("I cannot tell what is wrong with this photo.", "no 'Task:' field"),
    ("Task: colourisation, Focus: low, Rationale: grey, Pipeline: add colour", "not one of"),
    ("Task: <task>, Focus: <high|low>, Rationale: <reason>, Pipeline: <step>", "not one of"),
]


@pytest.mark.parametrize(("text", "task", "band", "pipeline"), GOOD)
def test_parser_reads_well_formed_and_sloppy_answers(text, task, band, pipeline) -> None:
    from fapecli.planning.rules import STEPS

    parsed = parse_answer(text)
    assert isinstance(parsed, ParsedAnswer), parsed
    assert (parsed.task, parsed.band) == (task, band)
    assert parsed.pipeline == (pipeline if pipeline is not None else STEPS[task])
    assert parsed.pipeline_given == (pipeline is not None)
    assert parsed.rationale and "Pipeline" not in parsed.rationale


@pytest.mark.parametrize(("text", "reason"), BAD)
def test_parser_explains_what_it_cannot_read(text, reason) -> None:
    parsed = parse_answer(text)
    assert isinstance(parsed, ParseFailure) and not parsed.ok and reason in parsed.reason


def test_parser_flags_missing_and_conflicting_focus() -> None:
    missing = parse_answer("Task: derain, Rationale: streaks")
    conflict = parse_answer("Task: dehazing, Focus: high, Rationale: veil")
    assert not missing.focus_given and not missing.focus_conflict
    assert conflict.focus_given and conflict.focus_conflict and conflict.band == "low"


# ------------------------------------------------------------------------- (c) re-ask


def test_contradiction_and_restricted_choice() -> None:
    scores = {"derain": 0.05, "desnow": 0.0, "dehaze": 0.1, "deblur": 0.0, "denoise": 0.3,
              "lowlight": 0.95, "sr": 0.0}
    assert "light_enhancement" in contradiction("derain", scores)
    assert "light_enhancement" in contradiction("none", scores)
    assert contradiction("denoise", scores) is None  # some evidence of its own
    assert contradiction("lowlight", scores) is None
    assert restricted_choices(scores) == ["lowlight", "denoise"]
    assert restricted_choices(dict.fromkeys(scores, 0.0))[-1] == "none"


def test_reask_after_a_contradicted_answer(planner, photo, monkeypatch) -> None:
    first = "Task: deraining, Focus: high, Rationale: streaks, Pipeline: remove streaks"
    second = "Task: light_enhancement, Focus: low, Rationale: very dark, Pipeline: lift -> clean"
    asked = _scripted(planner, monkeypatch, [first, second])
    result = planner.run(_dark(photo))
    assert len(asked) == 2 and result.answers == [first, second]
    assert "choose the task only among: light_enhancement" in asked[1]
    assert "deraining (evidence" in asked[1]  # the reason is given back
    assert result.plan.source == "qwen" and result.plan.task == "lowlight"
    assert result.plan.raw == second and not result.warnings


def test_reask_outside_the_choice_falls_back(planner, photo, monkeypatch) -> None:
    bad = "Task: deraining, Focus: high, Rationale: streaks, Pipeline: remove streaks"
    _scripted(planner, monkeypatch, ["Task: colourise", bad])
    with pytest.warns(PlannerWarning):
        result = planner.run(_dark(photo))
    assert result.plan.source == "rules" and result.plan.task == "lowlight"
    assert "answer 1" in result.plan.fallback and "outside the offered choice" in (
        result.plan.fallback)


# ---------------------------------------------------------------------------- (d) CLI

runner = CliRunner()


@pytest.fixture
def photo_file(tmp_path, photo) -> Path:
    from fapecli.io import from_array, write_image

    path = tmp_path / "photo.png"
    write_image(from_array(photo), path)
    return path


def test_cli_plan_qwen_json(tiny_folder, photo_file) -> None:
    clear_cache()
    args = ["plan", str(photo_file), "--planner", "qwen", "--planner-model", str(tiny_folder),
            "--device", "cpu", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["input"] == str(photo_file) and record["plan"]["fallback"]
    assert record["plan"]["source"] == "rules" and "warning" in result.stderr


def test_cli_plan_both_json_line_and_table(tiny_folder, photo_file, monkeypatch) -> None:
    answer = "Task: deraining, Focus: high, Rationale: streaks, Pipeline: remove streaks"
    monkeypatch.setattr(QwenPlanner, "generate", lambda self, image, prompt: (answer, None))
    clear_cache()
    base = ["plan", str(photo_file), "--planner", "both", "--planner-model", str(tiny_folder),
            "--device", "cpu"]
    result = runner.invoke(app, [*base, "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip())
    assert record["plan"]["source"] == "qwen" and record["plan"]["raw"] == answer
    assert record["rules"]["source"] == "rules" and record["agree"] is False
    lined = runner.invoke(app, [*base, "--line"])
    path, qwen_line, rules_line = lined.stdout.strip().split("\t")
    assert path == str(photo_file)
    assert qwen_line.startswith("Task: deraining") and rules_line.startswith("Task: ")
    table = runner.invoke(app, base)
    assert table.exit_code == 0 and "qwen" in table.stdout and "derain (high)" in table.stdout


def test_cli_rejects_unknown_planner(photo_file) -> None:
    result = runner.invoke(app, ["plan", str(photo_file), "--planner", "gpt"])
    assert result.exit_code == 2 and "rules, qwen or both" in result.stderr


def test_cli_restore_takes_the_qwen_planner(tiny_folder, photo_file, tmp_path,
                                            monkeypatch) -> None:
    from fapecli.execution.compact import create_model

    answer = "Task: denoise, Focus: high, Rationale: grain, Pipeline: smooth grain"
    monkeypatch.setattr(QwenPlanner, "generate", lambda self, image, prompt: (answer, None))
    model_dir = create_model("fape-tiny").save_pretrained(tmp_path / "tiny-exec")
    clear_cache()
    base = ["restore", "--planner", "qwen", "--planner-model", str(tiny_folder),
            "--model", str(model_dir), "--device", "cpu"]
    result = runner.invoke(app, [*base, str(photo_file), "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["plan"]["source"] == "qwen" and record["plan"]["task"] == "denoise"
    assert (tmp_path / "out" / photo_file.name).is_file()
    # an image on stdin is planned from the same decoded pixels (read once)
    piped = runner.invoke(app, [*base, "-", "-o", "-"], input=photo_file.read_bytes())
    assert piped.exit_code == 0, piped.output
    assert piped.stdout_bytes[:8] == b"\x89PNG\r\n\x1a\n"


def test_library_restore_plans_with_a_loaded_qwen_planner(planner, photo,
                                                          monkeypatch) -> None:
    from fapecli.execution.compact import create_model
    from fapecli.io import from_array
    from fapecli.restore import restore_image

    answers = _scripted(planner, monkeypatch, ["not an answer", "still nothing"])
    restored = restore_image(from_array(photo), create_model("fape-tiny").eval(),
                             planner=planner)
    assert len(answers) == 2 and restored.plan.fallback is not None
    assert restored.warnings and "rule planner" in restored.warnings[0]


# ------------------------------------------------------------------- (e) memory guard


def test_memory_guard_refuses_a_7b_config_on_cpu(tmp_path, monkeypatch) -> None:
    from transformers import Qwen2_5_VLConfig

    from fapecli.execution.memory import MemoryGuardError

    monkeypatch.delenv("FAPE_ALLOW_LARGE_CPU", raising=False)
    Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                         num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                          "rope_theta": 1000000.0}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31]),
    ).save_pretrained(tmp_path)  # config.json only: no weights to load
    clear_cache()
    with pytest.raises(MemoryGuardError) as err:
        load_model(tmp_path, device="cpu")
    message = str(err.value)
    assert "8.29 B parameters" in message and "too many for the CPU" in message
    assert "GiB" in message and "FAPE_ALLOW_LARGE_CPU" in message


def test_prompt_lists_hints_strongest_first(photo) -> None:
    from fapecli.planning.features import extract_features

    pool = extract_features(_dark(photo))
    prompt = build_prompt(pool, choices=["lowlight", "none"], reason="unreadable")
    hints = prompt.split("Measured cues")[1]
    assert hints.index("light_enhancement: 1.00") < hints.index("native size: 256x256 px")
    assert "choose the task only among: light_enhancement, none" in prompt
