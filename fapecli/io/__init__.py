"""Image I/O: reading/writing images with their metadata, and finding input files."""

from __future__ import annotations

from fapecli.io.discover import (
    IMAGE_EXTENSIONS,
    InputItem,
    discover_images,
    is_image_name,
    is_junk,
    output_path,
    read_path_list,
)
from fapecli.io.images import (
    DEFAULT_MAX_PIXELS,
    EXTENSION_FORMATS,
    FORMATS,
    KEEP,
    SIXTEEN_BIT_FORMATS,
    Image,
    atomic_write,
    decode_image,
    encode_image,
    format_for_path,
    from_array,
    read_image,
    write_image,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "EXTENSION_FORMATS",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "KEEP",
    "SIXTEEN_BIT_FORMATS",
    "Image",
    "InputItem",
    "atomic_write",
    "decode_image",
    "discover_images",
    "encode_image",
    "format_for_path",
    "from_array",
    "is_image_name",
    "is_junk",
    "output_path",
    "read_image",
    "read_path_list",
    "write_image",
]
