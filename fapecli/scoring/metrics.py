"""Image-quality metrics: exact PSNR/SSIM by fape, the learned ones through pyiqa, offline.

pyiqa (IQA-PyTorch) is licensed for non-commercial use only (PolyForm Noncommercial 1.0.0),
and so are several of the weights it distributes; see weights.toml for each model.

* PSNR and SSIM are computed here, exactly, in float64 and in row strips (any image size):
  PSNR = 10 log10(1 / MSE) on [0, 1] data; SSIM as Wang et al. 2004 with an 11x11 Gaussian
  window (sigma 1.5), K1 = 0.01, K2 = 0.03, "valid" filtering and the mean of the map —
  identical to BasicSR's ``calculate_ssim`` and to scikit-image's ``structural_similarity``
  with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1``.
  ``y_channel`` uses BT.601 luma, Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255, like
  BasicSR; two grey images are compared on their grey plane (BasicSR does the same).
  pyiqa's own SSIM is not used: it rounds its input to 8 bits (losing 16-bit precision)
  and clamps the contrast-structure term at zero, so it differs from the formula above.
* Learned metrics are pyiqa models, fed 1x3xHxW float32 tensors in [0, 1]: grey images
  are replicated to three channels and alpha is dropped. Their weights are looked up with
  fapecli.weights before anything is built, and while pyiqa builds a model every download
  path it could take (its load_file_from_url, torchvision's and torch hub's downloads,
  CLIP's downloader, the Hugging Face hub) is redirected to the files found or refused.
* Large images: PSNR/SSIM are exact at any size. For learned metrics an image above
  ``max_pixels`` is handled per the metric's ``large_images`` option: ``tile`` (LPIPS: the
  mean over area-weighted tiles of its spatially averaged distance), ``downscale`` (DISTS,
  as its authors' code resizes to 256 px; MUSIQ, CLIP-IQA, TOPIQ: area-resized to fit),
  ``crops`` (MANIQA scores fixed-size crops anyway) or ``limit`` (NIQE: refused above
  4 x max_pixels); what was done is recorded in the report.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from fapecli.errors import UsageError, WeightsError
from fapecli.loader import register_builder
from fapecli.weights import (
    ModelEntry,
    find_file,
    get_model,
    load_manifest,
    missing_message,
)

if TYPE_CHECKING:
    import torch

DEFAULT_FR = ("psnr", "ssim", "lpips", "dists")
DEFAULT_NR = ("niqe", "musiq", "maniqa", "clipiqa", "topiq_nr")
EXACT = ("psnr", "ssim")
ALIASES = {"topiq": "topiq_nr", "clip-iqa": "clipiqa", "clip_iqa": "clipiqa", "psnry": "psnr"}
DEFAULT_MAX_PIXELS = 2048 * 2048
TILE = 1024
_SEED = 123
_GUARD_LOCK = threading.RLock()


# --------------------------------------------------------------------------- metric facts


@lru_cache(maxsize=1)
def pyiqa_configs() -> dict[str, dict]:
    """pyiqa's DEFAULT_CONFIGS, read without importing pyiqa itself (which takes seconds)."""
    loaded = sys.modules.get("pyiqa.default_model_configs")
    if loaded is not None:
        return dict(loaded.DEFAULT_CONFIGS)
    spec = importlib.util.find_spec("pyiqa")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "default_model_configs.py"
    mod_spec = importlib.util.spec_from_file_location("_fape_pyiqa_configs", path)
    if mod_spec is None or mod_spec.loader is None:
        return {}
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return dict(module.DEFAULT_CONFIGS)


@dataclass(frozen=True)
class MetricInfo:
    name: str  # fape's name (the weights.toml model name where there is one)
    pyiqa_name: str
    mode: str  # "FR" (needs a reference), "NR" or "set" (folder against folder)
    lower_better: bool
    large_images: str  # "exact", "tile", "downscale", "crops", "limit"
    entry: ModelEntry | None  # None for a pyiqa metric weights.toml does not declare

    @property
    def direction(self) -> str:
        return "lower" if self.lower_better else "higher"


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    return ALIASES.get(key, key)


def metric_info(name: str) -> MetricInfo:
    """Facts about a metric: fape's manifest first, then any pyiqa metric by its name."""
    name = canonical_name(name)
    manifest = load_manifest()
    entry = manifest.get(name)
    if entry is not None and entry.kind != "metric":
        entry = None
    options = entry.options if entry else {}
    pyiqa_name = options.get("pyiqa", name)
    config = pyiqa_configs().get(pyiqa_name)
    if entry is None and config is None:
        known = sorted(n for n, e in manifest.items() if e.kind == "metric")
        raise UsageError(
            f"unknown metric {name!r}; fape declares {', '.join(known)} (or any pyiqa metric)"
        )
    config = config or {}
    mode = options.get("mode") or config.get("metric_mode", "NR")
    if pyiqa_name == "fid":
        mode = "set"
    lower = bool(config.get("lower_better", False))
    large = options.get("large_images", "exact" if name in EXACT else "downscale")
    return MetricInfo(name, pyiqa_name, mode, lower, large, entry)


def list_metrics() -> list[MetricInfo]:
    """Every metric weights.toml declares, in manifest order."""
    return [metric_info(n) for n, e in load_manifest().items() if e.kind == "metric"]


def required_entries(info: MetricInfo) -> list[ModelEntry]:
    """The metric's own manifest entry plus the backbones it names in options.requires."""
    if info.entry is None:
        return []
    return [info.entry] + [get_model(r) for r in info.entry.options.get("requires", [])]


def missing_weights(name: str) -> list[str]:
    """One message per file the metric needs that is nowhere to be found (empty: all there)."""
    info = metric_info(name)
    problems = [
        missing_message(entry, f)
        for entry in required_entries(info)
        for f in entry.files
        if find_file(entry, f) is None
    ]
    if info.pyiqa_name == "niqe":
        from fapecli.scoring import niqe

        try:
            niqe.load_params()
        except WeightsError as exc:
            problems.append(str(exc))
    return problems


# --------------------------------------------------------------------------- exact PSNR / SSIM


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x * x) / (2 * sigma * sigma))
    return w / w.sum()


_WINDOW = _gaussian_window()
_PAD = len(_WINDOW) - 1


def _luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 Y in [16/255, 235/255] from RGB in [0, 1] (float64, keeps a channel axis)."""
    y = 16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]
    return (y / 255.0)[..., None]


def comparison_space(a: np.ndarray, b: np.ndarray, y_channel: bool) -> str:
    """ "grey" when both are single-channel, else "y" or "rgb"."""
    if a.shape[2] == 1 and b.shape[2] == 1:
        return "grey"
    return "y" if y_channel else "rgb"


def _plane(pixels: np.ndarray, rows: slice, space: str) -> np.ndarray:
    block = pixels[rows].astype(np.float64)
    if space == "grey":
        return block
    if block.shape[2] == 1:
        block = np.repeat(block, 3, axis=2)
    return _luma(block) if space == "y" else block


def _crop(pixels: np.ndarray, border: int) -> np.ndarray:
    if border <= 0:
        return pixels
    return pixels[border:-border, border:-border]


def _strip_rows(width: int, channels: int) -> int:
    return max(64, (1 << 22) // max(1, width * channels))


def psnr(a: np.ndarray, b: np.ndarray, *, y_channel: bool = False, crop_border: int = 0) -> float:
    """PSNR in dB of H x W x C float arrays in [0, 1] (inf for identical images)."""
    a, b = _crop(a, crop_border), _crop(b, crop_border)
    _check_same(a, b)
    space = comparison_space(a, b, y_channel)
    total, count = 0.0, 0
    step = _strip_rows(a.shape[1], 3)
    for r in range(0, a.shape[0], step):
        rows = slice(r, r + step)
        diff = _plane(a, rows, space) - _plane(b, rows, space)
        total += float(np.einsum("ijk,ijk->", diff, diff))
        count += diff.size
    if count == 0:
        raise ValueError("nothing left to compare after crop_border")
    mse = total / count
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _filter_valid(x: np.ndarray) -> np.ndarray:
    """Separable 11x11 Gaussian filter keeping only fully covered ('valid') positions."""
    import cv2

    pad = _PAD // 2
    out = cv2.sepFilter2D(x, cv2.CV_64F, _WINDOW, _WINDOW, borderType=cv2.BORDER_REFLECT)
    return out.reshape(x.shape)[pad:-pad, pad:-pad]


def _ssim_sum(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Sum and count of the SSIM map of two same-size float64 blocks (in-place arithmetic)."""
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = _filter_valid(a), _filter_valid(b)
    s_ab = _filter_valid(a * b)
    s_aa_bb = _filter_valid(a * a)
    s_aa_bb += _filter_valid(b * b)
    mu_ab = mu_a * mu_b
    np.multiply(mu_a, mu_a, out=mu_a)
    np.multiply(mu_b, mu_b, out=mu_b)
    mu_a += mu_b  # mu_a^2 + mu_b^2
    s_aa_bb -= mu_a  # var_a + var_b
    s_aa_bb += c2
    mu_a += c1
    s_ab -= mu_ab  # covariance
    s_ab *= 2
    s_ab += c2
    mu_ab *= 2
    mu_ab += c1
    mu_ab *= s_ab  # numerator
    mu_a *= s_aa_bb  # denominator
    mu_ab /= mu_a
    return float(mu_ab.sum()), mu_ab.size


def ssim(a: np.ndarray, b: np.ndarray, *, y_channel: bool = False, crop_border: int = 0) -> float:
    """Mean SSIM of H x W x C float arrays in [0, 1] (channels averaged)."""
    a, b = _crop(a, crop_border), _crop(b, crop_border)
    _check_same(a, b)
    h, w = a.shape[:2]
    if h <= _PAD or w <= _PAD:
        raise ValueError(
            f"image too small for SSIM ({w}x{h}; needs at least 11x11 after crop_border)"
        )
    space = comparison_space(a, b, y_channel)
    total, count = 0.0, 0
    step = _strip_rows(w, 3)
    for r in range(0, h - _PAD, step):
        rows = slice(r, min(h, r + step + _PAD))
        s, n = _ssim_sum(_plane(a, rows, space), _plane(b, rows, space))
        total += s
        count += n
    return total / count


def _check_same(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"sizes differ: {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}")


class ExactMetric:
    """PSNR or SSIM as computed above (what `load_model("psnr")` returns)."""

    def __init__(self, info: MetricInfo) -> None:
        self.info = info
        self._fn = psnr if info.name == "psnr" else ssim

    def __call__(
        self, output: np.ndarray, ref: np.ndarray, *, y_channel: bool = False, crop_border: int = 0
    ) -> float:
        return self._fn(output, ref, y_channel=y_channel, crop_border=crop_border)


# --------------------------------------------------------------------------- offline guard


def _file_map(info: MetricInfo) -> dict[str, Path]:
    """File name -> found path for every file the metric and its backbones declare."""
    found: dict[str, Path] = {}
    for entry in required_entries(info):
        for f in entry.files:
            path = find_file(entry, f)
            if path is None:
                raise WeightsError(missing_message(entry, f))
            found[Path(f.path).name] = path
    return found


def _refuse(name: str, url: str, folder: Path) -> WeightsError:
    return WeightsError(
        f"{name} is needed ({url}) but is not declared in weights.toml or not present; "
        f"fape does not download: put it in {folder}"
    )


@contextlib.contextmanager
def _patched(target: Any, attr: str, value: Any) -> Iterator[None]:
    saved = getattr(target, attr)
    setattr(target, attr, value)
    try:
        yield
    finally:
        setattr(target, attr, saved)


def _ensure_pkg_resources() -> None:
    """openai-clip (CLIP-IQA's tokenizer) does ``from pkg_resources import packaging``, which
    setuptools >= 81 no longer provides; give it a stand-in holding just that name."""
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        return
    import types

    import packaging.version

    shim = types.ModuleType("pkg_resources")
    shim.packaging = packaging  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = shim


def _import_arch(pyiqa_name: str) -> None:
    """Import the pyiqa arch module of a metric now, so that it binds pyiqa's own functions
    (pyiqa >= 0.1.16 imports arch modules lazily, on first use)."""
    import pyiqa.archs

    net_type = pyiqa_configs().get(pyiqa_name, {}).get("metric_opts", {}).get("type")
    lazy = getattr(pyiqa.archs, "_lazy_import_arch", None)
    if net_type and lazy is not None:
        lazy(net_type)


@contextlib.contextmanager
def offline_pyiqa(
    files: dict[str, Path], *, pyiqa_name: str = "", backbone_in_checkpoint: bool = False
) -> Iterator[None]:
    """Build pyiqa models with every download replaced by a lookup in ``files`` (or refused).

    ``backbone_in_checkpoint`` makes timm build its backbones without pretrained weights,
    for models whose own checkpoint is loaded strictly and so overwrites the backbone.
    """
    _ensure_pkg_resources()
    import pyiqa.utils.download_util as download_util
    import torch
    import torch.hub
    import torchvision.models._api as tv_api

    if pyiqa_name:
        _import_arch(pyiqa_name)
    hub = Path(torch.hub.get_dir())

    def local(url: str, folder: Path, file_name: str | None = None) -> Path:
        name = file_name or os.path.basename(urlparse(url).path)
        for candidate in (files.get(name), folder / name):
            if candidate is not None and candidate.is_file():
                return candidate
        raise _refuse(name, url, folder)

    def load_file_from_url(
        url: str, model_dir: str | None = None, progress: bool = True, file_name: str | None = None
    ) -> str:
        return str(local(url, Path(model_dir) if model_dir else hub / "pyiqa", file_name))

    def load_state_dict_from_url(
        url: str,
        model_dir: str | None = None,
        map_location: Any = None,
        progress: bool = True,
        check_hash: bool = False,
        file_name: str | None = None,
        weights_only: bool = True,
    ) -> Any:
        path = local(url, Path(model_dir) if model_dir else hub / "checkpoints", file_name)
        return torch.load(path, map_location=map_location or "cpu", weights_only=weights_only)

    def clip_download(url: str, root: str) -> str:
        return str(local(url, Path(root)))

    def no_download(url: str, dst: str, *args: Any, **kwargs: Any) -> None:
        raise _refuse(os.path.basename(dst), url, Path(dst).parent)

    originals = {
        "load_file_from_url": download_util.load_file_from_url,
        "download_url_to_file": download_util.download_url_to_file,
    }
    replacements = {"load_file_from_url": load_file_from_url, "download_url_to_file": no_download}
    with contextlib.ExitStack() as stack:
        stack.callback(_unbind, replacements, originals)
        for mod_name, module in list(sys.modules.items()):
            if not mod_name.startswith("pyiqa"):
                continue
            for attr, value in replacements.items():
                if hasattr(module, attr):
                    stack.enter_context(_patched(module, attr, value))
        clip_model = sys.modules.get("pyiqa.archs.clip_model")
        if clip_model is not None:
            stack.enter_context(_patched(clip_model, "_download", clip_download))
        stack.enter_context(_patched(tv_api, "load_state_dict_from_url", load_state_dict_from_url))
        stack.enter_context(
            _patched(torch.hub, "load_state_dict_from_url", load_state_dict_from_url)
        )
        stack.enter_context(_patched(torch.hub, "download_url_to_file", no_download))
        stack.enter_context(_hf_offline())
        if backbone_in_checkpoint:
            stack.enter_context(_timm_without_pretrained())
        yield


def _unbind(replacements: dict[str, Any], originals: dict[str, Any]) -> None:
    """Give pyiqa modules first imported inside the guard back pyiqa's own functions."""
    for mod_name, module in list(sys.modules.items()):
        if mod_name.startswith("pyiqa"):
            for attr, value in replacements.items():
                if getattr(module, attr, None) is value:
                    setattr(module, attr, originals[attr])


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    try:
        if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
            with _patched(constants, "HF_HUB_OFFLINE", True):
                yield
        else:
            yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


@contextlib.contextmanager
def _timm_without_pretrained() -> Iterator[None]:
    import timm

    original = timm.create_model

    def create_model(*args: Any, **kwargs: Any) -> Any:
        kwargs["pretrained"] = False
        return original(*args, **kwargs)

    with _patched(timm, "create_model", create_model):
        yield


# --------------------------------------------------------------------------- pyiqa metrics


def _pyiqa_kwargs(info: MetricInfo) -> dict[str, Any]:
    if info.pyiqa_name == "niqe":
        from fapecli.scoring import niqe

        return {"pretrained_model_path": str(niqe.params_file())}
    if info.pyiqa_name.startswith("topiq"):
        return {"backbone_pretrain": False}
    return {}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pyiqa prints ("Loading pretrained model ...") and warns; a library must not."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class PyiqaMetric:
    """A pyiqa model on a device; call with 1x3xHxW tensors in [0, 1]."""

    def __init__(self, info: MetricInfo, model: Any, device: torch.device) -> None:
        self.info = info
        self.model = model
        self.device = device

    def __call__(self, output: torch.Tensor, ref: torch.Tensor | None = None) -> float:
        import torch

        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), _quiet():
            torch.manual_seed(_SEED)
            out = output.to(self.device)
            value = (
                self.model(out, ref.to(self.device)) if self.info.mode == "FR" else self.model(out)
            )
        return float(torch.as_tensor(value).float().mean())

    def folders(self, outputs: Path, refs: Path) -> float:
        """Set metrics (FID): compare two folders of images."""
        with _quiet():
            value = self.model.net(
                str(outputs), str(refs), device=self.device, num_workers=0, verbose=False
            )
        return float(value)


def build_pyiqa(info: MetricInfo, device: torch.device) -> PyiqaMetric:
    """Create the pyiqa model offline (WeightsError naming the file if one is missing)."""
    files = _file_map(info)
    kwargs = _pyiqa_kwargs(info)
    in_ckpt = bool(info.entry and info.entry.options.get("backbone_in_checkpoint"))
    guard = offline_pyiqa(files, pyiqa_name=info.pyiqa_name, backbone_in_checkpoint=in_ckpt)
    with _GUARD_LOCK, guard:
        import pyiqa

        with _quiet():
            model = pyiqa.create_metric(info.pyiqa_name, device=device, as_loss=False, **kwargs)
    model.eval()
    return PyiqaMetric(info, model, device)


@register_builder("metric")
def _build_metric(
    entry: ModelEntry, files: dict[str, Path], device: torch.device, dtype: Any
) -> Any:
    """Loader builder: `load_model("lpips")` etc. (metrics always run in float32)."""
    info = metric_info(entry.name)
    if info.name in EXACT:
        return ExactMetric(info)
    return build_pyiqa(info, device)


_ADHOC: dict[tuple[str, str], PyiqaMetric] = {}


def get_metric(name: str, device: torch.device) -> ExactMetric | PyiqaMetric:
    """A ready metric: via fapecli.loader (cached), or ad hoc for pyiqa metrics not declared."""
    info = metric_info(name)
    if info.name in EXACT:
        return ExactMetric(info)
    if info.entry is not None:
        from fapecli.loader import load_model

        return load_model(info.name, device=device, precision="fp32")
    key = (info.name, str(device))
    if key not in _ADHOC:
        _ADHOC[key] = build_pyiqa(info, device)
    return _ADHOC[key]


# --------------------------------------------------------------------------- large images


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """H x W x 3 float array -> 1 x 3 x H x W float32 tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]


def _downscale(t: torch.Tensor, max_pixels: int) -> torch.Tensor:
    import torch.nn.functional as F

    h, w = t.shape[-2:]
    scale = math.sqrt(max_pixels / (h * w))
    size = (max(1, int(h * scale)), max(1, int(w * scale)))
    return F.interpolate(t, size=size, mode="area").clamp_(0.0, 1.0)


def _tiles(h: int, w: int, tile: int) -> Iterator[tuple[slice, slice]]:
    rows = np.array_split(np.arange(h), math.ceil(h / tile))
    cols = np.array_split(np.arange(w), math.ceil(w / tile))
    for r in rows:
        for c in cols:
            yield slice(int(r[0]), int(r[-1]) + 1), slice(int(c[0]), int(c[-1]) + 1)


def run_learned(
    metric: PyiqaMetric, out: torch.Tensor, ref: torch.Tensor | None, max_pixels: int
) -> tuple[float, str]:
    """The metric's value and a note saying how a large image was handled ("" if as is)."""
    h, w = out.shape[-2:]
    policy = metric.info.large_images
    if h * w <= max_pixels or policy == "crops":
        return metric(out, ref), ""
    if policy == "limit":
        if h * w > 4 * max_pixels:
            raise ValueError(
                f"image too large for {metric.info.name} ({w}x{h}; limit {4 * max_pixels} pixels)"
            )
        return metric(out, ref), ""
    if policy == "tile":
        total, area = 0.0, 0
        for rs, cs in _tiles(h, w, TILE):
            part = metric(out[..., rs, cs], None if ref is None else ref[..., rs, cs])
            n = (rs.stop - rs.start) * (cs.stop - cs.start)
            total, area = total + part * n, area + n
        return total / area, f"{metric.info.name}: {w}x{h} scored in {TILE} px tiles"
    small = _downscale(out, max_pixels)
    small_ref = None if ref is None else _downscale(ref, max_pixels)
    note = f"{metric.info.name}: {w}x{h} downscaled to {small.shape[-1]}x{small.shape[-2]}"
    return metric(small, small_ref), note
