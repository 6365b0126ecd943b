"""The on-disk layout of a target store (format 2): file names, ``meta.json``, fingerprints, what a shard holds.

Shared by the writer (:mod:`eva_pipeline.targets.store`) and the reader (:mod:`eva_pipeline.targets.reader`).

A store is a folder holding ``meta.json`` and shards ``shard_00000_<layout>.pt`` ... of ``shard_size`` *rows* each.
A row is one (item, view) pair, laid out item-major: ``row = item * K + view`` with ``K = views_per_item`` (1: one
target per image, as for centre-cropped inputs; :func:`items_and_views`). A shard is a ``torch.save``'d dict::

    {"format": 2, "layout": <layout id>, "fingerprint_hash": <sha256>, "index": i, "start": first row,
     "stop": end row, "targets": fp16 (rows, num_tokens, dim), "crops": int32 (rows, 5) (optional)}

``crops`` holds the crop each target's teacher input was made from: (top, left, height, width, flip) in source
pixels (see :class:`~eva_pipeline.loader.augment.View`), so training can re-apply exactly that crop to the image and
see what the teacher saw.

What the targets depend on (manifest content digest, teacher description, input size, grid, and for augmented
views the seed and augmentation parameters) is a *fingerprint* dict chosen by the caller. Its hash
(:func:`fingerprint_hash`), the format, ``num_items``, ``views_per_item`` and ``shard_size`` make the *layout*; its
short id (:func:`layout_id`, ``layout`` in ``meta.json``) is part of every shard's file name (:func:`shard_name`)
and stored in every shard.

The per-row target shape and whether crops are stored are not in ``meta.json``: each shard carries them (its
tensors' shapes) and readers check that all shards agree.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from eva_pipeline.loader.augment import CROP_DTYPE, CROP_FIELDS

META_FILE: str = "meta.json"
STORE_FORMAT: int = 2
TARGET_DTYPE: torch.dtype = torch.float16
#: A shard's file name: ``shard_<index>_<layout id>.pt`` (:func:`shard_name`).
SHARD_GLOB = "shard_*.pt"
SHARD_RE = re.compile(r"^shard_(\d+)_([0-9a-f]+)\.pt$")
RERUN_HINT = "re-run the teacher_targets pipeline (it recomputes missing and unreadable shards)"
_LAYOUT_ID_CHARS = 12

#: (per-row target shape, has crops): what all shards of a store share.
Reference = tuple[tuple[int, ...], bool]


class TargetStoreError(RuntimeError):
    """The store on disk cannot serve the requested targets; the message says why and what to run."""


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    """sha256 hex of the fingerprint's canonical JSON (sorted keys): equal dicts give equal hashes across runs."""
    try:
        text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"a target fingerprint must be JSON-serialisable (str/int/float/bool/list/dict): {exc}"
        ) from exc
    return hashlib.sha256(text.encode()).hexdigest()


def layout_id(digest: str, num_items: int, views_per_item: int, shard_size: int) -> str:
    """Short id of a store layout (format, fingerprint hash, rows and sharding); part of every shard's file name."""
    layout = {
        "format": STORE_FORMAT,
        "fingerprint_hash": digest,
        "num_items": num_items,
        "views_per_item": views_per_item,
        "shard_size": shard_size,
    }
    return fingerprint_hash(layout)[:_LAYOUT_ID_CHARS]


def shard_name(index: int, layout: str) -> str:
    """File name of shard ``index`` of ``layout`` (matches :data:`SHARD_RE`)."""
    return f"shard_{index:05d}_{layout}.pt"


def items_and_views(start: int, stop: int, views_per_item: int) -> tuple[np.ndarray, np.ndarray]:
    """(item, view) int64 arrays of rows ``start .. stop - 1`` (row = item * views_per_item + view)."""
    rows = np.arange(start, stop, dtype=np.int64)
    return rows // views_per_item, rows % views_per_item


def crop_problem(crops: Any, rows: int) -> str | None:
    """Why ``crops`` is not a valid (rows, 5) int32 crop tensor, or None."""
    if not isinstance(crops, Tensor):
        return f"got {type(crops).__name__}"
    if crops.dtype != CROP_DTYPE or tuple(crops.shape) != (rows, len(CROP_FIELDS)):
        return f"got {crops.dtype} {tuple(crops.shape)}"
    if rows:
        c = crops.cpu()
        if (c[:, :2] < 0).any() or (c[:, 2:4] < 1).any() or ((c[:, 4] != 0) & (c[:, 4] != 1)).any():
            return "got negative top/left, non-positive height/width or a flip other than 0/1"
    return None
