"""Reading and writing images: pixels as float32 in [0, 1], metadata carried along.

Pixels are decoded by Pillow, except 16-bit colour PNG/TIFF, which Pillow would reduce to
8 bits and OpenCV decodes instead. Pillow always supplies the header facts (format, size,
mode, EXIF, ICC), so the decompression-bomb guard runs before any pixel is decoded.

Writing uses Pillow for 8-bit files (it writes ICC and EXIF for PNG, JPEG, WebP and TIFF)
and OpenCV for 16-bit PNG/TIFF; 16-bit PNG gets its iCCP/eXIf chunks added here, 16-bit
TIFF is written without ICC/EXIF. Files are written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image as PILImage

from fapecli.errors import ImageError, UsageError

DEFAULT_MAX_PIXELS = 400_000_000
"""Decompression-bomb guard: images with more pixels than this are refused unread."""

FORMATS = ("png", "jpeg", "tiff", "bmp", "webp")
EXTENSION_FORMATS = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".bmp": "bmp",
    ".webp": "webp",
}
SIXTEEN_BIT_FORMATS = frozenset({"png", "tiff"})

_PIL_FORMATS = {
    "PNG": "png",
    "JPEG": "jpeg",
    "MPO": "jpeg",
    "TIFF": "tiff",
    "BMP": "bmp",
    "DIB": "bmp",
    "WEBP": "webp",
}
_ORIENTATION = 0x0112
_EXIF_HEADER = b"Exif\x00\x00"
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
# IFD0 tags of a TIFF that describe the picture (not its storage) and so travel as EXIF.
_TIFF_EXIF_TAGS = (270, 271, 272, 282, 283, 296, 305, 306, 315, 33432)
_PIL_LOCK = threading.Lock()


class _Keep(Enum):
    KEEP = "keep"


KEEP = _Keep.KEEP
"""Sentinel for ``Image.with_pixels(alpha=KEEP)``: keep (and resize) the current alpha."""


@dataclass(eq=False)
class Image:
    """An image as float32 pixels in [0, 1] plus what is needed to write it back faithfully."""

    pixels: np.ndarray  # float32, H x W x C with C in {1, 3}
    alpha: np.ndarray | None = None  # float32, H x W
    bit_depth: int = 8  # 8 or 16: what the file had
    icc_profile: bytes | None = None
    exif: bytes | None = None  # b"Exif\0\0" + TIFF-structured EXIF, orientation already 1
    source: str | None = None  # the path it was read from, "-" for stdin
    format: str | None = None  # "png", "jpeg", "tiff", "bmp" or "webp"

    def __post_init__(self) -> None:
        if self.pixels.ndim == 2:
            self.pixels = self.pixels[:, :, None]
        if self.pixels.ndim != 3 or self.pixels.shape[2] not in (1, 3):
            raise ValueError(f"pixels must be H x W x 1 or H x W x 3, not {self.pixels.shape}")
        if self.alpha is not None and self.alpha.shape != self.pixels.shape[:2]:
            raise ValueError(f"alpha must be {self.pixels.shape[:2]}, not {self.alpha.shape}")
        if self.bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, not {self.bit_depth}")

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def is_grey(self) -> bool:
        return self.pixels.shape[2] == 1

    @property
    def megapixels(self) -> float:
        return self.height * self.width / 1e6

    @property
    def rgb(self) -> np.ndarray:
        """H x W x 3 float32 pixels (grey replicated to three channels)."""
        return np.repeat(self.pixels, 3, axis=2) if self.is_grey else self.pixels

    def with_pixels(self, pixels: np.ndarray, alpha: np.ndarray | _Keep | None = KEEP) -> Image:
        """A new Image with these pixels (clipped to [0, 1]) and the same metadata.

        ``alpha=KEEP`` keeps the current alpha, resized if the size changed; ``None`` drops it.
        """
        pixels = np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if alpha is KEEP:
            alpha = self.alpha
            if alpha is not None and alpha.shape != pixels.shape[:2]:
                alpha = _resize_plane(alpha, pixels.shape[0], pixels.shape[1])
        elif alpha is not None:
            alpha = np.clip(np.asarray(alpha, dtype=np.float32), 0.0, 1.0)
        return replace(self, pixels=pixels, alpha=alpha)


# --------------------------------------------------------------------------- reading


def read_image(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image:
    """Read an image file ("-" reads stdin); raises ImageError naming the file."""
    if str(path) == "-":
        data = sys.stdin.buffer.read()
        return replace(decode_image(data, "<stdin>", max_pixels=max_pixels), source="-")
    data = _read_bytes(Path(path))
    return replace(decode_image(data, str(path), max_pixels=max_pixels), source=str(path))


def decode_image(
    data: bytes, name: str = "<bytes>", *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image:
    """Decode an encoded image; ``name`` is only used in error messages."""
    with _quiet():
        return _decode(data, name, max_pixels)


def _decode(data: bytes, name: str, max_pixels: int | None) -> Image:
    if not data:
        raise ImageError("file is empty", name)
    pil = _open_header(data, name)
    fmt = _PIL_FORMATS.get(pil.format or "")
    if fmt is None:
        raise ImageError(f"unsupported image format ({pil.format})", name)
    width, height = pil.size
    if width <= 0 or height <= 0:
        raise ImageError(f"invalid image size {width}x{height}", name)
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"image too large ({width}x{height} = {width * height / 1e6:.0f} megapixels; "
            f"limit {max_pixels / 1e6:g})",
            name,
        )
    bits = _bits_per_sample(pil, data, fmt, name)
    try:
        if bits == 16 and not _is_grey16_mode(pil.mode):
            arr, alpha, oriented = _decode_cv2(pil, data, name)
        else:
            arr, alpha, oriented = (*_decode_pil(pil, name), False)
    except MemoryError:
        raise ImageError(f"not enough memory to decode {width}x{height} pixels", name) from None
    orientation = _orientation(pil, fmt)
    if orientation != 1 and not oriented:
        arr = _apply_orientation(arr, orientation)
        alpha = None if alpha is None else _apply_orientation(alpha, orientation)
    bits = 16 if arr.dtype == np.uint16 else 8
    return Image(
        pixels=_to_float(arr),
        alpha=None if alpha is None else _to_float(alpha)[:, :, 0],
        bit_depth=bits,
        icc_profile=pil.info.get("icc_profile") or None,
        exif=_exif_bytes(pil, fmt, orientation),
        format=fmt,
    )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError("no such file", path) from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file", path) from None
    except PermissionError:
        raise ImageError("permission denied", path) from None
    except OSError as e:
        raise ImageError(f"cannot read file ({e.strerror or e})", path) from None


@contextlib.contextmanager
def _no_pillow_bomb_check() -> Iterator[None]:
    """Pillow's own bomb check refuses images we may allow; ours runs right after."""
    with _PIL_LOCK:
        saved = PILImage.MAX_IMAGE_PIXELS
        PILImage.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            PILImage.MAX_IMAGE_PIXELS = saved


def _open_header(data: bytes, name: str) -> PILImage.Image:
    """Pillow's lazy open: reads the header only, no pixels."""
    try:
        with _no_pillow_bomb_check():
            return PILImage.open(io.BytesIO(data))
    except Exception:
        kind = _sniff(data)
        if kind is None:
            raise ImageError("not an image (unrecognised format)", name) from None
        if kind == "TIFF":
            problem = "TIFF file is truncated, corrupt or of an unsupported kind"
            raise ImageError(problem, name) from None
        raise ImageError("file is truncated or corrupt", name) from None


def _sniff(data: bytes) -> str | None:
    """The format a file claims by its first bytes, for error messages."""
    signatures = {
        b"\x89PNG\r\n\x1a\n": "PNG",
        b"\xff\xd8\xff": "JPEG",
        b"II*\x00": "TIFF",
        b"MM\x00*": "TIFF",
        b"II+\x00": "TIFF",
        b"MM\x00+": "TIFF",
        b"BM": "BMP",
    }
    for magic, kind in signatures.items():
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _bits_per_sample(pil: PILImage.Image, data: bytes, fmt: str, name: str) -> int:
    """8 or 16; anything else (float, 32-bit) is refused."""
    if pil.mode == "F":
        raise ImageError("unsupported bit depth (32-bit float)", name)
    if fmt == "png" and data[12:16] == b"IHDR":
        return 16 if data[24] == 16 else 8
    if fmt != "tiff":
        if pil.mode in ("I", "I;32"):
            raise ImageError("unsupported bit depth (32-bit integer)", name)
        return 8
    tags = pil.tag_v2  # type: ignore[attr-defined]
    bits = tags.get(258, 1)
    bits = max(bits) if isinstance(bits, tuple) else int(bits)
    sample_format = tags.get(339, 1)
    sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
    if sample_format == 3:
        raise ImageError(f"unsupported bit depth ({bits}-bit float)", name)
    if bits > 16 or bits not in (1, 2, 4, 8, 16):
        raise ImageError(f"unsupported bit depth ({bits}-bit)", name)
    return 16 if bits == 16 else 8


def _is_grey16_mode(mode: str) -> bool:
    return mode.startswith("I;16") or mode == "I"


# Pillow modes and what to convert them to before handing pixels to numpy.
_PIL_CONVERSIONS = {
    "1": "L",
    "P": "RGB",
    "PA": "RGBA",
    "La": "LA",
    "RGBa": "RGBA",
    "RGBX": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "LAB": "RGB",
    "HSV": "RGB",
}
_WITH_ALPHA = {"L": "LA", "P": "RGBA", "RGB": "RGBA"}


def _decode_pil(pil: PILImage.Image, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Pixels as uint8/uint16 H x W x C (C in {1, 3}) and alpha H x W x 1, via Pillow."""
    try:
        pil.load()
        mode = pil.mode
        if "transparency" in pil.info and mode in _WITH_ALPHA:
            pil, mode = pil.convert(_WITH_ALPHA[mode]), _WITH_ALPHA[mode]
        elif mode in _PIL_CONVERSIONS:
            pil, mode = pil.convert(_PIL_CONVERSIONS[mode]), _PIL_CONVERSIONS[mode]
        arr = np.asarray(pil)
    except MemoryError:
        raise
    except Exception:
        raise ImageError("file is truncated or corrupt", name) from None
    if _is_grey16_mode(mode):
        return arr.astype(np.uint16)[:, :, None], None
    if mode not in ("L", "LA", "RGB", "RGBA"):
        raise ImageError(f"unsupported colour mode ({mode})", name)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if mode in ("LA", "RGBA"):
        return arr[:, :, :-1], arr[:, :, -1:]
    return arr, None


def _decode_cv2(
    pil: PILImage.Image, data: bytes, name: str
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """16-bit colour pixels via OpenCV; the bool says whether orientation was already applied."""
    if pil.mode not in ("RGB", "RGBA", "LA", "RGBX"):
        raise ImageError(f"unsupported 16-bit colour mode ({pil.mode})", name)
    flags = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        arr = None
    if arr is None:
        raise ImageError("file is truncated or corrupt", name)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    channels = arr.shape[2]
    if channels not in (1, 3, 4):
        raise ImageError(f"unsupported channel count ({channels})", name)
    if channels >= 3:
        arr = arr[:, :, [2, 1, 0, 3][:channels]]  # BGR(A) -> RGB(A)
    alpha = arr[:, :, 3:] if channels == 4 else None
    arr = arr[:, :, :3]
    if pil.mode.startswith("L"):
        arr = arr[:, :, :1]
    if not ("A" in pil.mode or "transparency" in pil.info):
        alpha = None
    oriented = pil.format == "TIFF" and _cv2_applied_orientation(pil, arr)
    return arr, alpha, oriented


def _cv2_applied_orientation(pil: PILImage.Image, arr: np.ndarray) -> bool:
    """Whether OpenCV's TIFF reader (libtiff) already turned the pixels upright.

    Some OpenCV builds do this despite IMREAD_IGNORE_ORIENTATION; compare with Pillow's
    (unrotated, 8-bit) decode to find out. Only called for 16-bit colour TIFF.
    """
    orientation = int(pil.getexif().get(_ORIENTATION, 1) or 1)
    if orientation == 1:
        return False
    if orientation >= 5 and arr.shape[:2] != pil.size[::-1]:
        return True
    try:
        reference = np.asarray(pil.convert("RGB"))[:, :, : arr.shape[2]]
    except Exception:
        return False
    upright = _apply_orientation(reference, orientation).astype(np.int32)
    as_read = (arr >> 8).astype(np.int32)
    if as_read.shape != upright.shape:
        return False
    as_is = np.abs(as_read - upright).mean()
    rotated = _apply_orientation(as_read, orientation)
    return bool(rotated.shape != upright.shape or as_is <= np.abs(rotated - upright).mean())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Pillow's warnings and OpenCV's log chatter about bad input: we raise instead."""
    logging = getattr(cv2.utils, "logging", None)
    saved = logging.getLogLevel() if logging is not None else None
    if logging is not None:
        logging.setLogLevel(logging.LOG_LEVEL_ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if logging is not None:
            logging.setLogLevel(saved)


def _orientation(pil: PILImage.Image, fmt: str) -> int:
    try:
        value = int(pil.getexif().get(_ORIENTATION, 1) or 1) if _has_exif(pil, fmt) else 1
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def _has_exif(pil: PILImage.Image, fmt: str) -> bool:
    return fmt == "tiff" or bool(pil.info.get("exif"))


def _apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels (rows x cols x ...) upright per the EXIF orientation (1-8)."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: a[::-1].swapaxes(0, 1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: a[:, ::-1].swapaxes(0, 1),
    }
    return np.ascontiguousarray(ops[orientation](arr))


def _to_float(arr: np.ndarray) -> np.ndarray:
    out = arr.astype(np.float32, order="C")
    out *= np.float32(1.0 / (65535.0 if arr.dtype == np.uint16 else 255.0))
    return out


def _exif_bytes(pil: PILImage.Image, fmt: str, orientation: int) -> bytes | None:
    """The file's EXIF block with orientation reset to 1 (None if it had none)."""
    try:
        if fmt == "tiff":
            return _tiff_exif(pil)
        raw = pil.info.get("exif")
        if not raw:
            return None
        if not raw.startswith(_EXIF_HEADER):
            raw = _EXIF_HEADER + raw
        return _reset_orientation(raw) if orientation != 1 else raw
    except Exception:
        return None  # unreadable EXIF is dropped rather than failing the read


def _reset_orientation(exif: bytes) -> bytes:
    """Set the orientation tag to 1, patching its bytes in place (keeps maker notes intact)."""
    tiff = memoryview(exif)[len(_EXIF_HEADER) :]
    order = {b"II": "<", b"MM": ">"}.get(bytes(tiff[:2]))
    if order is not None:
        try:
            (ifd0,) = struct.unpack_from(order + "I", tiff, 4)
            (count,) = struct.unpack_from(order + "H", tiff, ifd0)
            for i in range(count):
                entry = ifd0 + 2 + 12 * i
                tag, kind = struct.unpack_from(order + "HH", tiff, entry)
                if tag == _ORIENTATION and kind == 3:  # SHORT
                    patched = bytearray(exif)
                    struct.pack_into(order + "H", patched, len(_EXIF_HEADER) + entry + 8, 1)
                    return bytes(patched)
        except struct.error:
            pass
    parsed = PILImage.Exif()
    parsed.load(exif)
    parsed[_ORIENTATION] = 1
    return parsed.tobytes()


def _tiff_exif(pil: PILImage.Image) -> bytes | None:
    """EXIF for a TIFF: its descriptive IFD0 tags plus the EXIF and GPS sub-IFDs."""
    tags = pil.getexif()
    exif = PILImage.Exif()
    for tag in _TIFF_EXIF_TAGS:
        if tag in tags:
            exif[tag] = tags[tag]
    for ifd in (_EXIF_IFD, _GPS_IFD):
        if ifd in tags and tags.get_ifd(ifd):
            exif[ifd] = dict(tags.get_ifd(ifd))
    return exif.tobytes() if len(exif) else None


# --------------------------------------------------------------------------- arrays


def from_array(arr: np.ndarray) -> Image:
    """Wrap a uint8/uint16/bool/float array (H x W, or H x W x 1/2/3/4) as an Image.

    Floats are clipped to [0, 1]; a 2nd or 4th channel is alpha; uint16 gives bit_depth 16.
    """
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or 0 in arr.shape:
        raise ValueError(f"expected an H x W or H x W x 1/2/3/4 array, not shape {arr.shape}")
    if arr.dtype == np.uint8 or arr.dtype == np.uint16:
        bits, values = (16 if arr.dtype == np.uint16 else 8), _to_float(arr)
    elif arr.dtype == np.bool_:
        bits, values = 8, arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.floating):
        bits, values = 8, np.clip(arr.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"expected a uint8, uint16, bool or float array, not {arr.dtype}")
    has_alpha = values.shape[2] in (2, 4)
    pixels = values[:, :, :-1] if has_alpha else values
    alpha = values[:, :, -1] if has_alpha else None
    return Image(pixels=np.ascontiguousarray(pixels), alpha=alpha, bit_depth=bits)


def _resize_plane(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    shrink = height * width < plane.shape[0] * plane.shape[1]
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    resized = cv2.resize(plane.astype(np.float32), (width, height), interpolation=interpolation)
    return np.clip(resized, 0.0, 1.0)


# --------------------------------------------------------------------------- writing


def format_for_path(path: str | Path) -> str:
    """The output format an extension names; ImageError for anything else."""
    ext = Path(path).suffix.lower()
    fmt = EXTENSION_FORMATS.get(ext)
    if fmt is None:
        known = ", ".join(sorted(EXTENSION_FORMATS))
        raise ImageError(f"unsupported output extension {ext or '(none)'!r} (use {known})", path)
    return fmt


def write_image(
    image: Image, path: str | Path, *, quality: int = 95, bit_depth: int | None = None
) -> Path:
    """Write atomically, format from the extension ("-" writes PNG to stdout).

    ``bit_depth`` None keeps the image's depth where the format can store it (else 8).
    Creates missing parent folders; refuses to overwrite the image's own source file.
    """
    if str(path) == "-":
        data = _encode_named(image, "png", "<stdout>", quality, bit_depth)
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return Path("-")
    path = Path(path)
    if path.is_dir():
        raise ImageError("is a directory", path)
    if _is_source(image, path):
        raise ImageError("refusing to overwrite the input image", path)
    data = _encode_named(image, format_for_path(path), str(path), quality, bit_depth)
    atomic_write(path, data)
    return path


def _encode_named(image: Image, fmt: str, name: str, quality: int, bits: int | None) -> bytes:
    try:
        return encode_image(image, fmt, quality=quality, bit_depth=bits)
    except ImageError as e:
        if e.path is None:
            raise ImageError(str(e), name) from None
        raise


def _is_source(image: Image, path: Path) -> bool:
    if not image.source or image.source == "-":
        return False
    source = Path(image.source)
    try:
        if path.exists() and source.exists():
            return os.path.samefile(path, source)
    except OSError:
        pass
    return path.resolve() == source.resolve()


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write bytes via a hidden temp file in the same folder, fsync, then rename over path.

    On any failure the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageError("is a directory", path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fd = _create_temp(path)
    except OSError as e:
        raise ImageError(f"cannot write ({e.strerror or e})", path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise ImageError(f"cannot write ({e.strerror or e})", path) from None
        raise
    _fsync_dir(path.parent)


def _create_temp(path: Path) -> tuple[Path, int]:
    """A new ``.NAME.RANDOM.part`` file next to path, created with the usual permissions."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (best effort; not possible on every platform)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def encode_image(
    image: Image, fmt: str, *, quality: int = 95, bit_depth: int | None = None
) -> bytes:
    """Encode to "png", "jpeg", "tiff", "bmp" or "webp" bytes (a leading dot is fine).

    JPEG and BMP drop alpha; WebP stores grey as RGB; quality 100 makes WebP lossless.
    """
    fmt = _normalise_format(fmt)
    if not 1 <= quality <= 100:
        raise UsageError(f"quality must be between 1 and 100, not {quality}")
    bits = _output_bits(image, fmt, bit_depth)
    if bits == 16:
        return _encode_cv2(image, fmt)
    return _encode_pil(image, fmt, quality)


def _normalise_format(fmt: str) -> str:
    name = fmt.lower().lstrip(".")
    name = EXTENSION_FORMATS.get("." + name, name)
    if name not in FORMATS:
        raise ImageError(f"unsupported output format {fmt!r} (use {', '.join(FORMATS)})")
    return name


def _output_bits(image: Image, fmt: str, bit_depth: int | None) -> int:
    if bit_depth is None:
        return image.bit_depth if fmt in SIXTEEN_BIT_FORMATS else 8
    if bit_depth not in (8, 16):
        raise UsageError(f"bit depth must be 8 or 16, not {bit_depth}")
    if bit_depth == 16 and fmt not in SIXTEEN_BIT_FORMATS:
        raise ImageError(f"{fmt.upper()} cannot store 16-bit images (use PNG or TIFF)")
    return bit_depth


def _quantise(values: np.ndarray, bits: int) -> np.ndarray:
    scale = 65535.0 if bits == 16 else 255.0
    out = np.clip(values, 0.0, 1.0) * np.float32(scale) + np.float32(0.5)
    return out.astype(np.uint16 if bits == 16 else np.uint8)


def _stacked(image: Image, bits: int, *, alpha: bool, grey: bool) -> np.ndarray:
    """Integer H x W x C array: grey or RGB, plus alpha if wanted and present."""
    pixels = image.pixels if grey and image.is_grey else image.rgb
    planes = [pixels]
    if alpha and image.alpha is not None:
        planes.append(image.alpha[:, :, None])
    stacked = np.concatenate(planes, axis=2) if len(planes) > 1 else pixels
    return _quantise(stacked, bits)


def _icc_for(image: Image, grey: bool) -> bytes | None:
    """The ICC profile, unless its colour space contradicts the output (GRAY vs RGB)."""
    icc = image.icc_profile
    if not icc or len(icc) < 20:
        return icc or None
    space = icc[16:20]
    return icc if space == (b"GRAY" if grey else b"RGB ") else None


def _encode_pil(image: Image, fmt: str, quality: int) -> bytes:
    keeps_alpha = fmt in ("png", "tiff", "webp")
    grey = image.is_grey and fmt != "webp"
    arr = _stacked(image, 8, alpha=keeps_alpha, grey=grey)
    pil = PILImage.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    options: dict[str, Any] = {}
    if fmt != "bmp":
        icc = _icc_for(image, grey)
        if icc:
            options["icc_profile"] = icc
        if image.exif:
            options["exif"] = image.exif
    if fmt == "jpeg":
        options.update(quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "webp":
        options.update(quality=quality, lossless=quality == 100, exact=quality == 100)
    elif fmt == "png":
        options.update(compress_level=6)
    elif fmt == "tiff" and not image.exif:
        options.update(compression="tiff_adobe_deflate")  # libtiff cannot write EXIF sub-IFDs
    buffer = io.BytesIO()
    try:
        pil.save(buffer, format=fmt.upper(), **options)
    except (OSError, ValueError, RuntimeError) as e:
        raise ImageError(f"cannot encode as {fmt.upper()} ({e})") from None
    return buffer.getvalue()


def _encode_cv2(image: Image, fmt: str) -> bytes:
    """16-bit PNG/TIFF via OpenCV (grey + alpha is stored as RGBA, OpenCV has no 2-channel)."""
    arr = _stacked(image, 16, alpha=True, grey=image.alpha is None)
    if arr.shape[2] >= 3:
        arr = arr[:, :, [2, 1, 0, 3][: arr.shape[2]]]  # RGB(A) -> BGR(A)
    params = [cv2.IMWRITE_PNG_COMPRESSION, 3] if fmt == "png" else []
    try:
        ok, encoded = cv2.imencode(f".{fmt}", np.ascontiguousarray(arr), params)
    except cv2.error as e:
        raise ImageError(f"cannot encode as 16-bit {fmt.upper()} ({e.err})") from None
    if not ok:
        raise ImageError(f"cannot encode as 16-bit {fmt.upper()}")
    data = encoded.tobytes()
    if fmt == "png":
        data = _png_with_metadata(data, _icc_for(image, arr.shape[2] == 1), image.exif)
    return data


def _png_with_metadata(png: bytes, icc: bytes | None, exif: bytes | None) -> bytes:
    """Insert iCCP and eXIf chunks right after IHDR."""
    chunks = []
    if icc:
        chunks.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    if exif:
        chunks.append(_png_chunk(b"eXIf", exif.removeprefix(_EXIF_HEADER)))
    if not chunks or png[12:16] != b"IHDR":
        return png
    ihdr_end = 8 + 8 + 13 + 4  # signature, length + type, IHDR data, CRC
    return png[:ihdr_end] + b"".join(chunks) + png[ihdr_end:]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)
