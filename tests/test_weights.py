"""weights.toml lookup, verification and the cached loader."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from fapecli import loader, weights
from fapecli.errors import UsageError, WeightsError


def _manifest(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "weights.toml"
    path.write_text(body, encoding="utf-8")
    return path


def test_repository_manifest_parses_and_names_the_default_model() -> None:
    models = weights.load_manifest()
    assert "fape-s" in models
    entry = models["fape-s"]
    assert entry.kind == "executor" and entry.bundled
    assert {f.path for f in entry.files} >= {"fape-s/model.safetensors", "fape-s/config.json"}


def test_missing_file_error_names_file_and_remedies(tmp_path: Path, monkeypatch) -> None:
    m = _manifest(
        tmp_path,
        '[models.toy]\nkind = "executor"\n[[models.toy.files]]\npath = "toy/w.safetensors"\nurl = "http://example.invalid/w"\n',
    )
    monkeypatch.setenv("FAPE_WEIGHTS_MANIFEST", str(m))
    with pytest.raises(WeightsError) as err:
        weights.locate("toy")
    text = str(err.value)
    assert (
        "toy/w.safetensors" in text and "FAPE_WEIGHTS" in text and "fape weights fetch toy" in text
    )


def test_missing_bundled_file_names_the_package_path(tmp_path: Path, monkeypatch) -> None:
    m = _manifest(tmp_path, '[models.toy]\nkind = "executor"\nbundled = true\n'
                            '[[models.toy.files]]\npath = "toy/config.json"\n')
    monkeypatch.setenv("FAPE_WEIGHTS_MANIFEST", str(m))
    monkeypatch.setattr(weights, "BUNDLED_DIR", tmp_path / "models")
    with pytest.raises(WeightsError) as err:
        weights.locate("toy")
    text = str(err.value)
    assert "ships inside the package" in text
    assert str(tmp_path / "models" / "toy" / "config.json") in text
    assert "toy/toy/" not in text and "reinstall" in text


def test_lookup_order_and_verify(tmp_path: Path, monkeypatch) -> None:
    blob = b"fape weights"
    digest = hashlib.sha256(blob).hexdigest()
    m = _manifest(
        tmp_path,
        '[models.toy]\nkind = "executor"\n[[models.toy.files]]\npath = "w.bin"\n'
        f'sha256 = "{digest}"\nsize = {len(blob)}\n',
    )
    monkeypatch.setenv("FAPE_WEIGHTS_MANIFEST", str(m))
    cache = weights.cache_dir(weights.get_model("toy"))
    cache.mkdir(parents=True)
    (cache / "w.bin").write_bytes(blob)
    assert weights.locate("toy")["w.bin"] == cache / "w.bin"
    assert [s.status for s in weights.verify("toy")] == ["ok"]
    # $FAPE_WEIGHTS wins over the cache, and a wrong file is caught by its hash
    local = tmp_path / "mine"
    local.mkdir()
    (local / "w.bin").write_bytes(b"something else")
    monkeypatch.setenv("FAPE_WEIGHTS", str(local))
    assert weights.locate("toy")["w.bin"] == local / "w.bin"
    assert [s.status for s in weights.verify("toy")] == ["mismatch"]


def test_hf_cache_snapshots_are_searched(tmp_path: Path, monkeypatch) -> None:
    m = _manifest(
        tmp_path,
        '[models.q]\nkind = "planner"\ncache = "hf"\nhf_repo = "Org/Model-3B"\n'
        '[[models.q.files]]\npath = "config.json"\n',
    )
    monkeypatch.setenv("FAPE_WEIGHTS_MANIFEST", str(m))
    snap = tmp_path / "hf" / "hub" / "models--Org--Model-3B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert weights.locate("q")["config.json"] == snap / "config.json"


def test_bad_manifest_is_a_clear_error(tmp_path: Path) -> None:
    m = _manifest(tmp_path, "[models.x]\nkind = \n")
    with pytest.raises(WeightsError, match="not valid TOML"):
        weights.load_manifest(m)


def test_device_and_dtype_resolution() -> None:
    assert loader.resolve_device("cpu").type == "cpu"
    auto = loader.resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
    if not torch.cuda.is_available():
        assert auto.type in ("cpu", "mps")
        with pytest.raises(UsageError, match="no CUDA GPU"):
            loader.resolve_device("cuda:0")
    with pytest.raises(UsageError):
        loader.resolve_device("tpu")
    cpu = torch.device("cpu")
    assert loader.resolve_dtype("auto", cpu) == torch.float32
    assert loader.resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(UsageError):
        loader.resolve_dtype("int8", cpu)


def test_loader_builds_once_per_key(tmp_path: Path, monkeypatch) -> None:
    m = _manifest(tmp_path, '[models.counter]\nkind = "test-counter"\n')
    monkeypatch.setenv("FAPE_WEIGHTS_MANIFEST", str(m))
    calls = []

    @loader.register_builder("test-counter")
    def _build(entry, files, device, dtype):
        calls.append((device, dtype))
        return object()

    loader.clear_cache()
    a = loader.load_model("counter", device="cpu")
    b = loader.load_model("counter", device="cpu")
    c = loader.load_model("counter", device="cpu", precision="bf16")
    assert a is b and a is not c and len(calls) == 2
    loader.clear_cache()


def test_first_line_of_a_library_error() -> None:
    from fapecli.errors import first_line

    assert first_line(OSError("\n  no such file\nTraceback details")) == "no such file"
    assert first_line(KeyError()) == "KeyError"
