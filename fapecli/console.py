"""Messages on stderr, data on stdout: the CLI's small output toolkit."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


class Reporter:
    """Where a command talks: ``quiet`` keeps only errors, ``verbose`` adds details."""

    def __init__(self, *, quiet: bool = False, verbose: bool = False) -> None:
        self.quiet = quiet
        self.verbose = verbose
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self.out = Console(highlight=False, soft_wrap=True)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(message)

    def debug(self, message: str) -> None:
        if self.verbose and not self.quiet:
            self.err.print(f"[dim]{message}[/dim]")

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.err.print(f"[yellow]warning:[/yellow] {message}", markup=True)

    def error(self, message: str) -> None:
        """One line, always shown, escaped so file names with brackets print as they are."""
        from rich.markup import escape

        self.err.print(f"[red]error:[/red] {escape(message)}")

    def line(self, text: str) -> None:
        """One plain line on stdout, byte for byte (no markup, tabs kept)."""
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def json(self, record: dict[str, Any]) -> None:
        """One JSON Lines record on stdout (flushed, so pipelines see it at once)."""
        sys.stdout.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")
        sys.stdout.flush()

    @property
    def interactive(self) -> bool:
        return not self.quiet and sys.stdout.isatty() and sys.stderr.isatty()

    @contextmanager
    def progress(self, total: int, description: str) -> Iterator[Progress | None]:
        """A rich progress bar with ETA on stderr, or None when quiet or piped."""
        if not self.interactive or total <= 1:
            yield None
            return
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
        )
        with bar:
            bar.add_task(description, total=total)
            yield bar

    def track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        with self.progress(total, description) as bar:
            for item in items:
                yield item
                if bar is not None:
                    bar.advance(bar.task_ids[0])


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
