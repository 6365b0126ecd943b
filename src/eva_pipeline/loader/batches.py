"""Pre-training batches streamed from the manifest: flat memory, deterministic across ranks, workers and restarts.

Everything a training step consumes is a pure function of ``(seed, step)``:

* **Order.** :class:`~eva_pipeline.loader.order.EpochOrder` makes every epoch a uniform pseudo-random permutation
  of the whole data set (a keyed Feistel network with cycle walking): batches mix all sources and classes as a full
  shuffle does, the order holds O(1) memory (round keys), and position ``p`` of an epoch maps to its sample without
  the positions before it.
* **Sharding.** Global batch ``b`` is positions ``[b*B, (b+1)*B)`` of its epoch; rank ``r`` of ``R`` takes slice
  ``r`` of it (``B/R`` samples), and loader worker ``w`` of ``W`` builds the steps ``start + w, start + w + W, ...``
  which the DataLoader hands out in step order. Every rank knows the whole global batch, hence the number of masked
  tokens it holds (the loss's global token mean).
* **Views.** ``resize``: the whole image, resized; ``augment``: EVA's RandomResizedCrop + flip drawn from
  ``view_rng(seed, epoch, index)``; ``stored``: the crop stored with cached teacher targets for view
  ``epoch % K`` (drawn at extraction from ``view_rng(seed, view, index)``), so student and teacher see one crop.
  For the first K epochs ``stored`` and ``augment`` draw the very same crops.
* **Masks.** Each sample's block mask comes from ``mask_rng(seed, epoch, index)``.

Rows are read through a :class:`~eva_pipeline.loader.rows.RowSource`: an in-memory frame, or the manifest's
memory-mapped row index (:mod:`eva_pipeline.loader.row_index`), since a uniform order scatters a batch over the whole
manifest. Pixels are read through :class:`~eva_pipeline.loader.pixels.PixelReader`: a tar-shard member at the
offset the index stores, one seek and one read per image, like an image file; IDX containers from a bounded cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from eva_pipeline.loader.augment import RandomResizedCropFlip, View, crops_to_views, view_rng
from eva_pipeline.loader.order import EpochOrder
from eva_pipeline.loader.transforms import resize_uint8, stack_images

if TYPE_CHECKING:
    from eva_pipeline.masking import BlockMaskGenerator

ViewMode = Literal["resize", "augment", "stored"]


# ----------------------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """One rank's share of one global batch."""

    step: int
    indices: torch.Tensor  # (m,) int64 sample indices
    images: torch.Tensor  # (m, C, S, S) uint8, C in {1, 3}
    mask: torch.Tensor  # (m, N) bool
    num_masked: int  # masked tokens in the whole global batch (all ranks)
    targets: torch.Tensor | None = None  # (m, N, D) fp16 stored targets; None: the caller runs the teacher


@dataclass
class BatchPlan:
    """What :class:`PretrainBatches` needs to build any step's batch; plain data, so it pickles to workers."""

    pixels: Any  # ManifestPixels | TensorPixels: sample indices -> list of (C, H, W) uint8
    order: EpochOrder
    global_batch: int
    rank: int
    world_size: int
    img_size: int
    seed: int
    masker: BlockMaskGenerator
    view_mode: ViewMode = "resize"
    augment: RandomResizedCropFlip | None = None
    targets: Any = None  # a target-store reader (``get(items, views) -> (targets, crops)``), or None

    def __post_init__(self) -> None:
        if self.global_batch % self.world_size:
            raise ValueError(f"batch size {self.global_batch} must be divisible by world size {self.world_size}")
        if self.view_mode == "augment" and self.augment is None:
            raise ValueError("view_mode 'augment' needs an augmentation (RandomResizedCropFlip)")
        if self.view_mode == "stored" and self.augment is None:
            self.augment = RandomResizedCropFlip(self.img_size)  # only its resize and flip: crops are stored
        if self.view_mode == "stored" and (self.targets is None or not getattr(self.targets, "has_crops", False)):
            raise ValueError("view_mode 'stored' needs stored targets with crops (teacher_targets.views_per_image)")
        if self.targets is not None and getattr(self.targets, "num_items", len(self.pixels)) != len(self.pixels):
            raise ValueError(
                f"the stored targets cover {self.targets.num_items} images but there are {len(self.pixels)} rows: "
                "re-run the teacher_targets pipeline"
            )

    @property
    def steps_per_epoch(self) -> int:
        return len(self.pixels) // self.global_batch

    @property
    def micro(self) -> int:
        return self.global_batch // self.world_size


class PretrainBatches(torch.utils.data.IterableDataset):
    """Steps ``[start, stop)`` of one rank as :class:`Batch` es, split over DataLoader workers by step."""

    def __init__(self, plan: BatchPlan, start: int, stop: int) -> None:
        super().__init__()
        if plan.steps_per_epoch < 1:
            raise ValueError(f"batch_size {plan.global_batch} exceeds the {len(plan.pixels)} pre-training images")
        self.plan, self.start, self.stop = plan, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(self.start + worker, self.stop, workers):
            yield self.batch(step)

    def batch(self, step: int) -> Batch:
        """The batch of ``step`` for this rank: a pure function of the plan and the step."""
        p = self.plan
        epoch, within = divmod(step, p.steps_per_epoch)
        global_indices = p.order.indices(epoch, within * p.global_batch, (within + 1) * p.global_batch)
        local = global_indices[p.rank * p.micro : (p.rank + 1) * p.micro]
        masks = batch_masks(p.masker, p.seed, epoch, global_indices)  # all ranks': the global token count
        targets, crops = None, None
        if p.targets is not None:
            targets, crops = p.targets.get(local, epoch % p.targets.views_per_item)
        stored = crops_to_views(crops) if p.view_mode == "stored" else [None] * len(local)
        views = [
            self._view(image, int(i), epoch, v) for i, image, v in zip(local, p.pixels(local), stored, strict=True)
        ]
        images = stack_images(views)
        mask = masks[p.rank * p.micro : (p.rank + 1) * p.micro]
        return Batch(step, torch.from_numpy(local), images, mask, int(masks.sum()), targets)

    def _view(self, image: torch.Tensor, index: int, epoch: int, stored: View | None) -> torch.Tensor:
        p = self.plan
        if p.view_mode == "resize":
            return resize_uint8(image, p.img_size)
        view = stored or p.augment.sample(image.shape[-2], image.shape[-1], view_rng(p.seed, epoch, index))
        return p.augment.apply(image, view)


def batch_masks(generator: BlockMaskGenerator, seed: int, epoch: int, indices: np.ndarray) -> torch.Tensor:
    """(B, N) boolean masks, each drawn from its sample's own seeded generator."""
    from eva_pipeline.masking import mask_rng

    return torch.from_numpy(np.stack([generator(mask_rng(seed, epoch, int(i))).reshape(-1) for i in indices]))


def batch_loader(plan: BatchPlan, start: int, stop: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`PretrainBatches`: yields the batches of steps ``start..stop-1`` in order.

    With workers, each builds every ``num_workers``-th step (decode, crop, masks, target lookup) in parallel and the
    loader interleaves them back in step order.
    """
    return torch.utils.data.DataLoader(
        PretrainBatches(plan, start, stop),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
        collate_fn=_identity,
    )


def _identity(batch: Batch) -> Batch:
    return batch
