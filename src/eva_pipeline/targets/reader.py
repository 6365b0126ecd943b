"""Reading a complete target store: :class:`TargetReader` (lazy, memory-flat) and :func:`read_shard`.

Every shard is memory-mapped and validated when opened (:func:`read_shard`): its fingerprint, layout, rows, dtype,
per-row shape and crops must agree with ``meta.json`` and with the other shards (see
:mod:`eva_pipeline.targets.layout`); a bad one raises :class:`~eva_pipeline.targets.layout.TargetStoreError`
naming the shard. :meth:`TargetStore.reader <eva_pipeline.targets.store.TargetStore.reader>` checks the store is
complete and builds the reader.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from eva_pipeline.loader.augment import CROP_DTYPE, CROP_FIELDS
from eva_pipeline.targets.layout import (
    RERUN_HINT,
    STORE_FORMAT,
    TARGET_DTYPE,
    Reference,
    TargetStoreError,
    crop_problem,
    shard_name,
)

DEFAULT_MAX_OPEN_SHARDS: int = 16

IndexLike = np.ndarray | Tensor | Sequence[int] | int


def _as_index(values: IndexLike, name: str) -> np.ndarray:
    """An int64 numpy array (0-d or 1-d) from an int, sequence, numpy array or CPU tensor of integers."""
    if isinstance(values, Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got a {values.dtype} tensor")
        array = values.detach().cpu().numpy()
    else:
        array = np.asarray(values)
        if array.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got {array.dtype}")
    if array.ndim > 1:
        raise ValueError(f"{name} must be an int or a 1-d array, got shape {array.shape}")
    return array.astype(np.int64, copy=False)


class TargetReader:
    """Random access to a complete store's rows without loading it: shards are memory-mapped on first use.

    At most ``max_open_shards`` shards stay open (least recently used first out); a get touches only the pages of
    the rows it reads, so resident memory stays flat whatever the store's size. Picklable: the pickle holds the
    folder and layout, never an open shard, and each process (DataLoader worker, forked or spawned) opens its own
    shards lazily. Every opened shard is validated by :func:`read_shard`, as
    :meth:`~eva_pipeline.targets.store.TargetStore.load` does (fingerprint, layout, rows, dtype, per-row shape and
    crops agreeing with shard 0); a bad one raises TargetStoreError naming the shard. Built by
    :meth:`~eva_pipeline.targets.store.TargetStore.reader`, which checks the store is complete and opens shard 0 to
    learn the shape.
    Share it between processes, not threads (the shard cache is not locked).
    """

    def __init__(self, root: str | os.PathLike[str], meta: Mapping[str, Any], max_open_shards: int) -> None:
        if not isinstance(max_open_shards, int) or max_open_shards < 1:
            raise ValueError(f"max_open_shards must be a positive int, got {max_open_shards!r}")
        self.root = Path(root)
        self._meta = dict(meta)
        self.max_open_shards = max_open_shards
        self._reset()
        targets, crops = self._shard(0, check=False)
        self._reference = (tuple(targets.shape[1:]), crops is not None)

    def _reset(self) -> None:
        self._cache: OrderedDict[int, tuple[Tensor, Tensor | None]] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "meta": self._meta,
            "max_open_shards": self.max_open_shards,
            "reference": self._reference,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root, self._meta = state["root"], state["meta"]
        self.max_open_shards, self._reference = state["max_open_shards"], state["reference"]
        self._reset()

    # -- description --------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> dict[str, Any]:
        return self._meta["fingerprint"]

    @property
    def num_items(self) -> int:
        return int(self._meta["num_items"])

    @property
    def views_per_item(self) -> int:
        return int(self._meta["views_per_item"])

    @property
    def num_rows(self) -> int:
        return int(self._meta["num_rows"])

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-row target shape (num_tokens, dim)."""
        return self._reference[0]

    @property
    def has_crops(self) -> bool:
        return self._reference[1]

    @property
    def open_shards(self) -> tuple[int, ...]:
        """Indices of the shards this process holds open, least recently used first."""
        if self._pid != os.getpid():
            return ()
        return tuple(self._cache)

    def close(self) -> None:
        """Drop every open shard (they are reopened on demand)."""
        self._cache.clear()

    # -- access -------------------------------------------------------------------------------------------------
    def _shard(self, index: int, check: bool = True) -> tuple[Tensor, Tensor | None]:
        if self._pid != os.getpid():  # a forked worker: never share the parent's maps
            self._reset()
        hit = self._cache.get(index)
        if hit is not None:
            self._cache.move_to_end(index)
            return hit
        shard = read_shard(self.root, self._meta, index, self._reference if check else None)
        self._cache[index] = shard
        while len(self._cache) > self.max_open_shards:
            self._cache.popitem(last=False)
        return shard

    def get(self, items: IndexLike, views: IndexLike = 0) -> tuple[Tensor, Tensor | None]:
        """Targets fp16 (n, num_tokens, dim) and crops int32 (n, 5) (None without crops) of (item, view) pairs.

        ``items`` and ``views`` are ints, sequences, numpy arrays or CPU tensors of integers, broadcast against
        each other (e.g. one view for all items). IndexError for an item or view out of range.
        """
        item_arr, view_arr = _as_index(items, "items"), _as_index(views, "views")
        try:
            item_arr, view_arr = np.broadcast_arrays(item_arr, view_arr)
        except ValueError:
            raise ValueError(
                f"items and views must have the same length (or views be one int), got {item_arr.shape} and "
                f"{view_arr.shape}"
            ) from None
        item_arr, view_arr = np.atleast_1d(item_arr), np.atleast_1d(view_arr)
        for name, arr, bound in (("item", item_arr, self.num_items), ("view", view_arr, self.views_per_item)):
            bad = arr[(arr < 0) | (arr >= bound)]
            if bad.size:
                raise IndexError(f"{name} {int(bad[0])} out of range: the store at {self.root} has {bound} {name}s")
        return self.get_rows(item_arr * self.views_per_item + view_arr)

    def get_rows(self, rows: IndexLike) -> tuple[Tensor, Tensor | None]:
        """Like :meth:`get` for row numbers (row = item * views_per_item + view)."""
        rows = np.atleast_1d(_as_index(rows, "rows"))
        bad = rows[(rows < 0) | (rows >= self.num_rows)]
        if bad.size:
            raise IndexError(f"row {int(bad[0])} out of range: the store at {self.root} has {self.num_rows} rows")
        n, shard_size = len(rows), int(self._meta["shard_size"])
        targets = torch.empty((n, *self.shape), dtype=TARGET_DTYPE)
        crops = torch.empty((n, len(CROP_FIELDS)), dtype=CROP_DTYPE) if self.has_crops else None
        shards = rows // shard_size
        order = np.argsort(shards, kind="stable")
        bounds = np.flatnonzero(np.diff(shards[order])) + 1
        for group in np.split(order, bounds) if n else []:
            shard_targets, shard_crops = self._shard(int(shards[group[0]]))
            offsets = torch.from_numpy(rows[group] - int(shards[group[0]]) * shard_size)
            where = torch.from_numpy(group)
            targets[where] = shard_targets.index_select(0, offsets)
            if crops is not None:
                crops[where] = shard_crops.index_select(0, offsets)
        return targets, crops


def read_shard(
    root: Path, meta: Mapping[str, Any], index: int, reference: Reference | None = None
) -> tuple[Tensor, Tensor | None]:
    """(targets, crops or None) of shard ``index``, memory-mapped and validated; TargetStoreError naming it.

    ``reference`` (per-row shape, has crops), when given, is what every shard of the store must agree with.
    """
    path = Path(root) / shard_name(index, meta["layout"])
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise TargetStoreError(f"target shard {path} is missing: {RERUN_HINT}") from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/UnpicklingError/zip errors for bad files
        reason = f"{type(exc).__name__}: {exc}"
        raise TargetStoreError(f"target shard {path} is corrupt ({reason}): {RERUN_HINT}") from exc
    shard_size, num_rows = int(meta["shard_size"]), int(meta["num_rows"])
    start = index * shard_size
    rows = min(shard_size, num_rows - start)
    problem = None
    targets = payload.get("targets") if isinstance(payload, dict) else None
    crops = payload.get("crops") if isinstance(payload, dict) else None
    if not isinstance(targets, Tensor):
        problem = "holds no targets tensor"
    elif payload.get("fingerprint_hash") != meta["fingerprint_hash"]:
        problem = "belongs to a different fingerprint"
    elif payload.get("layout") != meta["layout"] or payload.get("format") != STORE_FORMAT:
        problem = f"belongs to another layout ({payload.get('layout')}, format {payload.get('format')})"
    elif payload.get("start") != start or payload.get("stop") != start + rows or targets.shape[0] != rows:
        problem = f"covers the wrong rows (expected {start}..{start + rows})"
    elif targets.dtype != TARGET_DTYPE or targets.ndim != 3:
        problem = f"has {targets.dtype} targets of shape {tuple(targets.shape)}"
    elif reference is not None and tuple(targets.shape[1:]) != reference[0]:
        problem = f"has targets of shape {tuple(targets.shape[1:])} per row, other shards have {reference[0]}"
    elif crops is not None and (bad_crops := crop_problem(crops, rows)) is not None:
        problem = f"has malformed crops ({bad_crops})"
    elif reference is not None and (crops is not None) != reference[1]:
        problem = "has crops, other shards have none" if crops is not None else "has no crops, other shards have"
    if problem:
        raise TargetStoreError(f"target shard {path} is corrupt: it {problem}: {RERUN_HINT}")
    return targets, crops
