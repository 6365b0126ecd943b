"""Teacher targets on disk: computed once, reused while inputs and teacher are unchanged, resumable after a crash.

:class:`TargetStore` is one folder of target shards (the layout: :mod:`eva_pipeline.targets.layout`): it computes
and writes this rank's shards (:meth:`TargetStore.compute`), says whether the store is complete, and opens it for
reading (:meth:`TargetStore.reader`, see :mod:`eva_pipeline.targets.reader`, or :meth:`TargetStore.load`).

Because the layout is a pure function of the fingerprint and sizes, and part of every shard's file name:

* ``meta.json`` is fully determined before anything is computed: every rank of a sharded run writes the same bytes
  (atomically), in any order.
* Files of another layout (a stale store, an older format) never share a name with this layout's shards; a run
  deletes them without looking inside, and can never delete a shard of its own layout that another rank of the
  same run has just written. :meth:`TargetStore.is_complete` is exact from file names alone.
* Shards and ``meta.json`` are written to a uniquely named temporary file and renamed (atomic on POSIX), so a
  killed run leaves only whole shards; re-running computes just the missing (or unreadable) ones.

Several ranks (processes, GPUs, hosts sharing the folder): rank ``r`` of ``world_size`` computes the shards whose
``index % world_size == r``. Each rank calls :meth:`TargetStore.compute` with the same fingerprint and layout; once
every rank has returned (a barrier, or joining the processes), any process checks :meth:`TargetStore.is_complete`
and reads through :meth:`TargetStore.reader` (lazy, memory-flat, usable in DataLoader workers) or
:meth:`TargetStore.load` (everything in RAM, for small stores). No torch.distributed is needed. Two *different*
fingerprints computed concurrently into one folder are not supported (the later one wins, the earlier one fails
or gets recomputed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from eva_pipeline.fileio import replace_atomically
from eva_pipeline.loader.augment import CROP_DTYPE, CROP_FIELDS
from eva_pipeline.targets.layout import (
    META_FILE,
    RERUN_HINT,
    SHARD_GLOB,
    SHARD_RE,
    STORE_FORMAT,
    TARGET_DTYPE,
    Reference,
    TargetStoreError,
    crop_problem,
    fingerprint_hash,
    layout_id,
    shard_name,
)
from eva_pipeline.targets.reader import DEFAULT_MAX_OPEN_SHARDS, TargetReader, read_shard

logger = logging.getLogger(__name__)

_TMP_GLOB = ".*.tmp*"
_TMP_RE = re.compile(r"^\.(.+)\.tmp[^.]*$")
_STALE_META_TMP_S = 60.0  # a meta.json temporary older than this is a leftover of a killed process

#: What ``batch_fn`` returns: model-input images, or (images, int32 crops (n, 5)).
BatchFnResult = Tensor | tuple[Tensor, Tensor]


def _describe_crops_problem(rows: int, problem: str) -> str:
    return f"crops must be a {CROP_DTYPE} tensor ({rows}, 5) = (top, left, height, width, flip) per row; {problem}"


class TargetStore:
    """One folder of target shards; the layout is in :mod:`eva_pipeline.targets.layout`."""

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
        return self.root / shard_name(index, layout)

    def _no_store(self) -> TargetStoreError:
        return TargetStoreError(f"no target store at {self.root} ({META_FILE} missing): {RERUN_HINT}")

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
        replace_atomically(self.meta_path, lambda tmp: tmp.write_text(text))

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
        for path in self.root.glob(SHARD_GLOB):
            match = SHARD_RE.match(path.name)
            if match is None or match.group(2) != layout:
                old.append(path)
        if old:
            logger.info("target store %s: removing %d old shard(s) of another layout", self.root, len(old))
        for path in old:
            path.unlink(missing_ok=True)
        for path in self.root.glob(_TMP_GLOB):
            name = _TMP_RE.match(path.name)
            target = name.group(1) if name else ""
            shard = SHARD_RE.match(target)
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
        self, index: int, meta: Mapping[str, Any], reference: Reference | None, quiet: bool = False
    ) -> Reference | None:
        """(per-row target shape, has crops) of a shard left by an earlier run, or None when it is unusable.

        Cheap: with mmap only the zip directory and header are read, not the targets.
        """
        if not self.shard_path(index, meta["layout"]).is_file():
            return None
        try:
            targets, crops = read_shard(self.root, meta, index, reference)
            return tuple(targets.shape[1:]), crops is not None
        except TargetStoreError as exc:
            if not quiet:
                logger.warning("%s; recomputing it", exc)
            return None

    def _reference(self, meta: Mapping[str, Any], candidates: Sequence[int]) -> Reference | None:
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
                replace_atomically(self.shard_path(index, layout), lambda tmp, p=payload: torch.save(p, tmp))
        return self.root

    def _check_targets(
        self,
        targets: Tensor,
        index: int,
        rows: int,
        reference: Reference | None,
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
                f"{RERUN_HINT}"
            )
        if expected_fingerprint is not None and meta.get("fingerprint_hash") != fingerprint_hash(expected_fingerprint):
            changed = _diff_keys(meta.get("fingerprint") or {}, expected_fingerprint)
            raise TargetStoreError(
                f"target store {self.root} was computed for a different fingerprint (differs in {changed}): "
                f"{RERUN_HINT}"
            )
        missing = self.missing_shards(meta)
        if missing:
            total = self.num_shards(int(meta["num_rows"]), int(meta["shard_size"]))
            names = ", ".join(self.shard_path(i, meta["layout"]).name for i in missing[:5])
            names += " ..." if len(missing) > 5 else ""
            raise TargetStoreError(
                f"target store {self.root} is incomplete: {len(missing)} of {total} shard(s) missing ({names}): "
                f"{RERUN_HINT}"
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
        first, first_crops = read_shard(self.root, meta, 0)
        out = torch.empty((int(meta["num_rows"]), *first.shape[1:]), dtype=TARGET_DTYPE)  # no second copy
        crops_out = None if first_crops is None else torch.empty((int(meta["num_rows"]), 5), dtype=CROP_DTYPE)
        reference = (tuple(first.shape[1:]), first_crops is not None)
        for index in range(self.num_shards(int(meta["num_rows"]), shard_size)):
            targets, crops = (first, first_crops) if index == 0 else read_shard(self.root, meta, index, reference)
            out[index * shard_size : index * shard_size + targets.shape[0]] = targets
            if crops_out is not None:
                crops_out[index * shard_size : index * shard_size + targets.shape[0]] = crops
        return (out, crops_out) if with_crops else out

    def reader(
        self, expected_fingerprint: Mapping[str, Any] | None = None, max_open_shards: int = DEFAULT_MAX_OPEN_SHARDS
    ) -> TargetReader:
        """A lazy reader of this store (see :class:`TargetReader`); TargetStoreError as for :meth:`load`."""
        return TargetReader(self.root, self._checked_meta(expected_fingerprint), max_open_shards)


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
    problem = crop_problem(crops, rows)
    if problem is not None:
        raise ValueError(f"batch_fn: {_describe_crops_problem(rows, problem)} (shard {index})")
    return images, crops.detach().to("cpu").contiguous()


def _diff_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Top-level fingerprint keys whose values differ (for error messages)."""
    keys = sorted(set(old) | set(new))
    return [k for k in keys if fingerprint_hash({"v": old.get(k)}) != fingerprint_hash({"v": new.get(k)})]
