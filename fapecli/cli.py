"""The `fape` command line: parse, call the library, render (rich tables or JSON Lines).

Conventions (ripgrep/jq style): data on stdout, messages on stderr, exit 0 when everything
worked, 1 when some inputs failed (the batch goes on), 2 for usage errors, 130 on Ctrl-C.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape as markup_escape

from fapecli import __version__
from fapecli.console import Reporter
from fapecli.errors import FapeError, UsageError
from fapecli.planning.plan import Plan

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="fape",
    help="All-in-one image restoration: plan what is wrong with a photo, restore it, score it.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
weights_app = typer.Typer(
    help="List, verify, import and fetch the model files named in weights.toml; average models.",
    no_args_is_help=True,
)
app.add_typer(weights_app, name="weights")

# Options shared by every command, spelled the same everywhere.
Device = Annotated[
    str,
    typer.Option(
        "--device", help="Where to run: auto (CUDA when present), cpu, cuda, cuda:N, mps."
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only print errors (and data).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Print more details.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON Lines (one object per image).")]
Inputs = Annotated[
    list[str] | None,
    typer.Argument(
        help="Image files or folders (searched recursively); '-' reads an image from stdin; "
        "with no argument, a list of paths is read from stdin.",
        show_default=False,
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fape {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """All-in-one image restoration: plan, restore, score, train."""


def _handles_errors(fn: F) -> F:
    """Turn library errors into one-line messages and stable exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FapeError as exc:
            Reporter().error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            Reporter().error("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _collect_inputs(inputs: list[str] | None, report: Reporter) -> tuple[list, int]:
    """Expand files/folders (or a path list on stdin); report bad ones; return (items, failures)."""
    from fapecli.io import InputItem, discover_images, read_path_list

    if not inputs:
        if sys.stdin.isatty():
            raise UsageError("no input: name image files or folders, or pipe a list of paths")
        inputs = read_path_list(sys.stdin)
        if not inputs:
            raise UsageError("no input paths on stdin")
    if "-" in inputs:
        if len(inputs) > 1:
            raise UsageError("'-' (an image on stdin) cannot be mixed with other inputs")
        return [InputItem(Path("-"), Path("stdin.png"))], 0
    items, problems = discover_images(inputs)
    for path, message in problems:
        report.error(f"{path}: {message}")
    if not items and not problems:
        report.warn("no images found in the inputs")
    return items, len(problems)


def _exit_for(failures: int) -> None:
    if failures:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- plan


PlannerModel = Annotated[
    str,
    typer.Option(
        "--planner-model",
        help="Qwen planner: a weights.toml planner name (qwen2.5-vl-3b, qwen2.5-vl-7b) or a "
        "Qwen2.5-VL model folder.",
    ),
]


@app.command()
@_handles_errors
def plan(
    inputs: Inputs = None,
    json_out: Json = False,
    line: Annotated[
        bool,
        typer.Option("--line", help="Print the FAPE-IR one-line form 'Task: ..., Focus: ...'."),
    ] = False,
    planner: Annotated[
        str,
        typer.Option(
            "--planner",
            help="rules (feature pool + expert rule), qwen (Qwen2.5-VL, falls back to the rules "
            "when its answer is unusable) or both (side by side; with --json each record has "
            "'plan' from qwen and 'rules'; with --line the qwen and rules lines, tab-separated).",
        ),
    ] = "rules",
    planner_model: PlannerModel = "qwen2.5-vl-3b",
    device: Device = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Say what is wrong with each image, in which frequency band, and how to restore it."""
    from rich.markup import escape

    from fapecli.io import read_image
    from fapecli.planning import plan as make_plan

    if planner not in ("rules", "qwen", "both"):
        raise UsageError(f"--planner {planner!r}: use rules, qwen or both")
    report = Reporter(quiet=quiet, verbose=verbose)
    items, failures = _collect_inputs(inputs, report)
    qwen = None
    if planner != "rules" and items:
        from fapecli.planning.qwen import load_planner

        qwen = load_planner(planner_model, device=device)
    rows = []
    for item in report.track(items, len(items), "planning"):
        try:
            image = read_image(item.path)
            rules = None
            if qwen is None:
                result = make_plan(image, planner="rules")
            else:
                answer = qwen.run(image, warn=False)
                for message in answer.warnings:
                    report.warn(escape(f"{item.path}: {message}"))
                result, rules = answer.plan, (answer.rules if planner == "both" else None)
        except FapeError as exc:
            failures += 1
            report.error(str(exc))
            if json_out:
                report.json({"input": str(item.path), "error": str(exc)})
            continue
        if json_out:
            record = {"input": str(item.path), "plan": result.to_dict()}
            if rules is not None:
                record["rules"] = rules.to_dict()
                record["agree"] = result.task == rules.task
            report.json(record)
        elif line:
            extra = f"\t{rules.to_line()}" if rules is not None else ""
            report.line(f"{item.path}\t{result.to_line()}{extra}")
        else:
            rows.append((str(item.path), result, rules))
    if rows:
        from fapecli.render import plan_compare_table, plan_table

        if planner == "both":
            report.out.print(plan_compare_table(rows, verbose=verbose))
        else:
            report.out.print(plan_table([(p, r) for p, r, _ in rows], verbose=verbose))
    _exit_for(failures)


# --------------------------------------------------------------------------- degrade


@app.command()
@_handles_errors
def degrade(
    inputs: Inputs = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path(
        "degraded"
    ),
    task: Annotated[
        str,
        typer.Option(
            "--task",
            "-t",
            help="Degradation(s) to synthesise, comma-separated for a mixture: rain, snow, haze, "
            "blur, noise, lowlight, lowres (task names such as derain or sr work too).",
        ),
    ] = "noise",
    seed: Annotated[int, typer.Option("--seed", help="Random seed (per image: seed + index).")] = 0,
    severity: Annotated[
        float | None,
        typer.Option(
            "--severity", min=0.0, max=1.0, help="0 (mild) to 1 (severe); random when unset."
        ),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="Fix a parameter, e.g. noise.sigma=25 or lowres.scale=4 (repeatable).",
        ),
    ] = None,
    ext: Annotated[
        str | None,
        typer.Option("--ext", help="Output format (png, jpg, ...); default: the input's."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing outputs.")
    ] = False,
    json_out: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Synthesise degraded copies of clean images (with a JSON sidecar of the parameters)."""
    import json

    from fapecli.io import output_path, read_image, write_image
    from fapecli.tasks import get_task
    from fapecli.training.degrade import degrade as apply_degradation

    report = Reporter(quiet=quiet, verbose=verbose)
    try:
        kinds = [get_task(t).degradation for t in task.split(",") if t.strip()]
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None
    overrides = _parse_params(param or [])
    items, failures = _collect_inputs(inputs, report)
    for index, item in enumerate(report.track(items, len(items), "degrading")):
        target = output_path(item, output, ext=ext)
        if target.exists() and not overwrite:
            report.info(f"skip {target} (exists; --overwrite replaces it)")
            continue
        try:
            image = read_image(item.path)
            result = apply_degradation(
                image.rgb, kinds, seed=seed + index, severity=severity, **overrides
            )
            pixels = result.image if not image.is_grey else result.image.mean(axis=2, keepdims=True)
            written = write_image(image.with_pixels(pixels), target)
            sidecar = written.with_suffix(".json")
            params = {"input": str(item.path), "output": str(written), **result.params}
            _write_text_atomic(sidecar, json.dumps(params, indent=2) + "\n")
        except FapeError as exc:
            failures += 1
            report.error(str(exc))
            if json_out:
                report.json({"input": str(item.path), "error": str(exc)})
            continue
        if json_out:
            report.json(params)
        else:
            report.debug(f"{item.path} -> {written}")
    report.info(f"degraded {len(items) - failures} image(s) into {output}")
    _exit_for(failures)


def _parse_params(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``noise.sigma=25`` -> {"noise": {"sigma": 25.0}} (numbers, booleans or strings)."""
    from fapecli.tasks import get_task

    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        kind, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise UsageError(
                f"--param {pair!r}: expected DEGRADATION.NAME=VALUE, e.g. noise.sigma=25"
            )
        try:
            kind = get_task(kind).degradation
        except KeyError as exc:
            raise UsageError(f"--param {pair!r}: {exc.args[0]}") from None
        out.setdefault(kind, {})[name] = _parse_value(value)
    return out


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _write_text_atomic(path: Path, text: str) -> None:
    from fapecli.io import atomic_write

    atomic_write(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- not built yet


def _not_built(command: str) -> None:
    raise FapeError(f"`fape {command}` is not built yet in fape {__version__}")


EXTENSIONS = ("auto", "png", "jpg", "webp", "tif", "bmp")


@app.command()
@_handles_errors
def restore(
    inputs: Inputs = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output folder ('-' writes one image to stdout)."),
    ] = None,
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="Model name in weights.toml, or a checkpoint folder."),
    ] = "fape-s",
    executor: Annotated[
        str,
        typer.Option(
            "--executor",
            help="compact (fape-s family, CPU-friendly) or flux (FLUX.1 + trained adapters, "
            "GPU; --model defaults to fape-flux-adapters).",
        ),
    ] = "compact",
    planner: Annotated[
        str,
        typer.Option(
            "--planner",
            help="Who plans each image without --plan/--task: rules, or qwen (Qwen2.5-VL; the "
            "rule plan stands in when its answer is unusable).",
        ),
    ] = "rules",
    planner_model: PlannerModel = "qwen2.5-vl-3b",
    plan_file: Annotated[
        Path | None,
        typer.Option(
            "--plan", help="Reuse plans from `fape plan --json` (JSON Lines) instead of planning."
        ),
    ] = None,
    task: Annotated[
        str | None, typer.Option("--task", "-t", help="Force a task (derain, denoise, sr, ...).")
    ] = None,
    scale: Annotated[
        int | None, typer.Option("--scale", "-s", min=1, max=8, help="Upscale by this factor (SR).")
    ] = None,
    tile: Annotated[
        int | None,
        typer.Option("--tile", min=0, help="Tile size in pixels (0 or unset: automatic)."),
    ] = None,
    overlap: Annotated[int, typer.Option("--overlap", min=0, help="Tile overlap in pixels.")] = 32,
    ensemble: Annotated[
        bool,
        typer.Option(
            "--ensemble",
            help="Average the executor over 8 flips/rotations of each image (2 mirror images "
            "for rain, snow and haze): 2-8x slower, a little better.",
        ),
    ] = False,
    suffix: Annotated[str, typer.Option("--suffix", help="Added to output file names.")] = "",
    ext: Annotated[
        str,
        typer.Option("--ext", help="Output format: auto (as the input), png, jpg, webp, tif, bmp."),
    ] = "auto",
    quality: Annotated[
        int, typer.Option("--quality", min=1, max=100, help="JPEG/WebP quality.")
    ] = 95,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing outputs.")
    ] = False,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain", help="Also write NAME.routing.png: where the high-band expert won."
        ),
    ] = False,
    device: Device = "auto",
    precision: Annotated[
        str,
        typer.Option(
            "--precision", help="auto, fp32, bf16 or fp16 (auto: bf16 on GPU, fp32 on CPU)."
        ),
    ] = "auto",
    json_out: Json = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Restore images with the frequency-aware executor, planning each one first."""
    from fapecli.restore import load_executor, restore_file

    report = Reporter(quiet=quiet, verbose=verbose)
    if ext not in EXTENSIONS:
        raise UsageError(f"--ext {ext!r}: use one of {', '.join(EXTENSIONS)}")
    items, failures = _collect_inputs(inputs, report)
    to_stdout = str(output) == "-" or (output is None and items and items[0].is_stdin)
    if output is None and not to_stdout:
        raise UsageError("name an output folder with -o/--output (or '-o -' for stdout)")
    if to_stdout and (len(items) != 1 or json_out):
        raise UsageError(
            "'-o -' writes exactly one image to stdout (and cannot be mixed with --json)"
        )
    if planner not in ("rules", "qwen"):
        raise UsageError(f"--planner {planner!r}: use rules or qwen")
    plans = _read_plans(plan_file) if plan_file else {}
    net = load_executor(model, executor, device=device, precision=precision)
    chosen_planner: Any = "rules"
    if planner == "qwen" and task is None and items:
        from fapecli.planning.qwen import load_planner

        chosen_planner = load_planner(planner_model, device=device, precision=precision)
    report.debug(f"model {model} ({executor}) on {net.device} ({net.dtype})")
    jobs, failures = _restore_jobs(items, output, suffix, ext, to_stdout, report, failures)
    done = skipped = 0
    for item, target in report.track(jobs, len(jobs), "restoring"):
        if target is not None and target.exists() and not overwrite:
            skipped += 1
            report.debug(f"skip {target} (exists; --overwrite replaces it)")
            continue
        try:
            restored, written = restore_file(
                item.path,
                target if target is not None else "-",
                net,
                plan=_plan_for(item, plans),
                planner=chosen_planner,
                task=task,
                scale=scale,
                tile=tile or None,
                overlap=overlap,
                ensemble=ensemble,
                quality=quality,
                explain=explain,
            )
        except FapeError as exc:
            failures += 1
            report.error(str(exc))
            if json_out:
                report.json({"input": str(item.path), "error": str(exc)})
            continue
        done += 1
        for message in restored.warnings:
            report.warn(markup_escape(f"{item.path}: {message}"))
        record = {
            "input": str(item.path),
            "output": str(written),
            "plan": restored.plan.to_dict(),
            "seconds": round(restored.seconds, 4),
            "tiles": restored.tiles,
            "skipped": restored.skipped,
            "expert": restored.expert,
        }
        if explain:
            record["routing"] = restored.routing_summary.get("overall")
        if json_out:
            report.json(record)
        else:
            what = "clean, copied" if restored.skipped else restored.plan.task
            report.debug(f"{item.path} -> {written} ({what}, {restored.seconds:.2f}s)")
    report.info(f"restored {done}, skipped {skipped} existing, failed {failures}")
    _exit_for(failures)


def _restore_jobs(items, output, suffix, ext, to_stdout, report, failures):
    """Pair inputs with output paths; refuse collisions and outputs that are inputs."""
    from fapecli.io import output_path

    if to_stdout:
        return [(items[0], None)], failures
    jobs, seen = [], {}
    inputs = {item.path.resolve() for item in items if not item.is_stdin}
    for item in items:
        target = output_path(item, output, suffix=suffix, ext=None if ext == "auto" else ext)
        key = target.resolve()
        if key in inputs:
            failures += 1
            report.error(f"{item.path}: output {target} would overwrite an input (use --suffix)")
        elif key in seen:
            failures += 1
            report.error(f"{item.path}: output {target} is also the output of {seen[key]}")
        else:
            seen[key] = item.path
            jobs.append((item, target))
    return jobs, failures


def _read_plans(path: Path) -> dict[str, Plan]:
    """Plans from `fape plan --json` output, by input path (as written and resolved)."""
    import json

    from fapecli.planning.plan import Plan

    plans: dict[str, Plan] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read plans: {exc.strerror}", path) from None
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
            if "plan" not in record:
                continue  # an error record of `fape plan --json`
            plan = Plan.from_dict(record["plan"])
        except (ValueError, TypeError, KeyError) as exc:
            raise UsageError(f"line {number} is not a plan record ({exc})", path) from None
        plans[record["input"]] = plan
        plans[str(Path(record["input"]).resolve())] = plan
    return plans


def _plan_for(item, plans: dict[str, Plan]) -> Plan | None:
    if not plans:
        return None
    return plans.get(str(item.path)) or plans.get(str(item.path.resolve()))


@app.command()
@_handles_errors
def score(
    outputs: Annotated[
        list[str], typer.Argument(help="Restored images: files or folders.", show_default=False)
    ],
    ref: Annotated[
        list[str] | None,
        typer.Option("--ref", "-r", help="Reference images (files or folders); repeatable."),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            "-M",
            help="Comma-separated metrics, or fr / nr / all. Default: psnr,ssim,lpips,dists "
            "with --ref, niqe,musiq,maniqa,clipiqa,topiq_nr without.",
        ),
    ] = None,
    y_channel: Annotated[
        bool, typer.Option("--y-channel", help="PSNR/SSIM on the Y channel (BT.601), as FAPE-IR.")
    ] = False,
    crop_border: Annotated[
        int, typer.Option("--crop-border", min=0, help="Ignore this many border pixels (SR).")
    ] = 0,
    resize_ref: Annotated[
        bool, typer.Option("--resize-ref", help="Resize references to the output size.")
    ] = False,
    center_crop: Annotated[
        bool, typer.Option("--center-crop", help="Crop both images to their common size.")
    ] = False,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="Also write per-image scores to this CSV file.")
    ] = None,
    summary_only: Annotated[
        bool, typer.Option("--summary-only", help="Print only the per-metric summary.")
    ] = False,
    device: Device = "auto",
    json_out: Annotated[
        bool, typer.Option("--json", help="JSON Lines: one object per image, then a summary.")
    ] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Score restored images against references (full reference) or alone (no reference)."""
    from fapecli.scoring import metric_info
    from fapecli.scoring import score as compute

    report = Reporter(quiet=quiet, verbose=verbose)
    with report.progress(0 if quiet else 10**9, "scoring") as bar:

        def progress(done: int, total: int, name: str) -> None:
            if bar is not None:
                bar.update(bar.task_ids[0], completed=done, total=total)

        result = compute(
            outputs,
            ref,
            metrics=metrics,
            y_channel=y_channel,
            crop_border=crop_border,
            resize_ref=resize_ref,
            center_crop=center_crop,
            device=device,
            progress=progress,
        )
    failures = len(result.problems) + len(result.errors)
    for path, message in result.problems:
        report.error(f"{path}: {message}")
    for err in result.errors:
        report.error(f"{err.output}: {(err.metric + ': ') if err.metric else ''}{err.message}")
    asked = {m.strip().lower() for m in (metrics or "").split(",") if m.strip()}
    for name, reason in result.unavailable.items():
        report.warn(f"{name} unavailable: {reason}")
        failures += name in asked
    for path in result.unmatched_outputs:
        report.warn(f"{path}: no matching reference")
    for path in result.unmatched_refs:
        report.debug(f"{path}: reference without an output")
    for note in result.notes:
        report.debug(note)
    data = result.to_dict()
    if json_out:
        if not summary_only:
            for row in data["images"]:
                report.json({"type": "image", **row})
        summary = {k: v for k, v in data.items() if k != "images"}
        report.json({"type": "summary", **summary})
    else:
        from fapecli.render import score_table

        directions = {m: metric_info(m).direction for m in result.metrics}
        report.out.print(score_table(result, directions, summary_only=summary_only))
    if csv_file is not None:
        import csv
        import io

        buffer = io.StringIO()
        csv.writer(buffer).writerows(result.csv_rows())
        _write_text_atomic(csv_file, buffer.getvalue())
    report.info(f"scored {len(result.rows)} image(s) in {result.seconds:.1f}s")
    _exit_for(failures)


@app.command()
@_handles_errors
def train(
    config: Annotated[
        str,
        typer.Argument(
            help="A TOML recipe, or a bundled one: fape-s (the default model), flux, tiny."
        ),
    ] = "fape-s",
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Config overrides KEY=VALUE, e.g. schedule.steps=8000 data.batch_size=8.",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Continue from a checkpoint folder, or 'auto' (the latest)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Run folder (checkpoints, logs, final model)."),
    ] = None,
    executor: Annotated[
        str | None,
        typer.Option(
            "--executor",
            help="compact or flux (frozen FLUX + adapters; the flux recipe unless CONFIG is "
            "given).",
        ),
    ] = None,
    device: Device = "auto",
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the resolved config as JSON and exit.")
    ] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Train a fape executor from a TOML recipe (same command under `accelerate launch`)."""
    import json

    from fapecli.training.config import load_config

    report = Reporter(quiet=quiet, verbose=verbose)
    items = list(overrides or [])
    if "=" in config:  # `fape train key=value ...` with the default recipe
        items.insert(0, config)
        config = "fape-s"
    if executor is not None:
        if config == "fape-s" and executor == "flux":
            config = "flux"
        items.insert(0, f"model.executor={executor}")
    if resume is not None:
        items.append(f"resume={resume}")
    if out is not None:
        items.append(f"out_dir={out}")
    if device != "auto":
        items.append(f"device={device}")
    cfg = load_config(config, items)
    if print_config:
        typer.echo(json.dumps(cfg.to_dict(), indent=2))
        return
    from fapecli.training.loop import train as run

    result = run(cfg, emit=report.info)
    report.info(
        f"trained {result.step} steps in {result.seconds / 60:.1f} min; "
        f"final model: {result.final_dir}"
    )


# --------------------------------------------------------------------------- weights


@weights_app.command("list")
@_handles_errors
def weights_list(json_out: Json = False, quiet: Quiet = False) -> None:
    """Every model in weights.toml: kind, whether its files are present, where, licence."""
    from fapecli.weights import find_file, load_manifest

    report = Reporter(quiet=quiet)
    rows = []
    for entry in load_manifest().values():
        paths = [find_file(entry, f) for f in entry.files]
        present = all(p is not None for p in paths)
        found = [p.parent for p in paths if p is not None]
        where = os.path.commonpath(found) if found else ""  # the model's folder, experts and all
        record = {
            "name": entry.name,
            "kind": entry.kind,
            "present": present,
            "path": where,
            "licence": entry.licence,
            "description": entry.description,
        }
        if json_out:
            report.json(record)
        rows.append(record)
    if not json_out:
        from fapecli.render import weights_table

        report.out.print(weights_table(rows))


@weights_app.command("verify")
@_handles_errors
def weights_verify(
    names: Annotated[
        list[str] | None, typer.Argument(help="Models to check (default: all present).")
    ] = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Check the sha256 of model files; exit 1 if any is missing or differs."""
    from fapecli.weights import is_present, load_manifest, verify

    report = Reporter(quiet=quiet)
    manifest = load_manifest()
    chosen = names or [n for n, e in manifest.items() if is_present(e)]
    bad = 0
    for name in chosen:
        for status in verify(name):
            bad += status.status in ("missing", "mismatch")
            record = {
                "model": status.model,
                "file": status.file,
                "status": status.status,
                "path": str(status.path or ""),
                "detail": status.detail,
            }
            if json_out:
                report.json(record)
            else:
                colour = {"ok": "green", "unchecked": "yellow"}.get(status.status, "red")
                report.out.print(
                    f"[{colour}]{status.status:9}[/{colour}] {status.model}: {status.file} "
                    f"{status.detail}"
                )
    if not chosen:
        report.info("no model files present to verify")
    _exit_for(bad)


@weights_app.command("import")
@_handles_errors
def weights_import(
    folder: Annotated[Path, typer.Argument(help="A folder holding downloaded model files.")],
    model: Annotated[
        list[str] | None, typer.Option("--model", help="Only these models (repeatable).")
    ] = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Copy the model files found in FOLDER into the right caches, checking their hashes."""
    from fapecli.scoring import import_weights

    _print_weight_results(import_weights(folder, models=model), json_out, Reporter(quiet=quiet))


@weights_app.command("fetch")
@_handles_errors
def weights_fetch(
    names: Annotated[
        list[str], typer.Argument(help="Models to download (see `fape weights list`).")
    ],
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="A mirror: files are fetched from URL/NAME.")
    ] = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Download model files from their source URLs (needs a network), checking their hashes."""
    from fapecli.scoring import fetch_weights

    report = Reporter(quiet=quiet)
    results = [r for name in names for r in fetch_weights(name, base_url=base_url)]
    _print_weight_results(results, json_out, report)


@weights_app.command("average")
@_handles_errors
def weights_average(
    models: Annotated[
        list[Path], typer.Argument(help="Model folders (config.json + model.safetensors).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write.")],
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="Mixing weights, comma-separated (default: uniform)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output folder.")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Write the weight average of models fine-tuned from one parent (a model soup)."""
    from fapecli.training.average import average_models

    mix = None
    if weights is not None:
        try:
            mix = [float(w) for w in weights.split(",")]
        except ValueError:
            raise UsageError(f"--weights: not a list of numbers: {weights!r}") from None
    out = average_models(models, output, weights=mix, overwrite=overwrite)
    Reporter(quiet=quiet).info(f"wrote {out} (the average of {len(models)} models)")


def _print_weight_results(results: list, json_out: bool, report: Reporter) -> None:
    bad = 0
    for r in results:
        bad += r.status.startswith("mismatch")
        record = {
            "model": r.model,
            "file": r.file,
            "status": r.status,
            "path": str(r.path or ""),
            "detail": r.detail,
        }
        if json_out:
            report.json(record)
        else:
            report.out.print(
                f"{r.status:20} {r.model}: {r.file} {r.path or ''} {r.detail}", markup=False
            )
    if not results:
        report.warn("no file named in weights.toml was found")
    _exit_for(bad)


def main() -> None:
    """Console-script entry point."""
    app()
