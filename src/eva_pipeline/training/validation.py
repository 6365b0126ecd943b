"""Held-out MIM loss: the pre-training loss on fixed images with a fixed mask, so its curve is comparable across
steps, restarts and runs, and with the public EVA-01 curve (paper Sec. 2 / EVA-01 ``engine_for_pretraining.py``).

* **Images.** ``num_images`` evenly spaced rows of a held-out split (never trained on; evenly spaced so that a split
  stored class folder by class folder is covered class by class), each the whole image resized, exactly as the
  teacher saw it when its targets were stored (``teacher_views`` with no augmentation).
* **Mask.** The public code's validation mask: every other token of the flattened grid (index ``0::2``; 128 of
  EVA-g's 256 tokens).
* **Loss.** The training objective, a token mean of ``-cos`` over all masked tokens of the set. Ranks take
  contiguous slices of the set and sum (``all_reduce``), so any world size gives the same value.

No random draw is made: evaluating does not move any generator, so a run evaluated or not trains the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from eva_pipeline.loader.heldout import validation_pixels

#: The flattened-grid stride of the fixed validation mask (every other token masked).
VALIDATION_MASK_STRIDE: int = 2


def validation_mask(num_patches: int) -> torch.Tensor:
    """(num_patches,) bool: tokens ``0, 2, 4, ...`` masked (the public code's fixed validation mask)."""
    mask = torch.zeros(num_patches, dtype=torch.bool)
    mask[::VALIDATION_MASK_STRIDE] = True
    return mask


def open_validation_set(rows: Any, store: str, img_size: int, every_steps: int, batch_size: int) -> ValidationSet:
    """The validation set of a held-out split whose targets lie in the target store ``store`` (its item count is the
    number of images)."""
    from eva_pipeline.targets.extract import teacher_views
    from eva_pipeline.targets.store import TargetStore

    targets = TargetStore(store).reader()
    pixels = validation_pixels(rows, targets.num_items)
    inputs = teacher_views(pixels, img_size, views_per_item=0, augment=None, seed=0)  # whole images: no draw
    return ValidationSet(inputs, targets, len(pixels), every_steps, batch_size)


@dataclass
class ValidationSet:
    """The held-out images and their stored teacher targets, both indexed by position ``0 .. len-1``.

    ``inputs(start, stop)``: the model input of positions ``[start, stop)`` (the teacher's own ``batch_fn``);
    ``targets``: a target-store reader (``get(positions) -> (targets, crops)``).
    """

    inputs: Callable[[int, int], torch.Tensor]
    targets: Any
    num_images: int
    every_steps: int
    batch_size: int = 64

    def __post_init__(self) -> None:
        if getattr(self.targets, "num_items", self.num_images) != self.num_images:
            raise ValueError(
                f"the validation targets cover {self.targets.num_items} images, the set has {self.num_images}: "
                "re-run the teacher_targets pipeline"
            )

    def due(self, step: int, last_step: int) -> bool:
        """Whether the loss is evaluated after ``step`` (1-based) of a run ending at ``last_step``."""
        return step % self.every_steps == 0 or step == last_step


@torch.no_grad()
def validation_loss(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    valset: ValidationSet,
    num_patches: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """The token-mean ``-cos`` of the set under the fixed mask; ``forward(x, mask)`` -> (masked tokens, D).

    The caller puts the model in eval mode (no drop path). Rank ``r`` evaluates positions
    ``[r*n/R, (r+1)*n/R)``; the sums are reduced over ranks when a process group is up.
    """
    lo, hi = rank * valset.num_images // world_size, (rank + 1) * valset.num_images // world_size
    fixed = validation_mask(num_patches).to(device)
    stats = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of cos, tokens)
    for start in range(lo, hi, valset.batch_size):
        stop = min(start + valset.batch_size, hi)
        x = valset.inputs(start, stop).to(device, dtype)
        mask = fixed.expand(stop - start, -1)
        target = valset.targets.get(np.arange(start, stop))[0].to(device)[mask]
        pred = forward(x, mask)
        stats[0] += F.cosine_similarity(pred.float(), target.float(), dim=-1).sum().double()
        stats[1] += pred.shape[0]
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    if stats[1] == 0:
        raise ValueError("the validation set is empty")
    return float(-(stats[0] / stats[1]))
