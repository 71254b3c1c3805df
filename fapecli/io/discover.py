"""Finding input images (files, folders, stdin) and naming their outputs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
)
JUNK_NAMES: frozenset[str] = frozenset({".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini"})
JUNK_FOLDERS: frozenset[str] = frozenset({"__macosx", "$recycle.bin", "system volume information"})
TEMP_SUFFIX = ".part"
STDIN = Path("-")


@dataclass(frozen=True)
class InputItem:
    """One input image: where it is, and where it sits relative to what the user named."""

    path: Path  # the file, or Path("-") for stdin
    relative: Path  # relative to the folder it was found under; the name for a file argument

    @property
    def is_stdin(self) -> bool:
        return self.path == STDIN


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the supported image extensions."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_junk(name: str) -> bool:
    """Hidden files (incl. AppleDouble "._*"), OS litter and our own temp files."""
    return name.startswith(".") or name.casefold() in JUNK_NAMES or name.endswith(TEMP_SUFFIX)


def discover_images(
    inputs: Sequence[str | Path], *, recursive: bool = True
) -> tuple[list[InputItem], list[tuple[str, str]]]:
    """Expand files, folders and "-" into image items, in order, without duplicates.

    Folders are walked (recursively unless told not to) in sorted order, skipping junk and
    hidden folders. Returns (items, problems); problems are (input, message) pairs for
    missing paths, explicit non-image files and folders without images.
    """
    items: list[InputItem] = []
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in inputs:
        found, problem = _expand(raw, recursive)
        if problem:
            problems.append((str(raw), problem))
        for item in found:
            key = "-" if item.is_stdin else os.path.normcase(os.path.realpath(item.path))
            if key not in seen:
                seen.add(key)
                items.append(item)
    return items, problems


def _expand(raw: str | Path, recursive: bool) -> tuple[list[InputItem], str | None]:
    if str(raw) == "-":
        return [InputItem(STDIN, Path("stdin.png"))], None
    path = Path(raw)
    if path.is_dir():
        found = _walk(path, recursive)
        return found, None if found else "no images found in folder"
    if not path.exists():
        return [], "no such file or folder"
    if not path.is_file():
        return [], "not a regular file"
    if not is_image_name(path.name):
        known = " ".join(sorted(IMAGE_EXTENSIONS))
        return [], f"not an image file (extension {path.suffix or '(none)'!r}; expected {known})"
    return [InputItem(path, Path(path.name))], None


def _walk(root: Path, recursive: bool) -> list[InputItem]:
    """Image files under root, sorted by their relative path (case-insensitively, then exactly)."""
    found: list[Path] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if recursive and not _is_junk_folder(d)]
        for name in files:
            full = os.path.join(folder, name)
            if not is_junk(name) and is_image_name(name) and os.path.isfile(full):
                found.append(Path(full).relative_to(root))
    found.sort(key=lambda rel: [(part.casefold(), part) for part in rel.parts])
    return [InputItem(root / rel, rel) for rel in found]


def _is_junk_folder(name: str) -> bool:
    return name.startswith(".") or name.casefold() in JUNK_FOLDERS


def read_path_list(stream: TextIO) -> list[str]:
    """Paths from a text stream, one per line; blank lines and '#' comments are skipped."""
    paths = []
    for line in stream:
        text = line.strip()
        if text and not text.startswith("#"):
            paths.append(text)
    return paths


def output_path(
    item: InputItem, out_dir: Path, *, suffix: str = "", ext: str | None = None
) -> Path:
    """Where an item's result goes: its relative path under out_dir, renamed.

    ``suffix`` goes before the extension; ``ext`` (with or without the dot) replaces the
    input's extension, None keeps it. Stdin items are named "stdin.png".
    """
    rel = item.relative
    extension = rel.suffix if ext is None else "." + ext.lstrip(".")
    return Path(out_dir) / rel.parent / f"{rel.stem}{suffix}{extension}"
