"""`fape weights import/fetch` library: hash-checked copies and loopback downloads."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fapecli.errors import WeightsError
from fapecli.scoring.fetch import fetch_weights, import_weights
from fapecli.weights import cache_dir, get_model

GOOD = b"pretend weights\n" * 64
PREFIXED = b"torchvision-style file\n"
PREFIX = hashlib.sha256(PREFIXED).hexdigest()[:8]


def _manifest(tmp_path: Path, url: str = "", sha: str | None = None) -> Path:
    sha = hashlib.sha256(GOOD).hexdigest() if sha is None else sha
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "weights.toml"
    path.write_text(
        f"""
[models.tiny]
kind = "metric"
cache = "torch-hub/pyiqa"
options = {{ requires = ["tiny-backbone"] }}

[[models.tiny.files]]
path = "tiny-weights.pth"
sha256 = "{sha}"
url = "{url}/tiny-weights.pth"

[models.tiny-backbone]
kind = "metric-backbone"
cache = "torch-hub/checkpoints"

[[models.tiny-backbone.files]]
path = "net-{PREFIX}.pth"
url = "{url}/net-{PREFIX}.pth"

[models.nested]
kind = "executor"

[[models.nested.files]]
path = "nested/config.json"
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = _manifest(tmp_path / "m")
    monkeypatch.setenv("FAPE_WEIGHTS_MANIFEST", str(path))
    return path


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_import_verifies_and_copies(tmp_path: Path, manifest: Path) -> None:
    src = _folder(
        tmp_path / "downloads",
        {
            "sub/tiny-weights.pth": GOOD,
            f"net-{PREFIX}.pth": PREFIXED,
            "config.json": b"{}",  # not nested/config.json: must not be taken
        },
    )
    results = import_weights(src)
    assert sorted(tuple(r) for r in results) == [
        ("tiny", "tiny-weights.pth", "imported"),
        ("tiny-backbone", f"net-{PREFIX}.pth", "imported"),
    ]
    target = cache_dir(get_model("tiny")) / "tiny-weights.pth"
    assert target.read_bytes() == GOOD and "pyiqa" in target.parts
    assert (cache_dir(get_model("tiny-backbone")) / f"net-{PREFIX}.pth").is_file()
    again = import_weights(src)
    assert {r.status for r in again} == {"present"}


def test_import_refuses_a_bad_hash(tmp_path: Path, manifest: Path) -> None:
    src = _folder(
        tmp_path / "bad",
        {"tiny-weights.pth": b"tampered", f"net-{PREFIX}.pth": b"not the hashed bytes"},
    )
    results = {r.model: r for r in import_weights(src)}
    assert results["tiny"].status == "mismatch" and "sha256" in results["tiny"].detail
    assert (
        results["tiny-backbone"].status == "mismatch" and PREFIX in results["tiny-backbone"].detail
    )
    assert not (cache_dir(get_model("tiny")) / "tiny-weights.pth").exists()


def test_import_without_a_known_hash_is_unchecked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAPE_WEIGHTS_MANIFEST", str(_manifest(tmp_path / "m2", sha="")))
    src = _folder(tmp_path / "any", {"tiny-weights.pth": b"whatever"})
    (result,) = import_weights(src)
    assert result.status == "imported+unchecked"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server on 127.0.0.1 serving a temporary folder."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_fetch_from_loopback_with_requires(server, tmp_path: Path, monkeypatch) -> None:
    url, root = server
    _folder(root / "mirror", {"tiny-weights.pth": GOOD, f"net-{PREFIX}.pth": PREFIXED})
    monkeypatch.setenv("FAPE_WEIGHTS_MANIFEST", str(_manifest(tmp_path / "m3", url=url)))
    seen: list[int] = []
    results = fetch_weights(
        "tiny", base_url=f"{url}/mirror/", progress=lambda f, n, t: seen.append(n)
    )
    assert [r.status for r in results] == ["fetched", "fetched"]
    assert (cache_dir(get_model("tiny")) / "tiny-weights.pth").read_bytes() == GOOD
    assert seen and seen[-1] == len(PREFIXED)
    assert {r.status for r in fetch_weights("tiny", base_url=f"{url}/mirror")} == {"present"}


def test_fetch_uses_manifest_urls(server, tmp_path: Path, monkeypatch) -> None:
    url, root = server
    _folder(root, {"tiny-weights.pth": GOOD, f"net-{PREFIX}.pth": PREFIXED})
    monkeypatch.setenv("FAPE_WEIGHTS_MANIFEST", str(_manifest(tmp_path / "m4", url=url)))
    assert [r.status for r in fetch_weights("tiny", with_requires=False)] == ["fetched"]


def test_fetch_404_is_a_clear_error(server, tmp_path: Path, monkeypatch) -> None:
    url, _ = server
    monkeypatch.setenv("FAPE_WEIGHTS_MANIFEST", str(_manifest(tmp_path / "m5", url=url)))
    with pytest.raises(WeightsError, match=r"HTTP 404") as info:
        fetch_weights("tiny")
    assert f"{url}/tiny-weights.pth" in str(info.value)
    target_dir = cache_dir(get_model("tiny"))
    assert not any(target_dir.glob("*")) if target_dir.exists() else True


def test_fetch_hash_mismatch_keeps_nothing(server, tmp_path: Path, monkeypatch) -> None:
    url, root = server
    _folder(root, {"tiny-weights.pth": b"corrupted on the way"})
    monkeypatch.setenv("FAPE_WEIGHTS_MANIFEST", str(_manifest(tmp_path / "m6", url=url)))
    with pytest.raises(WeightsError, match="does not match"):
        fetch_weights("tiny", with_requires=False)
    assert not any(cache_dir(get_model("tiny")).glob("*"))
