"""User-facing errors: one line that names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class FapeError(Exception):
    """An error the CLI prints as one line (no traceback) before exiting non-zero."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line (its type name when it has no message), for
    one-line errors wrapping a library's multi-line ones."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ImageError(FapeError):
    """A file could not be read or written as an image."""


class WeightsError(FapeError):
    """A model file named in weights.toml is missing or does not match its hash."""


class UsageError(FapeError):
    """Bad combination of options (exit code 2, like a command-line parse error)."""

    exit_code = 2
