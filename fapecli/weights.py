"""The model manifest `weights.toml`: what each model needs, where to find it, how to check it.

A file named in the manifest is looked for, in order, in:

1. every folder in ``$FAPE_WEIGHTS`` (``os.pathsep``-separated), as ``<folder>/<path>``;
2. the package itself (``fapecli/models/<path>``) for models marked ``bundled``;
3. the model's cache: fape's own (``$XDG_CACHE_HOME/fape/weights``, default
   ``~/.cache/fape/weights``), torch hub's (``$TORCH_HOME/hub/<subdir>``, where pyiqa keeps
   metric weights) or the Hugging Face hub cache (``$HF_HUB_CACHE`` / ``$HF_HOME/hub``,
   ``models--org--name/snapshots/*/``).

Nothing is ever downloaded implicitly: a missing file raises `WeightsError` naming the file,
the folders searched and the ways to provide it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from fapecli.errors import WeightsError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_DIR = PACKAGE_DIR / "models"
ENV_WEIGHTS = "FAPE_WEIGHTS"
ENV_MANIFEST = "FAPE_WEIGHTS_MANIFEST"


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative path inside the model's folder / cache
    sha256: str = ""
    size: int = 0
    url: str = ""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str  # "executor", "planner", "metric", "flux-transformer", ...
    description: str = ""
    licence: str = ""
    source: str = ""  # where the files come from (a URL or "trained with fape train")
    files: tuple[FileEntry, ...] = ()
    bundled: bool = False  # the files ship inside the package
    cache: str = "fape"  # "fape", "torch-hub/<subdir>" or "hf"
    hf_repo: str = ""  # for cache = "hf": org/name
    options: dict = field(default_factory=dict)  # kind-specific settings (e.g. a pyiqa metric name)


def manifest_path() -> Path:
    """The manifest in use: $FAPE_WEIGHTS_MANIFEST, the packaged copy, or the source tree's."""
    env = os.environ.get(ENV_MANIFEST)
    if env:
        return Path(env)
    packaged = PACKAGE_DIR / "weights.toml"
    return packaged if packaged.is_file() else PACKAGE_DIR.parent / "weights.toml"


@lru_cache(maxsize=8)
def _load(path: str) -> dict[str, ModelEntry]:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError("model manifest not found", path) from None
    except tomllib.TOMLDecodeError as exc:
        raise WeightsError(f"model manifest is not valid TOML ({exc})", path) from None
    models: dict[str, ModelEntry] = {}
    for name, spec in data.get("models", {}).items():
        files = tuple(FileEntry(**f) for f in spec.get("files", []))
        known = {
            "kind",
            "description",
            "licence",
            "source",
            "bundled",
            "cache",
            "hf_repo",
            "options",
        }
        unknown = set(spec) - known - {"files"}
        if unknown:
            raise WeightsError(f"model {name!r} has unknown keys {sorted(unknown)}", path)
        models[name] = ModelEntry(
            name=name, files=files, **{k: spec[k] for k in known if k in spec}
        )
    return models


def load_manifest(path: str | Path | None = None) -> dict[str, ModelEntry]:
    """All models of the manifest, by name."""
    return _load(str(path or manifest_path()))


def get_model(name: str, manifest: str | Path | None = None) -> ModelEntry:
    models = load_manifest(manifest)
    if name not in models:
        raise WeightsError(f"unknown model {name!r}; known: {', '.join(sorted(models))}")
    return models[name]


def fape_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fape" / "weights"


def torch_hub_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home:
        return Path(torch_home) / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "torch" / "hub"


def hf_hub_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(hf_home) / "hub"


def cache_dir(entry: ModelEntry) -> Path:
    """The folder `fape weights import/fetch` writes this model's files to."""
    if entry.cache.startswith("torch-hub"):
        sub = entry.cache.partition("/")[2]
        return torch_hub_dir() / sub if sub else torch_hub_dir() / "checkpoints"
    if entry.cache == "hf":
        repo = hf_hub_dir() / ("models--" + entry.hf_repo.replace("/", "--"))
        return repo / "snapshots" / "local"
    return fape_cache_dir() / entry.name


def search_dirs(entry: ModelEntry) -> list[Path]:
    """Folders searched for the model's files, in order."""
    dirs = [Path(p) for p in os.environ.get(ENV_WEIGHTS, "").split(os.pathsep) if p]
    dirs += [d / entry.name for d in list(dirs)]
    if entry.bundled:
        dirs.append(BUNDLED_DIR)
    if entry.cache == "hf" and entry.hf_repo:
        snaps = hf_hub_dir() / ("models--" + entry.hf_repo.replace("/", "--")) / "snapshots"
        dirs += sorted(snaps.glob("*")) if snaps.is_dir() else []
    else:
        dirs.append(cache_dir(entry))
    return dirs


def find_file(entry: ModelEntry, file: FileEntry) -> Path | None:
    """Where the file is, or None."""
    for d in search_dirs(entry):
        candidate = d / file.path
        if candidate.is_file():
            return candidate
    return None


def missing_message(entry: ModelEntry, file: FileEntry) -> str:
    if entry.bundled:  # the file should have come with the package itself
        return (f"model {entry.name!r} ships inside the package, but {BUNDLED_DIR / file.path} "
                f"is missing: reinstall fape, or put {file.path} in a folder named by "
                f"${ENV_WEIGHTS}")
    where = cache_dir(entry) / file.path
    how = [f"put it at {where}", f"or in a folder named by ${ENV_WEIGHTS}"]
    if file.url:
        how.append(f"(`fape weights fetch {entry.name}` downloads it from {file.url})")
    how.append(f"or run `fape weights import DIR` on a folder holding {Path(file.path).name}")
    return f"model {entry.name!r} needs {file.path}, which was not found: " + "; ".join(how)


def locate(name: str | ModelEntry) -> dict[str, Path]:
    """Paths of every file of a model, by relative path; WeightsError on the first missing."""
    entry = name if isinstance(name, ModelEntry) else get_model(name)
    found: dict[str, Path] = {}
    for f in entry.files:
        path = find_file(entry, f)
        if path is None:
            raise WeightsError(missing_message(entry, f))
        found[f.path] = path
    return found


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileStatus:
    model: str
    file: str
    path: Path | None
    status: str  # "ok", "missing", "mismatch", "unchecked" (no hash in the manifest)
    detail: str = ""


def verify(name: str | ModelEntry) -> list[FileStatus]:
    """Check every file of a model against the manifest's sha256 and size."""
    entry = name if isinstance(name, ModelEntry) else get_model(name)
    out: list[FileStatus] = []
    for f in entry.files:
        path = find_file(entry, f)
        if path is None:
            out.append(FileStatus(entry.name, f.path, None, "missing", missing_message(entry, f)))
        elif not f.sha256:
            out.append(FileStatus(entry.name, f.path, path, "unchecked", "no sha256 in manifest"))
        else:
            digest = sha256_file(path)
            ok = digest == f.sha256 and (not f.size or path.stat().st_size == f.size)
            detail = "" if ok else f"sha256 {digest[:12]}... expected {f.sha256[:12]}..."
            out.append(FileStatus(entry.name, f.path, path, "ok" if ok else "mismatch", detail))
    return out


def is_present(entry: ModelEntry) -> bool:
    return all(find_file(entry, f) is not None for f in entry.files)
