"""Shared fixtures: tests never touch the network, ../shared or the user's caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_caches(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Point every weight cache at empty temporary folders."""
    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "xdg"))
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("FAPE_WEIGHTS", raising=False)
    monkeypatch.delenv("FAPE_WEIGHTS_MANIFEST", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def photo() -> np.ndarray:
    """A natural colour photo (scikit-image's bundled astronaut), float32 HxWx3 in [0, 1]."""
    from skimage import data

    return (data.astronaut()[::2, ::2].astype(np.float32) / 255.0).copy()


@pytest.fixture
def one_thread():
    """The CI machine is small and shared: one torch thread is much faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
