"""Tests for fapecli.io: image read/write round trips, metadata, bad input, discovery."""

from __future__ import annotations

import io
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, ImageCms, ImageOps
from PIL import Image as PILImage

from fapecli.errors import FapeError, ImageError
from fapecli.io import (
    KEEP,
    Image,
    InputItem,
    decode_image,
    discover_images,
    encode_image,
    from_array,
    output_path,
    read_image,
    read_path_list,
    write_image,
)
from fapecli.io import images as images_module

RNG_SEED = 1234
H, W = 24, 32
MAKE = "fape-test-camera"
DATE = "2021:02:03 04:05:06"


# --------------------------------------------------------------------------- helpers


def random_uint(shape: tuple[int, ...], bits: int, seed: int = RNG_SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if bits == 16 else np.uint8
    return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


def layout_shape(layout: str) -> tuple[int, int, int]:
    return (H, W, {"grey": 1, "grey+alpha": 2, "rgb": 3, "rgba": 4}[layout])


def has_alpha(layout: str) -> bool:
    return layout in ("grey+alpha", "rgba")


def as_uint(values: np.ndarray, bits: int) -> np.ndarray:
    scale = 65535 if bits == 16 else 255
    return np.round(values * scale).astype(np.int64)


def smooth_rgb() -> np.ndarray:
    """A real photograph crop (lossy codecs need natural content to be judged fairly)."""
    skdata = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(skdata.astronaut()[100:164, 180:260])


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def exif_block(orientation: int | None = None) -> bytes:
    exif = PILImage.Exif()
    exif[ExifTags.Base.Make] = MAKE
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.IFD.Exif] = {ExifTags.Base.DateTimeOriginal: DATE}
    return exif.tobytes()


def parse_exif(data: bytes) -> PILImage.Exif:
    exif = PILImage.Exif()
    exif.load(data)
    return exif


def pil_bytes(pil: PILImage.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    pil.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def upright(stored: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for stored pixels with this EXIF orientation (from the spec table)."""
    rows, cols = stored.shape[:2]
    shape = (rows, cols) if orientation <= 4 else (cols, rows)
    i, j = np.indices(shape)
    source = {
        1: (i, j),
        2: (i, cols - 1 - j),
        3: (rows - 1 - i, cols - 1 - j),
        4: (rows - 1 - i, j),
        5: (j, i),
        6: (rows - 1 - j, i),
        7: (rows - 1 - j, cols - 1 - i),
        8: (j, cols - 1 - i),
    }[orientation]
    return stored[source]


def assert_one_line_error(excinfo: pytest.ExceptionInfo[ImageError], path: object) -> str:
    message = str(excinfo.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and "Traceback" not in message
    return message


# --------------------------------------------------------------------------- round trips

LOSSLESS_CASES = [
    (fmt, bits, layout)
    for fmt, bit_options in (("png", (8, 16)), ("tiff", (8, 16)), ("webp", (8,)), ("bmp", (8,)))
    for bits in bit_options
    for layout in ("grey", "grey+alpha", "rgb", "rgba")
    if not (fmt == "bmp" and has_alpha(layout))
]


@pytest.mark.parametrize(("fmt", "bits", "layout"), LOSSLESS_CASES)
def test_lossless_round_trip_is_exact(tmp_path: Path, fmt: str, bits: int, layout: str) -> None:
    original = random_uint(layout_shape(layout), bits)
    image = from_array(original)
    assert image.bit_depth == bits
    path = write_image(image, tmp_path / f"out.{fmt}", quality=100)
    back = read_image(path)

    assert back.format == fmt
    assert back.bit_depth == bits
    assert (back.height, back.width) == (H, W)
    assert back.pixels.dtype == np.float32
    colour = original[:, :, : 1 if layout.startswith("grey") else 3]
    # WebP has no grey mode and 16-bit grey+alpha is stored as RGBA: compare as RGB there.
    sixteen_bit_grey_alpha = layout == "grey+alpha" and bits == 16
    stays_grey = layout.startswith("grey") and fmt != "webp" and not sixteen_bit_grey_alpha
    assert back.is_grey == stays_grey
    got = back.pixels if stays_grey else back.rgb
    expected = colour if stays_grey else np.repeat(colour, 3 // colour.shape[2], axis=2)
    np.testing.assert_array_equal(as_uint(got, bits), expected)
    if has_alpha(layout):
        assert back.alpha is not None
        np.testing.assert_array_equal(as_uint(back.alpha, bits), original[:, :, -1])
    else:
        assert back.alpha is None


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
@pytest.mark.parametrize("layout", ["grey", "rgb", "rgba"])
def test_lossy_round_trip_within_tolerance(tmp_path: Path, fmt: str, layout: str) -> None:
    photo = smooth_rgb()
    if layout == "grey":
        photo = photo.mean(axis=2).astype(np.uint8)
    elif layout == "rgba":
        photo = np.dstack([photo, np.full(photo.shape[:2], 200, np.uint8)])
    image = from_array(photo)
    back = read_image(write_image(image, tmp_path / f"out.{fmt}", quality=95))

    assert back.format == fmt and back.bit_depth == 8
    assert back.is_grey == (layout == "grey" and fmt == "jpeg")
    error = np.abs(back.rgb - image.rgb)
    assert error.mean() < 0.01 and error.max() < 0.25
    if layout == "rgba" and fmt == "webp":
        assert back.alpha is not None
        np.testing.assert_allclose(back.alpha, 200 / 255, atol=1 / 255)
    else:
        assert back.alpha is None  # JPEG cannot store alpha: it is dropped


def test_sixteen_bit_precision_survives(tmp_path: Path) -> None:
    # Neighbouring 16-bit codes differ by 1/65535, far below one 8-bit step (1/255).
    ramp = (30000 + np.arange(H * W * 3, dtype=np.uint16)).reshape(H, W, 3)
    image = from_array(ramp)
    for fmt in ("png", "tiff"):
        back = read_image(write_image(image, tmp_path / f"ramp.{fmt}"))
        assert back.bit_depth == 16
        np.testing.assert_array_equal(as_uint(back.pixels, 16), ramp)
        assert len(np.unique(back.pixels)) == ramp.size


def test_sixteen_bit_input_can_be_written_as_eight_bit(tmp_path: Path) -> None:
    image = from_array(random_uint((H, W, 3), 16))
    back = read_image(write_image(image, tmp_path / "out.png", bit_depth=8))
    assert back.bit_depth == 8
    np.testing.assert_allclose(back.pixels, image.pixels, atol=0.5 / 255 + 1e-6)
    # JPEG cannot hold 16 bits: None means "as much as the format can", 16 is refused.
    assert read_image(write_image(image, tmp_path / "out.jpg")).bit_depth == 8
    with pytest.raises(ImageError) as excinfo:
        write_image(image, tmp_path / "bad.jpg", bit_depth=16)
    assert_one_line_error(excinfo, tmp_path / "bad.jpg")


def test_palette_one_bit_and_transparency_inputs(tmp_path: Path) -> None:
    index = random_uint((H, W), 8) % 3
    palette = PILImage.frombytes("P", (W, H), index.astype(np.uint8).tobytes())
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    path = tmp_path / "pal.png"
    path.write_bytes(pil_bytes(palette, "PNG", transparency=0))
    back = read_image(path)
    assert not back.is_grey and back.alpha is not None
    np.testing.assert_array_equal(back.alpha == 0, index == 0)
    np.testing.assert_array_equal(as_uint(back.pixels[:, :, 2], 8)[index == 2], 255)

    bilevel = PILImage.fromarray(index == 1)
    path = tmp_path / "bits.png"
    path.write_bytes(pil_bytes(bilevel, "PNG"))
    back = read_image(path)
    assert back.is_grey and back.bit_depth == 8
    np.testing.assert_array_equal(back.pixels[:, :, 0], (index == 1).astype(np.float32))


def test_cmyk_input_becomes_rgb(tmp_path: Path) -> None:
    cmyk = PILImage.fromarray(random_uint((H, W, 4), 8)).convert("RGB").convert("CMYK")
    for fmt in ("TIFF", "JPEG"):
        image = decode_image(pil_bytes(cmyk, fmt), f"cmyk.{fmt}")
        assert image.pixels.shape == (H, W, 3) and image.alpha is None


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied(tmp_path: Path, fmt: str, orientation: int) -> None:
    stored = random_uint((5, 7, 3), 8, seed=orientation)
    options: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    data = pil_bytes(PILImage.fromarray(stored), fmt, exif=exif_block(orientation), **options)
    path = tmp_path / f"o{orientation}.{fmt.lower()}"
    path.write_bytes(data)

    image = read_image(path)
    expected = upright(stored, orientation)
    np.testing.assert_array_equal(as_uint(image.pixels, 8), expected)
    # Pillow's own transpose agrees with the spec table.
    reference = np.asarray(ImageOps.exif_transpose(PILImage.open(path)).convert("RGB"))
    np.testing.assert_array_equal(reference, expected)
    # The orientation is reset in the kept EXIF; the other tags survive.
    assert image.exif is not None
    kept = parse_exif(image.exif)
    assert kept.get(ExifTags.Base.Orientation, 1) == 1
    assert kept[ExifTags.Base.Make] == MAKE


@pytest.mark.parametrize("orientation", [2, 3, 6, 7, 8])
def test_exif_orientation_for_jpeg_and_alpha(tmp_path: Path, orientation: int) -> None:
    # Big flat blocks so JPEG's loss cannot blur which corner went where.
    blocks = np.kron(random_uint((3, 4, 3), 8, seed=orientation) // 128 * 255, np.ones((16, 16, 1)))
    stored = blocks.astype(np.uint8)
    jpeg = {"quality": 100, "subsampling": 0}
    data = pil_bytes(PILImage.fromarray(stored), "JPEG", exif=exif_block(orientation), **jpeg)
    image = decode_image(data, "o.jpg")
    assert np.abs(as_uint(image.pixels, 8) - upright(stored, orientation)).mean() < 3

    rgba = random_uint((5, 7, 4), 8, seed=orientation)
    data = pil_bytes(PILImage.fromarray(rgba), "PNG", exif=exif_block(orientation))
    image = decode_image(data, "o.png")
    assert image.alpha is not None
    np.testing.assert_array_equal(as_uint(image.alpha, 8), upright(rgba[:, :, 3], orientation))


@pytest.mark.parametrize("orientation", [1, 2, 4, 6, 7])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_exif_orientation_sixteen_bit_tiff(tmp_path: Path, orientation: int, channels: int) -> None:
    tifffile = pytest.importorskip("tifffile")
    stored = random_uint((5, 7, channels), 16, seed=orientation)
    buffer = io.BytesIO()
    options = {"extrasamples": ["unassalpha"]} if channels == 4 else {}
    photometric = "minisblack" if channels == 1 else "rgb"
    tags = [(274, "H", 1, orientation, True)]
    tifffile.imwrite(buffer, stored.squeeze(), photometric=photometric, extratags=tags, **options)
    image = decode_image(buffer.getvalue(), "o16.tif")
    assert image.bit_depth == 16
    expected = upright(stored, orientation)
    np.testing.assert_array_equal(as_uint(image.pixels, 16), expected[:, :, : min(channels, 3)])
    if channels == 4:
        assert image.alpha is not None
        np.testing.assert_array_equal(as_uint(image.alpha, 16), expected[:, :, 3])


def test_exif_orientation_sixteen_bit_png() -> None:
    stored = random_uint((5, 7, 3), 16)
    image = from_array(stored)
    image.exif = exif_block(orientation=6)
    back = decode_image(encode_image(image, "png"), "o16.png")
    np.testing.assert_array_equal(as_uint(back.pixels, 16), upright(stored, 6))


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize(
    ("fmt", "bits"), [("png", 8), ("png", 16), ("jpeg", 8), ("webp", 8), ("tiff", 8)]
)
def test_icc_and_exif_survive(tmp_path: Path, fmt: str, bits: int) -> None:
    icc = srgb_profile()
    image = from_array(random_uint((H, W, 3), bits))
    image.icc_profile = icc
    image.exif = exif_block()
    back = read_image(write_image(image, tmp_path / f"meta.{fmt}"))
    assert back.icc_profile == icc
    assert back.exif is not None
    exif = parse_exif(back.exif)
    assert exif[ExifTags.Base.Make] == MAKE
    assert exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] == DATE
    # And it carries on into another format.
    again = read_image(write_image(back, tmp_path / f"meta2.{'jpg' if fmt != 'jpeg' else 'png'}"))
    assert again.icc_profile == icc and again.exif is not None
    assert parse_exif(again.exif)[ExifTags.Base.Make] == MAKE


def test_metadata_limits(tmp_path: Path) -> None:
    image = from_array(random_uint((H, W, 3), 16))
    image.icc_profile, image.exif = srgb_profile(), exif_block()
    tiff16 = read_image(write_image(image, tmp_path / "m.tif"))
    assert tiff16.bit_depth == 16 and tiff16.icc_profile is None  # documented limit
    bmp = read_image(write_image(image, tmp_path / "m.bmp"))
    assert bmp.icc_profile is None and bmp.exif is None
    # An RGB profile is not attached to a grey output (it would be invalid there).
    grey = image.with_pixels(image.pixels[:, :, :1])
    assert read_image(write_image(grey, tmp_path / "g.png")).icc_profile is None


# --------------------------------------------------------------------------- bad input


def small_png() -> bytes:
    return encode_image(from_array(random_uint((H, W, 3), 8)), "png")


def test_missing_file_directory_and_empty_file(tmp_path: Path) -> None:
    cases = {
        tmp_path / "nope.png": "no such file",
        tmp_path: "is a directory",
    }
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    cases[empty] = "file is empty"
    for path, problem in cases.items():
        with pytest.raises(ImageError) as excinfo:
            read_image(path)
        assert problem in assert_one_line_error(excinfo, path)


@pytest.mark.parametrize(
    ("fmt", "bits"),
    [("png", 8), ("png", 16), ("jpeg", 8), ("webp", 8), ("tiff", 8), ("tiff", 16), ("bmp", 8)],
)
def test_truncated_files(tmp_path: Path, fmt: str, bits: int) -> None:
    data = encode_image(from_array(random_uint((64, 64, 3), bits)), fmt, quality=90)
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as excinfo:
        read_image(path)
    assert "truncated" in assert_one_line_error(excinfo, path)


def test_not_an_image_and_unsupported_formats(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("this is not an image at all\n" * 10)
    with pytest.raises(ImageError) as excinfo:
        read_image(text)
    assert "not an image (unrecognised format)" in assert_one_line_error(excinfo, text)

    gif = tmp_path / "anim.gif"
    gif.write_bytes(pil_bytes(PILImage.fromarray(random_uint((8, 8, 3), 8)), "GIF"))
    with pytest.raises(ImageError) as excinfo:
        read_image(gif)
    assert "unsupported image format (GIF)" in assert_one_line_error(excinfo, gif)

    floats = tmp_path / "float.tif"
    floats.write_bytes(pil_bytes(PILImage.fromarray(np.ones((8, 8), np.float32)), "TIFF"))
    with pytest.raises(ImageError) as excinfo:
        read_image(floats)
    assert "unsupported bit depth" in assert_one_line_error(excinfo, floats)


def test_decompression_bomb_refused_before_decoding(tmp_path: Path) -> None:
    # A valid PNG header claiming 100000 x 100000 pixels, with a tiny IDAT behind it.
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return len(payload).to_bytes(4, "big") + kind + payload + crc.to_bytes(4, "big")

    ihdr = (100_000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    idat = zlib.compress(b"\x00" * 1000)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    with pytest.raises(ImageError) as excinfo:
        read_image(bomb)
    assert "too large" in assert_one_line_error(excinfo, bomb)

    normal = tmp_path / "normal.png"
    normal.write_bytes(small_png())
    with pytest.raises(ImageError) as excinfo:
        read_image(normal, max_pixels=H * W - 1)
    assert "too large" in assert_one_line_error(excinfo, normal)
    assert read_image(normal, max_pixels=H * W).width == W
    assert read_image(normal, max_pixels=None).width == W


def test_image_error_is_a_fape_error() -> None:
    with pytest.raises(FapeError, match=r"^<bytes>: not an image"):
        decode_image(b"plain text, no pixels here")


# --------------------------------------------------------------------------- writing


def test_write_refuses_to_overwrite_its_source(tmp_path: Path) -> None:
    path = tmp_path / "in.png"
    path.write_bytes(small_png())
    before = path.read_bytes()
    image = read_image(path)
    for target in (path, tmp_path / "sub" / ".." / "in.png"):
        with pytest.raises(ImageError) as excinfo:
            write_image(image, target)
        assert "overwrite" in assert_one_line_error(excinfo, target)
    assert path.read_bytes() == before
    assert write_image(image, tmp_path / "other.png").exists()


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".part")]


def test_write_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = from_array(random_uint((H, W, 3), 8))
    target = tmp_path / "out.png"
    target.write_bytes(b"previous contents")

    def broken_encoder(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(images_module, "_encode_pil", broken_encoder)
    with pytest.raises(RuntimeError):
        write_image(image, target)
    monkeypatch.undo()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(ImageError) as excinfo:
        write_image(image, target)
    assert "No space left" in assert_one_line_error(excinfo, target)
    monkeypatch.undo()

    def interrupted_replace(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        write_image(image, target)
    monkeypatch.undo()

    assert target.read_bytes() == b"previous contents"
    assert no_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_write_success_creates_folders_and_leaves_no_temp(tmp_path: Path) -> None:
    image = from_array(random_uint((H, W, 3), 8))
    target = tmp_path / "a" / "b" / "out.webp"
    assert write_image(image, target) == target
    assert read_image(target).format == "webp"
    assert no_temp_files(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # usual permissions, not 0600


def test_write_bad_targets(tmp_path: Path) -> None:
    image = from_array(random_uint((H, W, 3), 8))
    for target, problem in ((tmp_path / "out.gif", "unsupported output"), (tmp_path, "directory")):
        with pytest.raises(ImageError) as excinfo:
            write_image(image, target)
        assert problem in assert_one_line_error(excinfo, target)


def test_extension_decides_format(tmp_path: Path) -> None:
    image = from_array(random_uint((H, W, 3), 8))
    for name, fmt in (("x.JPG", "jpeg"), ("x.jpeg", "jpeg"), ("x.TIF", "tiff"), ("x.Bmp", "bmp")):
        assert read_image(write_image(image, tmp_path / name)).format == fmt


# --------------------------------------------------------------------------- stdin/stdout


def test_stdin_and_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode_image(from_array(random_uint((H, W, 4), 16)), "png")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    image = read_image("-")
    assert image.source == "-" and image.bit_depth == 16 and image.alpha is not None

    stdout = io.TextIOWrapper(io.BytesIO())
    monkeypatch.setattr(sys, "stdout", stdout)
    assert write_image(image, "-") == Path("-")
    written = stdout.buffer.getvalue()
    assert written.startswith(b"\x89PNG")
    back = decode_image(written)
    np.testing.assert_array_equal(back.pixels, image.pixels)
    np.testing.assert_array_equal(back.alpha, image.alpha)


def test_stdin_errors_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(ImageError, match=r"^<stdin>: file is empty$"):
        read_image("-")


# --------------------------------------------------------------------------- Image helpers


def test_image_helpers_and_with_pixels() -> None:
    grey = from_array(random_uint((H, W, 2), 8))
    grey.icc_profile, grey.exif, grey.source = b"icc", b"exif", "in.png"
    assert grey.is_grey and grey.rgb.shape == (H, W, 3)
    assert np.array_equal(grey.rgb[:, :, 0], grey.rgb[:, :, 2])
    assert grey.megapixels == pytest.approx(H * W / 1e6)

    bigger = grey.with_pixels(np.full((2 * H, 2 * W, 3), 1.5, np.float32))
    assert (bigger.height, bigger.width) == (2 * H, 2 * W) and not bigger.is_grey
    assert bigger.pixels.max() == 1.0  # clipped
    assert bigger.alpha is not None and bigger.alpha.shape == (2 * H, 2 * W)
    assert (bigger.icc_profile, bigger.exif, bigger.source) == (b"icc", b"exif", "in.png")
    assert grey.with_pixels(grey.pixels, alpha=KEEP).alpha is grey.alpha
    assert grey.with_pixels(grey.pixels, alpha=None).alpha is None


def test_from_array_shapes_and_types() -> None:
    assert from_array(np.zeros((4, 5), np.uint8)).pixels.shape == (4, 5, 1)
    rgba = from_array(np.full((4, 5, 4), 65535, np.uint16))
    assert rgba.bit_depth == 16 and rgba.alpha is not None and rgba.pixels.shape == (4, 5, 3)
    floats = from_array(np.array([[-1.0, 0.5, 2.0]]))
    np.testing.assert_array_equal(floats.pixels[:, :, 0], [[0.0, 0.5, 1.0]])
    with pytest.raises(ValueError):
        from_array(np.zeros((4, 5, 5), np.uint8))
    with pytest.raises(ValueError):
        from_array(np.zeros((4, 5), np.int64))
    with pytest.raises(ValueError):
        Image(pixels=np.zeros((4, 5, 2), np.float32))


# --------------------------------------------------------------------------- discovery


def make_tree(root: Path) -> None:
    files = [
        "b.png", "a.JPG", "notes.txt", ".hidden.png", "._a.JPG", ".DS_Store", "Thumbs.db",
        "desktop.ini", ".b.png.1a2b3c4d.part", "half.png.part", "sub/z.tif", "sub/deeper/w.webp",
        "sub/.git/q.png", "__MACOSX/m.png", "Sub2/y.bmp",
    ]  # fmt: skip
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_discover_folder_recursive_sorted_and_junk_free(tmp_path: Path) -> None:
    make_tree(tmp_path)
    items, problems = discover_images([tmp_path])
    assert problems == []
    assert [item.relative.as_posix() for item in items] == [
        "a.JPG", "b.png", "sub/deeper/w.webp", "sub/z.tif", "Sub2/y.bmp",
    ]  # fmt: skip
    assert all(item.path == tmp_path / item.relative for item in items)
    flat, _ = discover_images([tmp_path], recursive=False)
    assert [item.relative.as_posix() for item in flat] == ["a.JPG", "b.png"]
    assert discover_images([tmp_path]) == (items, problems)  # deterministic


def test_discover_files_problems_and_duplicates(tmp_path: Path) -> None:
    make_tree(tmp_path)
    (tmp_path / "empty").mkdir()
    inputs = [
        tmp_path / "sub" / "z.tif",
        tmp_path / "notes.txt",
        str(tmp_path / "missing.png"),
        tmp_path / "empty",
        tmp_path / "sub",
        "-",
        "-",
        tmp_path / "sub" / ".." / "sub" / "z.tif",
    ]
    items, problems = discover_images(inputs)
    assert [(item.path, item.relative.as_posix()) for item in items] == [
        (tmp_path / "sub" / "z.tif", "z.tif"),
        (tmp_path / "sub" / "deeper" / "w.webp", "deeper/w.webp"),
        (Path("-"), "stdin.png"),
    ]
    assert items[2].is_stdin
    assert [source for source, _ in problems] == [
        str(tmp_path / "notes.txt"),
        str(tmp_path / "missing.png"),
        str(tmp_path / "empty"),
    ]
    messages = [message for _, message in problems]
    assert "not an image file" in messages[0] and "no such file" in messages[1]
    assert "no images" in messages[2]


def test_read_path_list() -> None:
    text = "a.png\n\n# a comment\n  dir/b.jpg  \r\n   \n#another\nc d.tif\n"
    assert read_path_list(io.StringIO(text)) == ["a.png", "dir/b.jpg", "c d.tif"]


def test_output_path_mirrors_tree(tmp_path: Path) -> None:
    out = tmp_path / "out"
    item = InputItem(Path("/data/photos/sub/z.tif"), Path("sub/z.tif"))
    assert output_path(item, out) == out / "sub" / "z.tif"
    assert output_path(item, out, suffix="_restored", ext="png") == out / "sub" / "z_restored.png"
    assert output_path(item, out, ext=".jpg") == out / "sub" / "z.jpg"
    single = InputItem(Path("a.b.jpeg"), Path("a.b.jpeg"))
    assert output_path(single, out, suffix="-x") == out / "a.b-x.jpeg"
    stdin_item = discover_images(["-"])[0][0]
    assert output_path(stdin_item, out) == out / "stdin.png"
