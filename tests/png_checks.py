"""What a saved figure must be: a PNG that shows something, and the very figure the code drew.

A PNG's magic bytes say a file was written, not that it shows anything: these checks decode the pixels.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image


def png_pixels(path: Path | io.BytesIO) -> np.ndarray:
    """The RGBA pixels of the PNG at ``path`` (a file or a buffer) (fails on anything that is not a readable PNG)."""
    with Image.open(path) as image:
        assert image.format == "PNG", f"{path} is a {image.format}, not a PNG"
        return np.asarray(image.convert("RGBA"))


def assert_drawn(path: Path, min_colours: int = 8, min_ink: float = 0.01) -> np.ndarray:
    """The PNG has a real size, several colours and at least ``min_ink`` of its pixels off the background."""
    pixels = png_pixels(path)
    height, width = pixels.shape[:2]
    assert height >= 100 and width >= 100, f"{path}: {width}x{height} pixels is no figure"
    colours = np.unique(pixels.reshape(-1, 4), axis=0)
    assert len(colours) >= min_colours, f"{path}: {len(colours)} colour(s), a blank or flat image"
    background = pixels[0, 0]
    ink = np.any(pixels != background, axis=-1).mean()
    assert ink >= min_ink, f"{path}: only {ink:.2%} of the pixels differ from the background"
    return pixels


def assert_png_of(path: Path, figure: Figure, **save_args: Any) -> None:
    """The PNG at ``path`` is pixel for pixel ``figure`` saved with ``save_args`` (what the catalog entry uses)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **save_args)
    buffer.seek(0)
    expected = png_pixels(buffer)
    actual = assert_drawn(path)
    assert actual.shape == expected.shape, f"{path}: {actual.shape[:2]} pixels, the figure gives {expected.shape[:2]}"
    np.testing.assert_array_equal(actual, expected, err_msg=f"{path} is not the figure")
