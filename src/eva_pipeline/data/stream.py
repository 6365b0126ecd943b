"""Pre-training batches streamed from the manifest: flat memory, deterministic across ranks, workers and restarts.

Everything a training step consumes is a pure function of ``(seed, step)``:

* **Order.** :class:`EpochOrder` makes every epoch a uniform pseudo-random permutation of the whole data set (a
  keyed Feistel network with cycle walking): batches mix all sources and classes as a full shuffle does, the order
  holds O(1) memory (round keys), and position ``p`` of an epoch maps to its sample without the positions before it.
* **Sharding.** Global batch ``b`` is positions ``[b*B, (b+1)*B)`` of its epoch; rank ``r`` of ``R`` takes slice
  ``r`` of it (``B/R`` samples), and loader worker ``w`` of ``W`` builds the steps ``start + w, start + w + W, ...``
  which the DataLoader hands out in step order. Every rank knows the whole global batch, hence the number of masked
  tokens it holds (the loss's global token mean).
* **Views.** ``resize``: the whole image, resized; ``augment``: EVA's RandomResizedCrop + flip drawn from
  ``view_rng(seed, epoch, index)``; ``stored``: the crop stored with cached teacher targets for view
  ``epoch % K`` (drawn at extraction from ``view_rng(seed, view, index)``), so student and teacher see one crop.
  For the first K epochs ``stored`` and ``augment`` draw the very same crops.
* **Masks.** Each sample's block mask comes from ``mask_rng(seed, epoch, index)``.

Rows are read through a :class:`RowSource`: an in-memory frame, or the manifest's memory-mapped row index
(:mod:`eva_pipeline.data.row_index`), since a uniform order scatters a batch over the whole manifest. Pixels are read
through :class:`~eva_pipeline.data.images.PixelReader`: a tar-shard member at the offset the index stores, one seek
and one read per image, like an image file; IDX containers from a bounded cache.
"""

from __future__ import annotations

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
from eva_pipeline.data.row_index import RowIndex
from eva_pipeline.data.transforms import resize_uint8

if TYPE_CHECKING:
    from eva_pipeline.masking import BlockMaskGenerator

ViewMode = Literal["resize", "augment", "stored"]
ROW_COLUMNS: tuple[str, ...] = ("location", "width", "height")


# ------------------------------------------------------------------------------------------------------- order
#: Rounds of the Feistel network behind :class:`EpochOrder`. Luby-Rackoff: 4 rounds of random functions make a
#: strong pseudo-random permutation of large halves; on tiny domains 8 rounds leave a measurable bias (the 120
#: orders of 5 items over 24k seeds: chi2 175, a uniform shuffle 119 +- 15), 12 do not (123).
FEISTEL_ROUNDS: int = 12
#: Smallest domain of the network, in bits: halves of 1 bit mix poorly (5 items in 3 bits: chi2 663).
_MIN_BITS: int = 4
#: Mixed into the seed of every epoch's round keys, so that the order never shares a stream with masks or views.
_ORDER_TAG: int = 0xFE157E1
# splitmix64 (Steele, Lea and Flood 2014): increment and finalizer multipliers.
_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SPLITMIX_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_SPLITMIX_MUL2 = np.uint64(0x94D049BB133111EB)
_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31))
_PAIR = np.uint64(2)  # the parity step swaps values 0 and 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function, elementwise on uint64 (wrapping arithmetic): a 64-bit bijective mixer."""
    x = x + _SPLITMIX_GAMMA
    x = (x ^ (x >> _SHIFTS[0])) * _SPLITMIX_MUL1
    x = (x ^ (x >> _SHIFTS[1])) * _SPLITMIX_MUL2
    return x ^ (x >> _SHIFTS[2])


class EpochOrder:
    """The sample order of every epoch: a keyed pseudo-random permutation of ``[0, num_items)`` per epoch.

    A Feistel network on ``n``-bit integers (the fewest bits that count ``num_items``, at least :data:`_MIN_BITS`:
    the domain is under 2x the data), halves of ``n // 2`` and ``n - n // 2`` bits, with :data:`FEISTEL_ROUNDS`
    rounds ``(L, R) -> (R, L ^ F(R ^ k_i))``, ``F`` the low bits of splitmix64 and ``k_i`` round keys drawn from
    ``SeedSequence([seed, epoch, tag])``, then a keyed swap of 0 and 1 (rounds of XORs are even permutations), is a
    bijection of the domain; cycle walking (re-applying it until the value falls below ``num_items``) restricts it
    to a bijection of the data. Position ``p`` of an epoch maps to its sample without the positions before it and
    without state: memory is O(1) (the round keys), a batch of positions costs a few vectorised passes (about 3 ms
    for 4096 at 29.7M items).
    """

    def __init__(self, num_items: int, seed: int) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be positive, got {num_items}")
        self.num_items, self.seed = num_items, seed
        bits = max(_MIN_BITS, (num_items - 1).bit_length())  # the domain [0, 2**bits) holds under 2x the data
        self.left_bits, self.right_bits = bits // 2, bits - bits // 2
        self._keys: tuple[int, np.ndarray] | None = None  # (epoch, round keys)

    def _round_keys(self, epoch: int) -> np.ndarray:
        """``FEISTEL_ROUNDS`` round keys, then the key of the parity step."""
        if self._keys is None or self._keys[0] != epoch:
            seq = np.random.SeedSequence([self.seed, epoch, _ORDER_TAG])
            self._keys = (epoch, seq.generate_state(FEISTEL_ROUNDS + 1, dtype=np.uint64))
        return self._keys[1]

    def _feistel(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        a, b = self.left_bits, self.right_bits
        left, right = x >> np.uint64(b), x & np.uint64((1 << b) - 1)
        for key in keys[:FEISTEL_ROUNDS]:  # (L: a bits, R: b bits) -> (R: b bits, L ^ F(R): a bits)
            left, right = right, left ^ (_splitmix64(right ^ key) & np.uint64((1 << a) - 1))
            a, b = b, a
        x = (left << np.uint64(b)) | right  # (a, b): the halves' widths after the last round
        # XOR by a constant on a half of 2+ bits is an even permutation, and cycle walking from even permutations
        # alone is biased on small data; swapping 0 and 1 for half of the keys reaches the odd ones too.
        swap = np.uint64(keys[FEISTEL_ROUNDS] & np.uint64(1))
        return x ^ (swap & (x < _PAIR).astype(np.uint64))

    def indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Sample indices at positions ``[start, stop)`` of ``epoch`` (int64)."""
        if not 0 <= start <= stop <= self.num_items:
            raise ValueError(f"positions [{start}, {stop}) outside the epoch's {self.num_items}")
        keys, limit = self._round_keys(epoch), np.uint64(self.num_items)
        x = self._feistel(np.arange(start, stop, dtype=np.uint64), keys)
        walking = np.flatnonzero(x >= limit)
        while walking.size:  # cycle walking: ends, as the cycle through a position < num_items holds one
            y = self._feistel(x[walking], keys)
            x[walking] = y
            walking = walking[y >= limit]
        return x.astype(np.int64)

    def epoch(self, epoch: int) -> np.ndarray:
        """The whole order of one epoch (tests and small data only: memory grows with the data set)."""
        return self.indices(epoch, 0, self.num_items)


# -------------------------------------------------------------------------------------------------------- rows
class RowSource(Protocol):
    """Random access to the rows of one split: ``rows(indices)`` -> frame with :data:`ROW_COLUMNS` (and, from the
    row index, tar member spans), in order."""

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
    """The rows of one split of a manifest Parquet file, through its memory-mapped row index.

    The index (:class:`~eva_pipeline.data.row_index.RowIndex`) is built once per manifest file and split, streamed
    over the row groups, and shared by every rank and worker; a lookup is O(batch) reads of the maps, whatever the
    order. Rows carry the data span of tar-shard members, so :class:`ManifestPixels` reads each with one seek.
    ``root``: the folder relative shard paths resolve against (default: the working directory); ``cache_dir``:
    where the index lives (default: next to the manifest).
    """

    def __init__(
        self,
        path: str | Path,
        split: str,
        root: str | Path | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.path, self.split = str(path), split
        self.index = RowIndex.open(path, split, root=root, cache_dir=cache_dir)

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, indices: np.ndarray) -> pd.DataFrame:
        try:
            return self.index.rows(indices)
        except IndexError:
            raise IndexError(f"row index out of range for the {len(self)} '{self.split}' rows of {self.path}") from None


# ------------------------------------------------------------------------------------------------------ pixels
class ManifestPixels:
    """Pixels of sample indices: manifest rows (a :class:`RowSource`) decoded by a :class:`PixelReader`."""

    def __init__(self, rows: Any, root: str | Path | None = None) -> None:
        self.rows, self.reader = rows, PixelReader(root)

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, indices: np.ndarray) -> list[torch.Tensor]:
        frame = self.rows.rows(indices)
        spans = None
        if "member_offset" in frame.columns:  # tar members located by the row index: one seek each
            spans = list(zip(frame["member_offset"].tolist(), frame["member_size"].tolist()))
        pixels = self.reader.read(frame["location"].tolist(), spans)
        return [torch.from_numpy(a).permute(2, 0, 1) for a in pixels]


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
