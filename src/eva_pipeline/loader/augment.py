"""EVA-01's pre-training augmentation (built by ``run_eva_pretraining.py``): horizontal flip p=0.5,
RandomResizedCrop, bicubic.

Crop boxes are drawn from a per-sample ``numpy.random.Generator`` (torchvision's algorithm: 10 tries, then a
centre crop clamped to the ratio range), so a view is a pure function of (seed, epoch, index): student and teacher
see the identical crop, a resumed run sees the identical views, and the box can be stored next to a cached target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_TRIES = 10  # torchvision's RandomResizedCrop


@dataclass(frozen=True)
class View:
    """One augmented view: the crop box (top, left, height, width) in source pixels and whether it is flipped."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


@dataclass(frozen=True)
class RandomResizedCropFlip:
    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")

    def sample(self, height: int, width: int, rng: np.random.Generator) -> View:
        """Draw a view of an (height, width) image."""
        flip = bool(rng.random() < self.flip_prob)
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(_TRIES):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h, endpoint=True))
                left = int(rng.integers(0, width - w, endpoint=True))
                return View(top, left, h, w, flip)
        in_ratio = width / height  # fallback: the whole image, cropped centrally to the allowed ratio range
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return View((height - h) // 2, (width - w) // 2, h, w, flip)

    def apply(self, image: torch.Tensor, view: View) -> torch.Tensor:
        """Crop, resize (bicubic, antialiased) and flip one (C, H, W) uint8 image to (C, size, size) uint8."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        out = TF.resized_crop(
            image,
            view.top,
            view.left,
            view.height,
            view.width,
            [self.size, self.size],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        return TF.horizontal_flip(out) if view.flip else out


def view_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for the view of sample ``index`` in ``epoch`` (a stream apart from the mask's)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index, 0xC209]))


# ---------------------------------------------------------------------------------------------- stored form
CROP_DTYPE: torch.dtype = torch.int32
#: Columns of a stored crop, in order.
CROP_FIELDS: tuple[str, ...] = ("top", "left", "height", "width", "flip")


def views_to_crops(views: Sequence[View]) -> Tensor:
    """int32 (n, 5) crops (top, left, height, width, flip) of ``views``: what ``batch_fn`` returns with images."""
    rows = [(v.top, v.left, v.height, v.width, int(v.flip)) for v in views]
    return torch.tensor(rows, dtype=CROP_DTYPE).reshape(len(rows), len(CROP_FIELDS))


def crops_to_views(crops: Tensor) -> list[View]:
    """The :class:`~eva_pipeline.loader.augment.View` of each stored crop row (inverse of :func:`views_to_crops`)."""
    return [View(int(top), int(left), int(h), int(w), bool(f)) for top, left, h, w, f in crops.tolist()]
