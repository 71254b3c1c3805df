"""Man pages generated from the Typer app by a small roff writer.

`python -m fapecli.manpages man/` rewrites ``man/fape.1`` and one ``fape-COMMAND.1`` per
subcommand; a test regenerates them into a temporary folder and fails when ``man/`` differs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer.main

from fapecli import __version__

EXIT_STATUS = [
    ("0", "Success."),
    ("1", "Some inputs failed (each is reported on stderr; the others were processed)."),
    ("2", "Usage error (bad option or option value)."),
    ("130", "Interrupted (Ctrl-C); no partial output files are left behind."),
]


def _esc(text: str) -> str:
    """Escape text for roff: backslashes, leading dots/quotes, and hyphens in options."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln) if ln.startswith((".", "'")) else ln for ln in text.splitlines())


def _ctx(cmd: Any, name: str, parent: Any = None) -> Any:
    return cmd.make_context(name, [], parent=parent, resilient_parsing=True)


def _options(cmd: Any, ctx: Any) -> list[str]:
    lines: list[str] = []
    for param in cmd.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        record = param.get_help_record(ctx)
        if not record:
            continue
        opts, help_text = record
        lines += [".TP", f"\\fB{_esc(opts)}\\fR", _esc(help_text or "")]
    return lines


def _page(title: str, summary: str, usage: str, description: str, body: list[str]) -> str:
    head = [
        f'.TH "{title.upper()}" "1" "" "fape {__version__}" "fape manual"',
        ".SH NAME",
        f"{_esc(title)} \\- {_esc(summary)}",
        ".SH SYNOPSIS",
        f"\\fB{_esc(usage)}\\fR",
        ".SH DESCRIPTION",
        _esc(description),
    ]
    tail = [".SH EXIT STATUS"]
    for code, meaning in EXIT_STATUS:
        tail += [".TP", f"\\fB{code}\\fR", _esc(meaning)]
    return "\n".join([*head, *body, *tail]) + "\n"


def _summary(cmd: Any) -> str:
    return (cmd.help or "").strip().splitlines()[0].rstrip(".") if cmd.help else ""


def render_pages() -> dict[str, str]:
    """All man pages, by file name."""
    from fapecli.cli import app

    root = typer.main.get_command(app)
    root_ctx = _ctx(root, "fape")
    pages: dict[str, str] = {}
    commands = root.commands
    body = [".SH OPTIONS", *_options(root, root_ctx), ".SH COMMANDS"]
    for name, sub in commands.items():
        body += [
            ".TP",
            f"\\fBfape {name}\\fR",
            _esc(_summary(sub) + ". See \\fBfape-" + name + "\\fR(1)."),
        ]
    body += [".SH SEE ALSO", ", ".join(f"\\fBfape\\-{n}\\fR(1)" for n in commands)]
    pages["fape.1"] = _page(
        "fape", _summary(root), "fape [OPTIONS] COMMAND [ARGS]...", (root.help or "").strip(), body
    )
    for name, sub in commands.items():
        ctx = _ctx(sub, name, parent=root_ctx)
        usage = " ".join(["fape", name, *sub.collect_usage_pieces(ctx)])
        body = [".SH OPTIONS", *_options(sub, ctx)]
        for child_name, child in getattr(sub, "commands", {}).items():
            child_ctx = _ctx(child, child_name, parent=ctx)
            child_usage = " ".join(
                ["fape", name, child_name, *child.collect_usage_pieces(child_ctx)]
            )
            body += [
                f'.SH "fape {name} {child_name}"',
                f"\\fB{_esc(child_usage)}\\fR",
                ".PP",
                _esc((child.help or "").strip()),
                *_options(child, child_ctx),
            ]
        body += [".SH SEE ALSO", "\\fBfape\\fR(1)"]
        pages[f"fape-{name}.1"] = _page(
            f"fape-{name}", _summary(sub), usage, (sub.help or "").strip(), body
        )
    return pages


def write_pages(folder: str | Path) -> list[Path]:
    """Write every page into `folder`, removing stale fape pages; return the written paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pages = render_pages()
    for old in folder.glob("fape*.1"):
        if old.name not in pages:
            old.unlink()
    written = []
    for name, text in pages.items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_pages(sys.argv[1] if len(sys.argv) > 1 else "man"):
        print(p)
