"""Robust decoding of one encoded image: an RGB PIL image, or a rejection reason. Never raises on bad input.

Every source reader (image folders, file lists, webdataset shards) and the pixel loader go through
:func:`decode_image`, so what ingestion accepts is exactly what :func:`~eva_pipeline.loader.pixels.load_images` can
decode, with the same size (EXIF rotation applied in both). The public EVA loader silently substitutes another
image for an unreadable one; here an unreadable item is rejected with a reason that the ingestion report records.

Rejection reasons (stable codes, the first element of :class:`Rejection`): ``empty file``, ``not an image``,
``truncated or corrupt``, ``decompression bomb``, ``too small``, ``unsupported mode``, plus reader-level ones
(``missing file``, ``unreadable file``, ...) used by the source readers.
"""

from __future__ import annotations

import io
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from eva_pipeline.ingest.details import exception_detail

#: File name extensions treated as images (compared lower-case).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
#: Images smaller than this on either side (after EXIF rotation) are rejected.
MIN_SIDE: int = 16

EMPTY = "empty file"
NOT_AN_IMAGE = "not an image"
CORRUPT = "truncated or corrupt"
BOMB = "decompression bomb"
TOO_SMALL = "too small"
UNSUPPORTED = "unsupported mode"


class Rejection(NamedTuple):
    """Why an item was rejected: ``reason`` is a stable code, ``detail`` the human-readable specifics."""

    reason: str
    detail: str


def is_image_name(name: str) -> bool:
    """True when ``name`` ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def decode_image(
    data: bytes, name: str = "", *, min_side: int = MIN_SIDE
) -> tuple[Image.Image | None, Rejection | None]:
    """Decode ``data`` (the raw bytes of an encoded image; ``name`` for messages) -> ``(rgb_image, None)`` or
    ``(None, Rejection)``.

    The whole image is decoded (a truncated file fails here, not later in training); ``Image.MAX_IMAGE_PIXELS``
    (read at call time) guards against decompression bombs; the EXIF orientation is applied; alpha is composited
    on white; 16-bit grayscale is scaled to 8 bits; CMYK, palette, grayscale and the other modes become RGB.
    The detail of a rejection is the same on every run (no memory address: :mod:`eva_pipeline.ingest.details`).
    """
    if len(data) == 0:
        return None, Rejection(EMPTY, f"{name}: 0 bytes")
    limit = Image.MAX_IMAGE_PIXELS
    # PIL names the BytesIO it read from by its address ("cannot identify image file <_io.BytesIO object at 0x..>"):
    # the file's name takes its place, so a detail is the same on every run.
    subject = repr(name) if name else "<bytes>"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked explicitly below
            img = Image.open(io.BytesIO(data))
            if limit is not None and img.width * img.height > limit:
                return None, Rejection(BOMB, f"{name}: {img.width}x{img.height} pixels exceed the limit of {limit}")
            img.load()
    except Image.DecompressionBombError as exc:
        return None, Rejection(BOMB, f"{name}: {exception_detail(exc, subject, with_type=False)}")
    except UnidentifiedImageError as exc:
        return None, Rejection(NOT_AN_IMAGE, f"{name}: {exception_detail(exc, subject, with_type=False)}")
    except Exception as exc:
        return None, Rejection(CORRUPT, f"{name}: {exception_detail(exc, subject)}")
    try:
        img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
    except _Unsupported as exc:
        return None, Rejection(UNSUPPORTED, f"{name}: {exception_detail(exc, subject, with_type=False)}")
    except Exception as exc:
        return None, Rejection(CORRUPT, f"{name}: {exception_detail(exc, subject)}")
    if min(rgb.width, rgb.height) < min_side:
        return None, Rejection(TOO_SMALL, f"{name}: {rgb.width}x{rgb.height}, under {min_side} px on a side")
    return rgb, None


class _Unsupported(ValueError):
    pass


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """I;16* / I / F grayscale -> 8-bit L, scaled (PIL's own conversion clips everything above 255 to white)."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        arr = arr * 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else arr
        out = np.clip(np.nan_to_num(arr), 0, 255).round()
    else:
        wide = arr.astype(np.int64)
        if img.mode == "I" and (wide.min(initial=0) < 0 or wide.max(initial=0) > 65535):
            raise _Unsupported(f"32-bit integer image with values outside 0..65535 (mode {img.mode})")
        out = (wide * 255 + 32767) // 65535  # 0 -> 0, 65535 -> 255, rounded to nearest
    return Image.fromarray(out.astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> RGB (alpha over white, 16-bit scaled, CMYK/palette/grayscale converted)."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_bit_depth_to_l(img)
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise _Unsupported(f"cannot convert mode {img.mode} to RGB ({exc})") from exc
