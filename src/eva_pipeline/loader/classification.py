"""Labelled image batches for fine-tuning and evaluation: manifest rows (or in-memory images) + labels -> batches.

:class:`ClassificationDataset` is map-style: item ``i`` at epoch ``e`` is ``transform`` applied to image ``i`` with
Python's, NumPy's and torch's global RNGs seeded from :func:`sample_seed` ``(seed, e, i)`` and restored afterwards
(the one seeded application of a transform in the project; ``finetune`` sits above ``loader`` in the layers,
so the transform is an argument and the seeding is done here). An item therefore does not depend on which worker
draws it, on how many workers there are, or on what ran before: batches are the same with 0 or N workers and after
a restart at any epoch.

:func:`classification_loader` gives one epoch's ``DataLoader``: with ``shuffle`` the order is
:class:`~eva_pipeline.loader.order.EpochOrder` ``(len(dataset), seed)`` at ``epoch`` (a keyed permutation, the same
on every run and machine, another one every epoch), else dataset order. Batches are ``(images, labels)``: float
images from the transform, labels int64. Training drops the last partial batch (timm's ``Mixup`` needs an even,
full batch); evaluation keeps it, so every item is seen exactly once.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from eva_pipeline.loader.order import EpochOrder
from eva_pipeline.loader.pixels import ManifestPixels, TensorPixels
from eva_pipeline.loader.rows import FrameRows

#: Mixed into every per-sample seed, so that the augmentation never shares a stream with the order, masks or views.
_CLASSIFICATION_TAG: int = 0xC1A55
#: Per-sample seeds are below 2**63: valid for ``random.seed``, ``torch.manual_seed`` and (mod 2**32) NumPy.
_SEED_MASK: int = 2**63 - 1

#: A fine-tuning transform: PIL image (mode ``L`` or ``RGB``) -> (C, H, W) float tensor.
Transform = Callable[[Image.Image], torch.Tensor]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of item ``index`` at ``epoch``: a pure function of the three (and nothing else)."""
    state = np.random.SeedSequence([seed, epoch, index, _CLASSIFICATION_TAG]).generate_state(2, np.uint32)
    return (int(state[0]) << 32 | int(state[1])) & _SEED_MASK


def seeded_call(transform: Transform, image: Image.Image, seed: int) -> torch.Tensor:
    """``transform(image)`` with Python's, NumPy's and torch's global RNGs seeded from ``seed`` (timm's ops draw
    from all three) and restored afterwards: an augmentation that is a function of (seed, epoch, index) like every
    other draw in this project."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            # The CPU generator the transforms draw from; torch.manual_seed would also queue a lazy seeding of
            # every accelerator with a captured stack trace: ~2.5 ms per image, more than the augmentation itself.
            torch.default_generator.manual_seed(seed)
            return transform(image)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """uint8 (C, H, W), C 1 or 3 -> PIL image of mode ``L`` or ``RGB`` (the transform converts to RGB)."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[0] not in (1, 3):
        raise ValueError(f"expected uint8 (1 or 3, H, W) pixels, got {pixels.dtype} {tuple(pixels.shape)}")
    array = pixels.permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)  # uint8 2-D -> L, (H, W, 3) -> RGB


def labels_tensor(labels: Any, num_items: int) -> torch.Tensor:
    """Labels (tensor, array, sequence or a manifest ``label`` Series, Int64) -> int64 tensor of ``num_items``;
    a missing or negative label is refused (an unlabelled row cannot be fine-tuned on)."""
    if isinstance(labels, pd.Series):
        if labels.isna().any():
            raise ValueError(f"{int(labels.isna().sum())} row(s) have no label: fine-tuning needs labelled rows")
        labels = labels.to_numpy(dtype=np.int64)
    out = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if out.is_floating_point() or out.is_complex() or out.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got {out.dtype}")
    out = out.to(torch.int64).reshape(-1)
    if out.numel() != num_items:
        raise ValueError(f"{out.numel()} labels for {num_items} images")
    if out.numel() and int(out.min()) < 0:
        raise ValueError(f"labels must be non-negative, got {int(out.min())}")
    return out


class ClassificationDataset(torch.utils.data.Dataset):
    """Item ``i``: ``(transform(image i), label i)``, augmented with :func:`sample_seed` ``(seed, epoch, i)``.

    ``pixels``: a :class:`~eva_pipeline.loader.pixels.ManifestPixels` (rows of a manifest split) or a
    :class:`~eva_pipeline.loader.pixels.TensorPixels` (uint8 (N, C, H, W) in memory), or a uint8 tensor (wrapped).
    ``labels``: one non-negative integer per image (see :func:`labels_tensor`). ``transform``: PIL image -> tensor,
    e.g. ``finetune.augment.train_transform(...)`` or ``eval_transform(...)``. Call :meth:`set_epoch` before
    building an epoch's loader (:func:`classification_loader` does it): workers get a copy of the dataset then.
    """

    def __init__(self, pixels: Any, labels: Any, transform: Transform, seed: int = 0) -> None:
        self.pixels = TensorPixels(pixels) if isinstance(pixels, torch.Tensor) else pixels
        self.labels = labels_tensor(labels, len(self.pixels))
        self.transform, self.seed, self.epoch = transform, int(seed), 0

    @classmethod
    def from_manifest(
        cls, rows: pd.DataFrame, transform: Transform, seed: int = 0, root: str | Path | None = None
    ) -> ClassificationDataset:
        """The rows of one manifest split (a frame with ``location``, ``width``, ``height``, ``label``), read by
        :class:`ManifestPixels` (locations relative to ``root``, default the working directory)."""
        if "label" not in rows.columns:
            raise ValueError("the manifest rows have no 'label' column")
        return cls(ManifestPixels(FrameRows(rows), root=root), rows["label"], transform, seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pixels)

    def _item(self, index: int, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = seeded_call(self.transform, to_pil(pixels), sample_seed(self.seed, self.epoch, index))
        return image, self.labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        (pixels,) = self.pixels(np.asarray([index], dtype=np.int64))
        return self._item(index, pixels)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A batch of items with one pixel read (containers shared by the batch are opened once)."""
        index = np.asarray(indices, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"indices out of range for {len(self)} items")
        return [self._item(int(i), p) for i, p in zip(index.tolist(), self.pixels(index), strict=True)]


class EpochSampler(torch.utils.data.Sampler[int]):
    """The indices of one epoch in :class:`EpochOrder` ``(num_items, seed)`` order.

    With ``global_batch``: only whole global batches, from batch ``start_batch`` on (a resumed run skips what it
    trained on without building those items), each giving rank ``rank`` of ``world`` its contiguous share.
    """

    def __init__(
        self,
        num_items: int,
        seed: int,
        epoch: int,
        *,
        global_batch: int | None = None,
        start_batch: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.order, self.epoch = EpochOrder(num_items, seed), int(epoch)
        self.global_batch, self.start_batch, self.rank, self.world = global_batch, start_batch, rank, world
        if global_batch is not None and (global_batch % world or not 0 <= rank < world):
            raise ValueError(f"global batch {global_batch} must split evenly over {world} ranks (rank {rank})")

    def _positions(self) -> np.ndarray:
        n = self.order.num_items
        if self.global_batch is None:
            return np.arange(n)
        micro = self.global_batch // self.world
        batches = np.arange(self.start_batch, n // self.global_batch)
        share = np.arange(self.rank * micro, (self.rank + 1) * micro)
        return (batches[:, None] * self.global_batch + share[None, :]).reshape(-1)

    def __len__(self) -> int:
        return len(self._positions())

    def __iter__(self) -> Iterator[int]:
        return iter(self.order.epoch(self.epoch)[self._positions()].tolist())


def classification_loader(
    dataset: ClassificationDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 0,
    drop_last: bool | None = None,
    start_batch: int = 0,
    rank: int = 0,
    world: int = 1,
) -> torch.utils.data.DataLoader:
    """One epoch of ``(images, labels)`` batches of ``dataset`` (its epoch is set to ``epoch``).

    ``shuffle``: order by :class:`EpochOrder` ``(len(dataset), seed)`` at ``epoch`` (training), else dataset order
    (evaluation). ``drop_last`` defaults to ``shuffle``: training batches are all full (timm's Mixup needs even
    batches), evaluation sees every item once. Batches do not depend on ``num_workers``. Training only:
    ``start_batch`` skips the epoch's first global batches (a resumed run), and with ``world`` > 1 each rank gets its
    contiguous ``batch_size / world`` share of every global batch of ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    drop_last = shuffle if drop_last is None else drop_last
    if drop_last and len(dataset) < batch_size:
        raise ValueError(f"{len(dataset)} items make no full batch of {batch_size} (drop_last)")
    if (start_batch or world > 1) and not (shuffle and drop_last):
        raise ValueError("start_batch and world > 1 are for training loaders (shuffle, drop_last)")
    dataset.set_epoch(epoch)
    if shuffle:
        sharded = start_batch or world > 1
        sampler: torch.utils.data.Sampler[int] = EpochSampler(
            len(dataset),
            seed,
            epoch,
            global_batch=batch_size if sharded else None,
            start_batch=start_batch,
            rank=rank,
            world=world,
        )
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size // world,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),  # workers' base seed; items do not use it
        persistent_workers=False,  # a new epoch's loader sends the dataset at its epoch
    )
