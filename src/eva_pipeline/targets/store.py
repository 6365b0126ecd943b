"""Teacher targets on disk: computed once, reused while inputs and teacher are unchanged, resumable after a crash.

Layout (format 2). A store is a folder holding ``meta.json`` and shards ``shard_00000_<layout>.pt`` ... of
``shard_size`` *rows* each. A row is one (item, view) pair, laid out item-major: ``row = item * K + view`` with
``K = views_per_item`` (1: one target per image, as for centre-cropped inputs). A shard is a ``torch.save``'d dict::

    {"format": 2, "layout": <layout id>, "fingerprint_hash": <sha256>, "index": i, "start": first row,
     "stop": end row, "targets": fp16 (rows, num_tokens, dim), "crops": int32 (rows, 5) (optional)}

``crops`` holds the crop each target's teacher input was made from: (top, left, height, width, flip) in source
pixels (see :class:`~eva_pipeline.loader.augment.View`), so training can re-apply exactly that crop to the image and
see what the teacher saw.

What the targets depend on (manifest content digest, teacher description, input size, grid, and for augmented
views the seed and augmentation parameters) is a *fingerprint* dict chosen by the caller. Its hash, the format,
``num_items``, ``views_per_item`` and ``shard_size`` make the *layout*; its short id (``layout`` in ``meta.json``)
is part of every shard's file name and stored in every shard. Hence:

* ``meta.json`` is fully determined before anything is computed: every rank of a sharded run writes the same bytes
  (atomically), in any order.
* Files of another layout (a stale store, an older format) never share a name with this layout's shards; a run
  deletes them without looking inside, and can never delete a shard of its own layout that another rank of the
  same run has just written. :meth:`TargetStore.is_complete` is exact from file names alone.
* Shards and ``meta.json`` are written to a uniquely named temporary file and renamed (atomic on POSIX), so a
  killed run leaves only whole shards; re-running computes just the missing (or unreadable) ones.

The per-row target shape and whether crops are stored are not in ``meta.json``: each shard carries them (its
tensors' shapes) and readers check that all shards agree.

Several ranks (processes, GPUs, hosts sharing the folder): rank ``r`` of ``world_size`` computes the shards whose
``index % world_size == r``. Each rank calls :meth:`TargetStore.compute` with the same fingerprint and layout; once
every rank has returned (a barrier, or joining the processes), any process checks :meth:`TargetStore.is_complete`
and reads through :meth:`TargetStore.reader` (lazy, memory-flat, usable in DataLoader workers) or
:meth:`TargetStore.load` (everything in RAM, for small stores). No torch.distributed is needed. Two *different*
fingerprints computed concurrently into one folder are not supported (the later one wins, the earlier one fails
or gets recomputed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from eva_pipeline.loader.augment import CROP_DTYPE, CROP_FIELDS

logger = logging.getLogger(__name__)

META_FILE: str = "meta.json"
STORE_FORMAT: int = 2
TARGET_DTYPE: torch.dtype = torch.float16
DEFAULT_MAX_OPEN_SHARDS: int = 16
_SHARD_GLOB = "shard_*.pt"
_SHARD_RE = re.compile(r"^shard_(\d+)_([0-9a-f]+)\.pt$")
_TMP_GLOB = ".*.tmp*"
_TMP_RE = re.compile(r"^\.(.+)\.tmp[^.]*$")
_LAYOUT_ID_CHARS = 12
_STALE_META_TMP_S = 60.0  # a meta.json temporary older than this is a leftover of a killed process
_RERUN_HINT = "re-run the teacher_targets pipeline (it recomputes missing and unreadable shards)"

#: What ``batch_fn`` returns: model-input images, or (images, int32 crops (n, 5)).
BatchFnResult = Tensor | tuple[Tensor, Tensor]
IndexLike = np.ndarray | Tensor | Sequence[int] | int
_Reference = tuple[tuple[int, ...], bool]  # (per-row target shape, has crops): what all shards of a store share


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


def items_and_views(start: int, stop: int, views_per_item: int) -> tuple[np.ndarray, np.ndarray]:
    """(item, view) int64 arrays of rows ``start .. stop - 1`` (row = item * views_per_item + view)."""
    rows = np.arange(start, stop, dtype=np.int64)
    return rows // views_per_item, rows % views_per_item


def _atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    """Write through ``write(tmp)`` then rename over ``path``: readers see the old file or the whole new one.

    The temporary name is unique per call (pid plus random token), so ranks on several hosts sharing the folder
    never write into one another's temporary file.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _crop_problem(crops: Any, rows: int) -> str | None:
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


def _describe_crops_problem(rows: int, problem: str) -> str:
    return f"crops must be a {CROP_DTYPE} tensor ({rows}, 5) = (top, left, height, width, flip) per row; {problem}"


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


class TargetStore:
    """One folder of target shards; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # -- layout -------------------------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.root / META_FILE

    def shard_path(self, index: int, layout: str | None = None) -> Path:
        """Path of shard ``index`` of ``layout`` (default: the layout of the store's ``meta.json``)."""
        if layout is None:
            meta = self.read_meta()
            if meta is None or "layout" not in meta:
                raise self._no_store()
            layout = str(meta["layout"])
        return self.root / f"shard_{index:05d}_{layout}.pt"

    def _no_store(self) -> TargetStoreError:
        return TargetStoreError(f"no target store at {self.root} ({META_FILE} missing): {_RERUN_HINT}")

    @staticmethod
    def num_shards(num_rows: int, shard_size: int) -> int:
        return math.ceil(num_rows / shard_size)

    def read_meta(self) -> dict[str, Any] | None:
        """The store's ``meta.json``, or None when there is none (or it is unreadable: treated as no store)."""
        try:
            meta = json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("target store %s: unreadable %s (%s); treating it as empty", self.root, META_FILE, exc)
            return None
        return meta if isinstance(meta, dict) else None

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        """The fingerprint the shards on disk belong to (None when the folder holds no store)."""
        meta = self.read_meta()
        return None if meta is None else meta.get("fingerprint")

    def _write_meta(self, meta: dict[str, Any]) -> None:
        text = json.dumps(meta, indent=2, sort_keys=True)
        _atomic_write_bytes(self.meta_path, lambda tmp: tmp.write_text(text))

    @staticmethod
    def _meta_usable(meta: Mapping[str, Any] | None) -> bool:
        return meta is not None and meta.get("format") == STORE_FORMAT and "layout" in meta

    def missing_shards(self, meta: Mapping[str, Any]) -> list[int]:
        """Shard indices of ``meta``'s layout whose files are absent."""
        count = self.num_shards(int(meta["num_rows"]), int(meta["shard_size"]))
        return [i for i in range(count) if not self.shard_path(i, meta["layout"]).is_file()]

    def is_complete(self, fingerprint: Mapping[str, Any]) -> bool:
        """True when meta.json belongs to ``fingerprint`` and every shard file exists (shards are not opened).

        Exact from file names: a shard's name carries its layout, so no file of another store can stand in for one.
        """
        meta = self.read_meta()
        return (
            self._meta_usable(meta)
            and meta.get("fingerprint_hash") == fingerprint_hash(fingerprint)
            and not self.missing_shards(meta)
        )

    # -- writing ------------------------------------------------------------------------------------------------
    def _remove_foreign(self, layout: str, rank: int, world_size: int) -> None:
        """Delete shard files of any other layout and stale temporaries this rank may own; keep everything else.

        Shards of ``layout`` are never touched (they may be another rank's fresh output); temporaries of this
        layout only for shards this rank owns; ``meta.json`` temporaries when clearly left over by a dead process.
        """
        old = []
        for path in self.root.glob(_SHARD_GLOB):
            match = _SHARD_RE.match(path.name)
            if match is None or match.group(2) != layout:
                old.append(path)
        if old:
            logger.info("target store %s: removing %d old shard(s) of another layout", self.root, len(old))
        for path in old:
            path.unlink(missing_ok=True)
        for path in self.root.glob(_TMP_GLOB):
            name = _TMP_RE.match(path.name)
            target = name.group(1) if name else ""
            shard = _SHARD_RE.match(target)
            if target.startswith("shard_") and target.endswith(".pt"):  # a shard's (of any layout or format)
                mine = shard is None or shard.group(2) != layout or int(shard.group(1)) % world_size == rank
            elif target == META_FILE:
                try:
                    mine = world_size == 1 or time.time() - path.stat().st_mtime > _STALE_META_TMP_S
                except FileNotFoundError:
                    mine = False
            else:
                mine = False
            if mine:
                path.unlink(missing_ok=True)

    def _shard_ok(
        self, index: int, meta: Mapping[str, Any], reference: _Reference | None, quiet: bool = False
    ) -> _Reference | None:
        """(per-row target shape, has crops) of a shard left by an earlier run, or None when it is unusable.

        Cheap: with mmap only the zip directory and header are read, not the targets.
        """
        if not self.shard_path(index, meta["layout"]).is_file():
            return None
        try:
            targets, crops = _read_shard(self.root, meta, index, reference)
            return tuple(targets.shape[1:]), crops is not None
        except TargetStoreError as exc:
            if not quiet:
                logger.warning("%s; recomputing it", exc)
            return None

    def _reference(self, meta: Mapping[str, Any], candidates: Sequence[int]) -> _Reference | None:
        """(shape, has crops) of the first readable shard among ``candidates``, or None."""
        for index in candidates:
            found = self._shard_ok(index, meta, None, quiet=True)
            if found is not None:
                return found
        return None

    def expected_meta(
        self, fingerprint: Mapping[str, Any], num_items: int, views_per_item: int, shard_size: int
    ) -> dict[str, Any]:
        """The ``meta.json`` content of this layout: a pure function of the arguments (identical on every rank)."""
        digest = fingerprint_hash(fingerprint)
        meta = {
            "format": STORE_FORMAT,
            "fingerprint": fingerprint,
            "fingerprint_hash": digest,
            "layout": layout_id(digest, num_items, views_per_item, shard_size),
            "num_items": num_items,
            "views_per_item": views_per_item,
            "num_rows": num_items * views_per_item,
            "shard_size": shard_size,
            "dtype": str(TARGET_DTYPE),
            "crop_fields": list(CROP_FIELDS),
        }
        return json.loads(json.dumps(meta))  # tuples -> lists: compares equal to what is read back

    def compute(
        self,
        fingerprint: Mapping[str, Any],
        num_items: int,
        batch_fn: Callable[[int, int], BatchFnResult],
        teacher_fn: Callable[[Tensor], Tensor],
        shard_size: int = 1024,
        progress: bool = True,
        batch_size: int | None = None,
        *,
        views_per_item: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> Path:
        """Fill this rank's shards of the store for ``fingerprint``: ``teacher_fn(batch_fn(start, stop))`` per batch.

        ``num_items`` images with ``views_per_item`` (K) views each make ``num_items * K`` rows, item-major
        (row = item * K + view; :func:`items_and_views` maps a row range back). ``batch_fn(start, stop)`` gets a
        *row* range and returns the model-input images of those rows, or ``(images, crops)`` with crops an int32
        (stop - start, 5) tensor of (top, left, height, width, flip) per row (:func:`views_to_crops`), stored with
        the targets. ``teacher_fn`` must return (rows, num_tokens, dim) float targets; they are stored as fp16 on
        CPU and must stay finite there. The fingerprint must cover everything the rows depend on (for views: the
        seed and augmentation parameters).

        ``shard_size`` is in rows; ``batch_size`` (default: the shard size) splits a shard into several teacher
        calls, bounding accelerator memory independently of the shard size on disk, which changing it does not
        touch. Rank ``rank`` of ``world_size`` computes only the shards with ``index % world_size == rank``; all
        ranks may run concurrently (see the module docstring) and the result does not depend on ``world_size``.
        Shards of the same layout already on disk are kept (resume); files of any other layout are removed.
        Returns the store folder; with several ranks the store is complete once every rank has returned
        (:meth:`is_complete`).
        """
        for name, value in (
            ("num_items", num_items),
            ("shard_size", shard_size),
            ("views_per_item", views_per_item),
            ("world_size", world_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        step = shard_size if batch_size is None else batch_size
        meta = self.expected_meta(fingerprint, num_items, views_per_item, shard_size)
        layout, digest, num_rows = meta["layout"], meta["fingerprint_hash"], meta["num_rows"]
        self.root.mkdir(parents=True, exist_ok=True)

        on_disk = self.read_meta()
        if on_disk != meta:
            if on_disk is None:
                reason = f"new store for fingerprint {digest[:12]}"
            elif on_disk.get("fingerprint_hash") != digest:
                reason = f"fingerprint changed ({str(on_disk.get('fingerprint_hash'))[:12]} -> {digest[:12]})"
            else:
                reason = "layout changed (format/num_items/views_per_item/shard_size)"
            logger.info("target store %s: %s (layout %s)", self.root, reason, layout)
        self._remove_foreign(layout, rank, world_size)
        if on_disk != meta:
            self._write_meta(meta)  # identical bytes from every rank: the order of the ranks does not matter
        else:
            logger.info("target store %s: resuming layout %s (rank %d/%d)", self.root, layout, rank, world_size)

        count = self.num_shards(num_rows, shard_size)
        mine = list(range(rank, count, world_size))
        # Shards already on disk must agree on the per-row shape and on having crops; readers take shard 0 as the
        # reference, so does this check when shard 0 is readable, else the first readable shard of this rank.
        reference = self._reference(meta, [0])
        todo = []
        for index in mine:
            found = self._shard_ok(index, meta, reference)
            if found is None:
                todo.append(index)
            elif reference is None:
                reference = found
        if reference is None:  # e.g. a fresh rank: agree with what other ranks already wrote
            reference = self._reference(meta, [i for i in range(count) if i % world_size != rank])
        from_disk = reference is not None

        def rows_of(index: int) -> int:
            return min(shard_size, num_rows - index * shard_size)

        total = sum(rows_of(i) for i in mine)
        if not todo:
            logger.info(
                "target store %s: all %d shard(s) of rank %d present, nothing to compute", self.root, len(mine), rank
            )
        desc = "teacher targets" if world_size == 1 else f"teacher targets (rank {rank}/{world_size})"
        with tqdm(
            total=total, initial=total - sum(rows_of(i) for i in todo), disable=not progress, desc=desc, unit="row"
        ) as bar:
            for index in todo:
                start = index * shard_size
                stop = start + rows_of(index)
                parts, crop_parts = [], []
                for lo in range(start, stop, step):
                    hi = min(lo + step, stop)
                    with torch.no_grad():
                        images, crops = _split_batch(batch_fn(lo, hi), index, hi - lo)
                        part = teacher_fn(images)
                    part = self._check_targets(part, index, hi - lo, reference, crops is not None, from_disk)
                    if reference is None:  # later batches are checked against the first one
                        reference = (tuple(part.shape[1:]), crops is not None)
                    parts.append(part)
                    if crops is not None:
                        crop_parts.append(crops)
                    bar.update(hi - lo)
                payload = {
                    "format": STORE_FORMAT,
                    "layout": layout,
                    "fingerprint_hash": digest,
                    "index": index,
                    "start": start,
                    "stop": stop,
                    "targets": parts[0] if len(parts) == 1 else torch.cat(parts),
                }
                if crop_parts:
                    payload["crops"] = crop_parts[0] if len(crop_parts) == 1 else torch.cat(crop_parts)
                _atomic_write_bytes(self.shard_path(index, layout), lambda tmp, p=payload: torch.save(p, tmp))
        return self.root

    def _check_targets(
        self,
        targets: Tensor,
        index: int,
        rows: int,
        reference: _Reference | None,
        has_crops: bool,
        from_disk: bool = False,
    ) -> Tensor:
        if not isinstance(targets, Tensor) or targets.ndim != 3 or targets.shape[0] != rows:
            got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(f"teacher_fn must return ({rows}, num_tokens, dim) targets (shard {index}), got {got}")
        # Shards on disk of the same fingerprint that disagree mean the fingerprint missed a change of the code.
        hint = (
            f"; the shards already in {self.root} were made differently under the same fingerprint: put what "
            "changed into the fingerprint (or delete the store)"
            if from_disk
            else ""
        )
        if reference is not None and tuple(targets.shape[1:]) != reference[0]:
            raise ValueError(
                f"teacher_fn returned targets of shape {tuple(targets.shape[1:])} per row for shard {index}, "
                f"earlier targets of this store have {reference[0]}{hint}"
            )
        if reference is not None and has_crops != reference[1]:
            said = "returned" if has_crops else "did not return"
            raise ValueError(
                f"batch_fn {said} crops for shard {index}, unlike for earlier shards of this store: return "
                f"(images, crops) for every batch or for none{hint}"
            )
        out = targets.detach().to(device="cpu", dtype=TARGET_DTYPE).contiguous()
        if not torch.isfinite(out).all():
            raise ValueError(
                f"shard {index}: targets are not finite in {TARGET_DTYPE} (NaN, or beyond fp16 range 65504); "
                "check the teacher's output scale"
            )
        return out

    # -- reading ------------------------------------------------------------------------------------------------
    def _checked_meta(self, expected_fingerprint: Mapping[str, Any] | None) -> dict[str, Any]:
        """meta.json of a complete store of ``expected_fingerprint`` (if given), else TargetStoreError."""
        meta = self.read_meta()
        if meta is None:
            raise self._no_store()
        if not self._meta_usable(meta):
            raise TargetStoreError(
                f"target store {self.root} has format {meta.get('format')}, this code reads format {STORE_FORMAT}: "
                f"{_RERUN_HINT}"
            )
        if expected_fingerprint is not None and meta.get("fingerprint_hash") != fingerprint_hash(expected_fingerprint):
            changed = _diff_keys(meta.get("fingerprint") or {}, expected_fingerprint)
            raise TargetStoreError(
                f"target store {self.root} was computed for a different fingerprint (differs in {changed}): "
                f"{_RERUN_HINT}"
            )
        missing = self.missing_shards(meta)
        if missing:
            total = self.num_shards(int(meta["num_rows"]), int(meta["shard_size"]))
            names = ", ".join(self.shard_path(i, meta["layout"]).name for i in missing[:5])
            names += " ..." if len(missing) > 5 else ""
            raise TargetStoreError(
                f"target store {self.root} is incomplete: {len(missing)} of {total} shard(s) missing ({names}): "
                f"{_RERUN_HINT}"
            )
        return meta

    def load(
        self, expected_fingerprint: Mapping[str, Any] | None = None, with_crops: bool = False
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """All targets (num_rows, num_tokens, dim) fp16 on CPU, rows item-major; for small stores.

        With one view per item the rows are the items. ``with_crops`` returns ``(targets, crops)`` with crops int32
        (num_rows, 5), or None when the store has none. TargetStoreError if absent, stale, incomplete or damaged.
        For stores larger than RAM use :meth:`reader`.
        """
        meta = self._checked_meta(expected_fingerprint)
        shard_size = int(meta["shard_size"])
        first, first_crops = _read_shard(self.root, meta, 0)
        out = torch.empty((int(meta["num_rows"]), *first.shape[1:]), dtype=TARGET_DTYPE)  # no second copy
        crops_out = None if first_crops is None else torch.empty((int(meta["num_rows"]), 5), dtype=CROP_DTYPE)
        reference = (tuple(first.shape[1:]), first_crops is not None)
        for index in range(self.num_shards(int(meta["num_rows"]), shard_size)):
            targets, crops = (first, first_crops) if index == 0 else _read_shard(self.root, meta, index, reference)
            out[index * shard_size : index * shard_size + targets.shape[0]] = targets
            if crops_out is not None:
                crops_out[index * shard_size : index * shard_size + targets.shape[0]] = crops
        return (out, crops_out) if with_crops else out

    def reader(
        self, expected_fingerprint: Mapping[str, Any] | None = None, max_open_shards: int = DEFAULT_MAX_OPEN_SHARDS
    ) -> TargetReader:
        """A lazy reader of this store (see :class:`TargetReader`); TargetStoreError as for :meth:`load`."""
        return TargetReader(self.root, self._checked_meta(expected_fingerprint), max_open_shards)


class TargetReader:
    """Random access to a complete store's rows without loading it: shards are memory-mapped on first use.

    At most ``max_open_shards`` shards stay open (least recently used first out); a get touches only the pages of
    the rows it reads, so resident memory stays flat whatever the store's size. Picklable: the pickle holds the
    folder and layout, never an open shard, and each process (DataLoader worker, forked or spawned) opens its own
    shards lazily. Every opened shard is validated like :meth:`TargetStore.load` does (fingerprint, layout, rows,
    dtype, per-row shape and crops agreeing with shard 0); a bad one raises TargetStoreError naming the shard.
    Built by :meth:`TargetStore.reader`, which checks the store is complete and opens shard 0 to learn the shape.
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
        shard = _read_shard(self.root, self._meta, index, self._reference if check else None)
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


def _split_batch(batch: Any, index: int, rows: int) -> tuple[Any, Tensor | None]:
    """(images, crops or None) from what ``batch_fn`` returned; ValueError for malformed crops."""
    if not isinstance(batch, (tuple, list)):
        return batch, None
    if len(batch) != 2:
        raise ValueError(
            f"batch_fn must return images or (images, crops), got a {type(batch).__name__} of {len(batch)} (shard "
            f"{index})"
        )
    images, crops = batch
    problem = _crop_problem(crops, rows)
    if problem is not None:
        raise ValueError(f"batch_fn: {_describe_crops_problem(rows, problem)} (shard {index})")
    return images, crops.detach().to("cpu").contiguous()


def _read_shard(
    root: Path, meta: Mapping[str, Any], index: int, reference: _Reference | None = None
) -> tuple[Tensor, Tensor | None]:
    """(targets, crops or None) of shard ``index``, memory-mapped and validated; TargetStoreError naming it.

    ``reference`` (per-row shape, has crops), when given, is what every shard of the store must agree with.
    """
    path = TargetStore(root).shard_path(index, meta["layout"])
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise TargetStoreError(f"target shard {path} is missing: {_RERUN_HINT}") from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/UnpicklingError/zip errors for bad files
        reason = f"{type(exc).__name__}: {exc}"
        raise TargetStoreError(f"target shard {path} is corrupt ({reason}): {_RERUN_HINT}") from exc
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
    elif crops is not None and (crop_problem := _crop_problem(crops, rows)) is not None:
        problem = f"has malformed crops ({crop_problem})"
    elif reference is not None and (crops is not None) != reference[1]:
        problem = "has crops, other shards have none" if crops is not None else "has no crops, other shards have"
    if problem:
        raise TargetStoreError(f"target shard {path} is corrupt: it {problem}: {_RERUN_HINT}")
    return targets, crops


def _diff_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Top-level fingerprint keys whose values differ (for error messages)."""
    keys = sorted(set(old) | set(new))
    return [k for k in keys if fingerprint_hash({"v": old.get(k)}) != fingerprint_hash({"v": new.get(k)})]
