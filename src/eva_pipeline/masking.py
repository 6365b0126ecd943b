"""Block-wise masking for masked image modeling (BEiT's algorithm, as EVA uses it: EVA-01
``masking_generator.py``).

Rectangles of patches with a log-uniform aspect ratio are added until the target count is reached. Draws come
from an explicit ``numpy.random.Generator`` so every mask is reproducible from a seed, independent of which data
loader worker or rank produces it (see :func:`mask_rng`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_ATTEMPTS_PER_BLOCK = 10  # BEiT: up to 10 tries to place one block before giving up on it


@dataclass(frozen=True)
class BlockMaskGenerator:
    """Draws boolean masks of shape ``grid`` with at most ``num_masking_patches`` True entries.

    Attributes mirror BEiT's ``MaskingGenerator``: ``min_num_patches`` is the smallest block area drawn,
    ``max_num_patches`` caps one block (``None``: the number still to mask), the aspect ratio is log-uniform in
    ``[min_aspect, max_aspect]`` (``None``: ``1 / min_aspect``).
    """

    grid: tuple[int, int]
    num_masking_patches: int
    min_num_patches: int = 16
    max_num_patches: int | None = None
    min_aspect: float = 0.3
    max_aspect: float | None = None

    def __post_init__(self) -> None:
        height, width = self.grid
        if height < 1 or width < 1:
            raise ValueError(f"mask grid must be positive, got {self.grid}")
        if not 0 < self.num_masking_patches <= height * width:
            raise ValueError(
                f"num_masking_patches must be in [1, {height * width}] for a {height}x{width} grid, "
                f"got {self.num_masking_patches}"
            )
        if self.min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {self.min_num_patches}")
        if self.max_num_patches is not None and self.max_num_patches < 1:
            raise ValueError(f"max_num_patches must be >= 1 or None, got {self.max_num_patches}")
        if not 0 < self.min_aspect <= (self.max_aspect or 1 / self.min_aspect):
            raise ValueError(f"aspect range invalid: min_aspect={self.min_aspect}, max_aspect={self.max_aspect}")

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def _add_block(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
        """One BEiT block attempt: returns how many patches were newly masked (0 if every try failed)."""
        height, width = self.grid
        max_aspect = self.max_aspect or 1 / self.min_aspect
        log_lo, log_hi = math.log(self.min_aspect), math.log(max_aspect)
        for _ in range(_ATTEMPTS_PER_BLOCK):
            # Python's random.uniform semantics (a + (b - a) * u): the area range may be reversed when fewer
            # patches remain than min_num_patches, which BEiT relies on to finish the mask.
            target_area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * rng.random()
            aspect_ratio = math.exp(log_lo + (log_hi - log_lo) * rng.random())
            h = round(math.sqrt(target_area * aspect_ratio))
            w = round(math.sqrt(target_area / aspect_ratio))
            if w < width and h < height:
                top = int(rng.integers(0, height - h, endpoint=True))
                left = int(rng.integers(0, width - w, endpoint=True))
                region = mask[top : top + h, left : left + w]
                newly = h * w - int(region.sum())
                if 0 < newly <= max_mask_patches:
                    region[...] = True
                    return newly
        return 0

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """A (H, W) boolean mask (never more than ``num_masking_patches`` True) and how many blocks made it."""
        mask = np.zeros(self.grid, dtype=bool)
        count = blocks = 0
        block_cap = self.max_num_patches or self.num_masking_patches
        while count < self.num_masking_patches:
            added = self._add_block(mask, min(self.num_masking_patches - count, block_cap), rng)
            if added == 0:
                break
            count += added
            blocks += 1
        return mask, blocks

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """A (H, W) boolean mask; never more than ``num_masking_patches`` True."""
        return self.sample(rng)[0]


def mask_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for sample ``index`` in ``epoch``: masks depend only on these, not on worker or rank order."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


def alternating_mask(num_patches: int) -> np.ndarray:
    """The fixed validation mask: every other token (flattened indices 0::2) is masked, as in the public EVA-01
    code's validation loss."""
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}")
    mask = np.zeros(num_patches, dtype=bool)
    mask[0::2] = True
    return mask
