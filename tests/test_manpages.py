"""The committed man pages must match what the CLI generates."""

from __future__ import annotations

from pathlib import Path

from fapecli.manpages import render_pages

MAN = Path(__file__).resolve().parent.parent / "man"


def test_man_pages_are_up_to_date() -> None:
    pages = render_pages()
    stale = [
        name
        for name, text in pages.items()
        if not (MAN / name).is_file() or (MAN / name).read_text(encoding="utf-8") != text
    ]
    extra = sorted(p.name for p in MAN.glob("fape*.1") if p.name not in pages)
    assert not stale and not extra, (
        f"man pages are stale ({stale}) or orphaned ({extra}): run `make man` "
        "(python -m fapecli.manpages man) and commit the result"
    )


def test_every_command_has_a_page_with_its_options() -> None:
    pages = render_pages()
    for command in ("plan", "restore", "score", "train", "degrade", "weights"):
        assert f"fape-{command}.1" in pages
    assert "\\-\\-json" in pages["fape-plan.1"]
    assert "\\-\\-device" in pages["fape-plan.1"]
    assert "fape weights verify" in pages["fape-weights.1"]
    assert pages["fape.1"].startswith('.TH "FAPE" "1"')
