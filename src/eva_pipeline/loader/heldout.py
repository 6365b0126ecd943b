"""A fixed held-out subset of a split: evenly spaced rows (class folders stored in order are covered class by class)
and their pixels by position. The held-out MIM loss (:mod:`eva_pipeline.training.validation`) and the extraction of
its teacher targets (:mod:`eva_pipeline.targets.extract`) read the same images through it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from eva_pipeline.loader.pixels import ManifestPixels


def validation_rows(num_rows: int, num_images: int) -> np.ndarray:
    """Rows of the held-out split that form the validation set: ``min(num_images, num_rows)`` evenly spaced ones."""
    if num_rows < 1 or num_images < 1:
        raise ValueError(f"num_rows and num_images must be positive, got {num_rows}, {num_images}")
    count = min(num_images, num_rows)
    return np.floor(np.arange(count) * (num_rows / count)).astype(np.int64)


class SubsetPixels:
    """A pixel source restricted to ``rows``: position ``i`` is row ``rows[i]`` of ``pixels`` (picklable)."""

    def __init__(self, pixels: Any, rows: np.ndarray) -> None:
        self.pixels, self.rows = pixels, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, positions: np.ndarray) -> list[torch.Tensor]:
        return self.pixels(self.rows[np.asarray(positions, dtype=np.int64)])


def validation_pixels(rows: Any, num_images: int) -> SubsetPixels:
    """The validation images of a held-out split's rows (a RowSource), by position ``0 .. n-1``."""
    pixels = ManifestPixels(rows)
    return SubsetPixels(pixels, validation_rows(len(pixels), num_images))
