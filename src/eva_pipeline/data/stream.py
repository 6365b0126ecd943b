"""Pre-training batches streamed from the manifest: flat memory, deterministic across ranks, workers and restarts.

Everything a training step consumes is a pure function of ``(seed, step)``:

* **Order.** :class:`EpochOrder` shuffles an epoch in *windows*: the sample indices are cut into blocks of
  ``block_size`` consecutive rows, the blocks are permuted, and each run of ``window_blocks`` permuted blocks is
  shuffled as one window. Memory is one window of indices, not a permutation of the whole data set; reading rows
  stays sequential within a block (manifest row groups, tar shards); a data set no larger than one window gets a
  full uniform permutation. Position ``p`` of an epoch is found without generating the positions before it.
* **Sharding.** Global batch ``b`` is positions ``[b*B, (b+1)*B)`` of its epoch; rank ``r`` of ``R`` takes slice
  ``r`` of it (``B/R`` samples), and loader worker ``w`` of ``W`` builds the steps ``start + w, start + w + W, ...``
  which the DataLoader hands out in step order. Every rank knows the whole global batch, hence the number of masked
  tokens it holds (the loss's global token mean).
* **Views.** ``resize``: the whole image, resized; ``augment``: EVA's RandomResizedCrop + flip drawn from
  ``view_rng(seed, epoch, index)``; ``stored``: the crop stored with cached teacher targets for view
  ``epoch % K`` (drawn at extraction from ``view_rng(seed, view, index)``), so student and teacher see one crop.
  For the first K epochs ``stored`` and ``augment`` draw the very same crops.
* **Masks.** Each sample's block mask comes from ``mask_rng(seed, epoch, index)``.

Rows are read through a :class:`RowSource` (an in-memory frame, or the manifest Parquet read row group by row group)
and pixels through :class:`~eva_pipeline.data.images.PixelReader`; both hold bounded caches only.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import pandas as pd
import torch

from eva_pipeline.data.augment import RandomResizedCropFlip, View, view_rng
from eva_pipeline.data.target_store import crops_to_views
from eva_pipeline.data.images import PixelReader
from eva_pipeline.data.transforms import resize_uint8

if TYPE_CHECKING:
    from eva_pipeline.masking import BlockMaskGenerator

ViewMode = Literal["resize", "augment", "stored"]
ROW_COLUMNS: tuple[str, ...] = ("location", "width", "height")


# ------------------------------------------------------------------------------------------------------- order
class EpochOrder:
    """The sample order of every epoch (block-windowed shuffle, see the module docstring)."""

    def __init__(self, num_items: int, seed: int, block_size: int = 4096, window_blocks: int = 16) -> None:
        if num_items < 1 or block_size < 1 or window_blocks < 1:
            raise ValueError(
                f"num_items, block_size and window_blocks must be positive, got {num_items}, {block_size}, "
                f"{window_blocks}"
            )
        self.num_items, self.seed = num_items, seed
        self.block_size, self.window_blocks = block_size, window_blocks
        self.num_blocks = math.ceil(num_items / block_size)
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, block order, window starts)
        self._window: tuple[tuple[int, int], np.ndarray] | None = None

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0x5EED]))
            blocks = rng.permutation(self.num_blocks)
            sizes = np.minimum(self.block_size, self.num_items - blocks * self.block_size)
            ends = np.cumsum(sizes)[self.window_blocks - 1 :: self.window_blocks]
            if len(ends) == 0 or ends[-1] != self.num_items:
                ends = np.append(ends, self.num_items)
            self._epoch = (epoch, blocks, np.concatenate([[0], ends]))
        return self._epoch[1], self._epoch[2]

    def window(self, epoch: int, w: int) -> np.ndarray:
        """The sample indices of window ``w`` of ``epoch``, in training order."""
        if self._window is not None and self._window[0] == (epoch, w):
            return self._window[1]
        blocks, _ = self._layout(epoch)
        members = blocks[w * self.window_blocks : (w + 1) * self.window_blocks]
        indices = np.concatenate(
            [np.arange(b * self.block_size, min((b + 1) * self.block_size, self.num_items)) for b in members]
        )
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, w, 0x5EED1]))
        order = indices[rng.permutation(len(indices))]
        self._window = ((epoch, w), order)
        return order

    def indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Sample indices at positions ``[start, stop)`` of ``epoch``."""
        if not 0 <= start <= stop <= self.num_items:
            raise ValueError(f"positions [{start}, {stop}) outside the epoch's {self.num_items}")
        _, bounds = self._layout(epoch)
        parts = []
        w = int(np.searchsorted(bounds, start, side="right")) - 1
        pos = start
        while pos < stop:
            lo, hi = int(bounds[w]), int(bounds[w + 1])
            take = min(stop, hi)
            parts.append(self.window(epoch, w)[pos - lo : take - lo])
            pos, w = take, w + 1
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def epoch(self, epoch: int) -> np.ndarray:
        """The whole order of one epoch (tests and small data only: memory grows with the data set)."""
        return self.indices(epoch, 0, self.num_items)


# -------------------------------------------------------------------------------------------------------- rows
class RowSource(Protocol):
    """Random access to the rows of one split: ``rows(indices)`` -> frame with :data:`ROW_COLUMNS`, in order."""

    def __len__(self) -> int: ...

    def rows(self, indices: np.ndarray) -> pd.DataFrame: ...


class FrameRows:
    """Rows held in memory (small splits, tests)."""

    def __init__(self, frame: pd.DataFrame) -> None:
        missing = [c for c in ROW_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"the rows need columns {list(ROW_COLUMNS)}; missing {missing}")
        self.frame = frame.loc[:, list(ROW_COLUMNS)].reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.frame)

    def rows(self, indices: np.ndarray) -> pd.DataFrame:
        return self.frame.iloc[np.asarray(indices)]


class ParquetRows:
    """The rows of one split of a manifest Parquet file, read row group by row group (bounded LRU of groups).

    Opening reads only the ``split`` column, to count each row group's rows of the split: memory is
    O(row groups), and a lookup reads the one or few groups that hold the requested rows.
    """

    def __init__(self, path: str | Path, split: str, max_groups: int = 32) -> None:
        import pyarrow.parquet as pq

        self.path, self.split, self.max_groups = str(path), split, max_groups
        file = pq.ParquetFile(self.path)
        counts = [
            int(pd.Series(file.read_row_group(g, columns=["split"]).column("split").to_numpy(zero_copy_only=False))
                .eq(split).sum())
            for g in range(file.num_row_groups)
        ]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._groups: OrderedDict[int, pd.DataFrame] = OrderedDict()
        self._file = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_groups": OrderedDict(), "_file": None}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _group(self, g: int) -> pd.DataFrame:
        if g in self._groups:
            self._groups.move_to_end(g)
            return self._groups[g]
        import pyarrow.parquet as pq

        if self._file is None:
            self._file = pq.ParquetFile(self.path)
        table = self._file.read_row_group(g, columns=[*ROW_COLUMNS, "split"]).to_pandas()
        frame = table.loc[table["split"] == self.split, list(ROW_COLUMNS)].reset_index(drop=True)
        self._groups[g] = frame
        while len(self._groups) > self.max_groups:
            self._groups.popitem(last=False)
        return frame

    def rows(self, indices: np.ndarray) -> pd.DataFrame:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row index out of range for the {len(self)} '{self.split}' rows of {self.path}")
        groups = np.searchsorted(self.starts, indices, side="right") - 1
        parts = []
        for g in np.unique(groups):
            pick = np.flatnonzero(groups == g)
            part = self._group(int(g)).iloc[indices[pick] - self.starts[g]]
            parts.append(part.set_axis(pick))
        return pd.concat(parts).sort_index() if parts else pd.DataFrame(columns=list(ROW_COLUMNS))


# ------------------------------------------------------------------------------------------------------ pixels
class ManifestPixels:
    """Pixels of sample indices: manifest rows (a :class:`RowSource`) decoded by a :class:`PixelReader`."""

    def __init__(self, rows: Any, root: str | Path | None = None) -> None:
        self.rows, self.reader = rows, PixelReader(root)

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, indices: np.ndarray) -> list[torch.Tensor]:
        frame = self.rows.rows(indices)
        return [torch.from_numpy(a).permute(2, 0, 1) for a in self.reader.read(frame["location"].tolist())]


class TensorPixels:
    """Pixels of sample indices from images already in memory (uint8 (N, C, H, W)): tests and tiny data."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __call__(self, indices: np.ndarray) -> list[torch.Tensor]:
        return list(self.images[torch.as_tensor(np.asarray(indices))])


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
        views = [self._view(image, int(i), epoch, v) for i, image, v in zip(local, p.pixels(local), stored)]
        images = _stack(views)
        mask = masks[p.rank * p.micro : (p.rank + 1) * p.micro]
        return Batch(step, torch.from_numpy(local), images, mask, int(masks.sum()), targets)

    def _view(self, image: torch.Tensor, index: int, epoch: int, stored: View | None) -> torch.Tensor:
        p = self.plan
        if p.view_mode == "resize":
            return resize_uint8(image, p.img_size)
        view = stored or p.augment.sample(image.shape[-2], image.shape[-1], view_rng(p.seed, epoch, index))
        return p.augment.apply(image, view)


def teacher_views(
    pixels: Any, img_size: int, views_per_item: int, augment: RandomResizedCropFlip | None, seed: int
) -> Any:
    """``batch_fn`` of target extraction: store rows ``[start, stop)`` -> model input (and crops).

    ``views_per_item`` 0: one row per image, the whole image resized (no crops stored). K >= 1: row ``i*K + k`` is
    view ``k`` of image ``i``, drawn from ``view_rng(seed, k, i)``, the view the ``augment`` loader mode draws in
    epoch ``k``; its crop is returned with the input so that training reads exactly what the teacher saw.
    """
    from eva_pipeline.data.target_store import items_and_views, views_to_crops
    from eva_pipeline.data.transforms import to_model_input

    if views_per_item < 0 or (views_per_item and augment is None):
        raise ValueError(f"views_per_item must be 0, or >= 1 with an augmentation; got {views_per_item}")

    def batch_fn(start: int, stop: int) -> Any:
        if views_per_item == 0:
            images = [resize_uint8(im, img_size) for im in pixels(np.arange(start, stop))]
            return to_model_input(_stack(images), img_size)
        items, views = items_and_views(start, stop, views_per_item)
        unique, inverse = np.unique(items, return_inverse=True)  # each image decoded once for its K views
        decoded = pixels(unique)
        chosen = [
            augment.sample(decoded[j].shape[-2], decoded[j].shape[-1], view_rng(seed, int(k), int(i)))
            for j, i, k in zip(inverse, items, views)
        ]
        crops = [augment.apply(decoded[j], v) for j, v in zip(inverse, chosen)]
        return to_model_input(_stack(crops), img_size), views_to_crops(chosen)

    return batch_fn


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    channels = max(im.shape[0] for im in images)
    return torch.stack([im.expand(channels, -1, -1) for im in images])


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
