"""`fape weights import` and `fape weights fetch`: put model files where fape looks for them.

Both write into the model's cache folder (fapecli.weights.cache_dir) through a temporary
file and a rename, and verify each file against weights.toml: its sha256 where the
manifest has one, else, for torch hub files named ``name-<hex>.ext``, the sha256 prefix
torch hub puts in the name (torch.hub's own check). Nothing else in fape downloads.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fapecli.errors import WeightsError
from fapecli.weights import (
    FileEntry,
    ModelEntry,
    cache_dir,
    find_file,
    get_model,
    load_manifest,
    sha256_file,
)

_HASH_PREFIX = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub's HASH_REGEX
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightResult:
    """What happened to one file: imported, fetched, present, mismatch or unchecked-*."""

    model: str
    file: str
    status: str  # "imported", "fetched", "present", "mismatch"; "+unchecked" when no hash is known
    path: Path | None
    detail: str = ""

    def __iter__(self):  # (model, file, status) unpacking
        return iter((self.model, self.file, self.status))


def expected_hash(entry: ModelEntry, file: FileEntry) -> tuple[str, str]:
    """("sha256", digest), ("prefix", hex) for torch hub names, or ("", "") when unknown."""
    if file.sha256:
        return "sha256", file.sha256.lower()
    match = _HASH_PREFIX.search(Path(file.path).name)
    if entry.cache == "torch-hub/checkpoints" and match:
        return "prefix", match.group(1)
    return "", ""


def check_digest(entry: ModelEntry, file: FileEntry, digest: str, size: int) -> tuple[bool, str]:
    """(ok, detail) for a file's sha256 and size against the manifest; ok with no hash known."""
    kind, want = expected_hash(entry, file)
    if file.size and size != file.size:
        return False, f"size {size} bytes, expected {file.size}"
    if kind == "sha256" and digest != want:
        return False, f"sha256 {digest[:12]}..., expected {want[:12]}..."
    if kind == "prefix" and not digest.startswith(want):
        return False, f"sha256 {digest[:12]}... does not start with {want} (from the file name)"
    return True, "" if kind else "no hash known"


def _status(base: str, entry: ModelEntry, file: FileEntry) -> str:
    return base if expected_hash(entry, file)[0] else base + "+unchecked"


def _models(names: Iterable[str] | None) -> list[ModelEntry]:
    manifest = load_manifest()
    if names is None:
        return list(manifest.values())
    return [get_model(n) for n in names]


def _index(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            found.setdefault(path.name, []).append(path)
    return found


def _candidates(file: FileEntry, index: dict[str, list[Path]]) -> list[Path]:
    """Files whose trailing path components equal the manifest path (so "x/config.json"
    never matches a stray config.json)."""
    parts = Path(file.path).parts
    return [p for p in index.get(parts[-1], []) if p.parts[-len(parts) :] == parts]


def _install(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def import_weights(
    folder: str | Path, *, models: Iterable[str] | None = None
) -> list[WeightResult]:
    """Copy the manifest's files found in folder (by file name, recursively) into the caches.

    A file whose hash does not match is not copied ("mismatch"). Returns one result per
    manifest file found in the folder; files the manifest does not name are ignored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError("not a folder", folder)
    index = _index(folder)
    results: list[WeightResult] = []
    for entry in _models(models):
        for file in entry.files:
            candidates = _candidates(file, index)
            if candidates:
                results.append(_import_one(entry, file, candidates))
    return results


def _import_one(entry: ModelEntry, file: FileEntry, candidates: list[Path]) -> WeightResult:
    target = cache_dir(entry) / file.path
    detail = ""
    for source in candidates:
        ok, detail = check_digest(entry, file, sha256_file(source), source.stat().st_size)
        if not ok:
            continue
        if target.is_file() and _same(source, target):
            return WeightResult(
                entry.name, file.path, _status("present", entry, file), target, detail
            )
        _install(source, target)
        return WeightResult(entry.name, file.path, _status("imported", entry, file), target, detail)
    return WeightResult(entry.name, file.path, "mismatch", None, f"{candidates[0]}: {detail}")


def _same(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)


# --------------------------------------------------------------------------- fetch

ProgressFn = Callable[[str, int, int], None]  # (file, bytes so far, total or 0)


def fetch_weights(
    name: str,
    *,
    base_url: str | None = None,
    timeout: float = 60.0,
    progress: ProgressFn | None = None,
    with_requires: bool = True,
) -> list[WeightResult]:
    """Download a model's files (and the backbones it requires) into the caches.

    ``base_url`` replaces each file's URL by ``<base_url>/<file name>`` (a mirror). A file
    already present and matching its hash is not downloaded again. Raises WeightsError
    naming the URL on an HTTP or network error, and on a hash mismatch (nothing is kept).
    """
    entry = get_model(name)
    entries = [entry]
    if with_requires:
        entries += [get_model(r) for r in entry.options.get("requires", [])]
    results = []
    for model in entries:
        for file in model.files:
            results.append(_fetch_one(model, file, base_url, timeout, progress))
    return results


def _fetch_one(
    entry: ModelEntry,
    file: FileEntry,
    base_url: str | None,
    timeout: float,
    progress: ProgressFn | None,
) -> WeightResult:
    present = find_file(entry, file)
    if present is not None:
        ok, _ = check_digest(entry, file, sha256_file(present), present.stat().st_size)
        if ok:
            return WeightResult(entry.name, file.path, _status("present", entry, file), present)
    url = f"{base_url.rstrip('/')}/{Path(file.path).name}" if base_url else file.url
    if not url:
        raise WeightsError(
            f"model {entry.name!r}: no URL for {file.path}; use `fape weights import`"
        )
    target = cache_dir(entry) / file.path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        digest, size = _download(url, tmp, file.path, timeout, progress)
        ok, detail = check_digest(entry, file, digest, size)
        if not ok:
            raise WeightsError(
                f"downloaded {file.path} from {url} but it does not match weights.toml: {detail}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return WeightResult(entry.name, file.path, _status("fetched", entry, file), target, detail)


def _download(
    url: str, tmp: Path, label: str, timeout: float, progress: ProgressFn | None
) -> tuple[str, int]:
    """Stream url into tmp; returns (sha256, size)."""
    digest, size = hashlib.sha256(), 0
    request = urllib.request.Request(url, headers={"User-Agent": "fape"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            while block := response.read(_CHUNK):
                out.write(block)
                digest.update(block)
                size += len(block)
                if progress is not None:
                    progress(label, size, total)
    except urllib.error.HTTPError as exc:
        raise WeightsError(
            f"cannot download {label} from {url}: HTTP {exc.code} {exc.reason}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(f"cannot download {label} from {url}: {reason}") from None
    return digest.hexdigest(), size
