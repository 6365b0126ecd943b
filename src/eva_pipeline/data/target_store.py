"""Teacher targets on disk: computed once, reused while inputs and teacher are unchanged, resumable after a crash.

A store is a folder holding ``meta.json`` and shards ``shard_00000.pt`` ... of ``shard_size`` rows each. What
the targets depend on (manifest content digest, teacher description, input size, grid, ...) is a *fingerprint*
dict; its hash is written to ``meta.json`` before any shard and into every shard, so a shard can never be
mistaken for one of a different fingerprint. Shards are written to a temporary file and renamed (atomic on
POSIX), so a killed run leaves only whole shards; re-running computes just the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

META_FILE: str = "meta.json"
STORE_FORMAT: int = 1
TARGET_DTYPE: torch.dtype = torch.float16
_SHARD_GLOB = "shard_*.pt"
_TMP_GLOB = ".*.tmp*"
_RERUN_HINT = "re-run the teacher_targets pipeline (it recomputes missing and unreadable shards)"


class TargetStoreError(RuntimeError):
    """The store on disk cannot serve the requested targets; the message says why and what to run."""


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    """sha256 hex of the fingerprint's canonical JSON (sorted keys): equal dicts give equal hashes across runs."""
    try:
        text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"a target fingerprint must be JSON-serialisable (str/int/float/bool/list/dict): {exc}") \
            from exc
    return hashlib.sha256(text.encode()).hexdigest()


def _atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    """Write through ``write(tmp)`` then rename over ``path``: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class TargetStore:
    """One folder of target shards; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # -- layout -------------------------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.root / META_FILE

    def shard_path(self, index: int) -> Path:
        return self.root / f"shard_{index:05d}.pt"

    @staticmethod
    def num_shards(num_items: int, shard_size: int) -> int:
        return math.ceil(num_items / shard_size)

    def read_meta(self) -> dict[str, Any] | None:
        """The store's ``meta.json``, or None when there is none (or it is unreadable: treated as no store)."""
        try:
            return json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("target store %s: unreadable %s (%s); treating it as empty", self.root, META_FILE, exc)
            return None

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        """The fingerprint the shards on disk belong to (None when the folder holds no store)."""
        meta = self.read_meta()
        return None if meta is None else meta.get("fingerprint")

    def _write_meta(self, meta: dict[str, Any]) -> None:
        _atomic_write_bytes(self.meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2, sort_keys=True)))

    def missing_shards(self, meta: Mapping[str, Any]) -> list[int]:
        """Shard indices of ``meta``'s layout whose files are absent."""
        count = self.num_shards(int(meta["num_items"]), int(meta["shard_size"]))
        return [i for i in range(count) if not self.shard_path(i).is_file()]

    def is_complete(self, fingerprint: Mapping[str, Any]) -> bool:
        """True when meta.json belongs to ``fingerprint`` and every shard file exists (shards are not opened)."""
        meta = self.read_meta()
        return (
            meta is not None
            and meta.get("fingerprint_hash") == fingerprint_hash(fingerprint)
            and meta.get("shape") is not None
            and not self.missing_shards(meta)
        )

    # -- writing ------------------------------------------------------------------------------------------------
    def _clear(self, reason: str) -> None:
        old = sorted(self.root.glob(_SHARD_GLOB))
        logger.info("target store %s: %s; removing %d old shard(s)", self.root, reason, len(old))
        for path in old:
            path.unlink()
        self.meta_path.unlink(missing_ok=True)

    def _shard_ok(self, index: int, meta: Mapping[str, Any]) -> bool:
        """Cheap check of a shard left by an earlier run (mmap: only the zip directory and header are read)."""
        try:
            self._read_shard(index, meta, mmap=True)
            return True
        except TargetStoreError as exc:
            logger.warning("%s; recomputing it", exc)
            return False

    def compute(
        self,
        fingerprint: Mapping[str, Any],
        num_items: int,
        batch_fn: Callable[[int, int], Tensor],
        teacher_fn: Callable[[Tensor], Tensor],
        shard_size: int = 1024,
        progress: bool = True,
        batch_size: int | None = None,
    ) -> Path:
        """Fill the store for ``fingerprint``: ``teacher_fn(batch_fn(start, stop))`` per missing shard.

        Shards of the same fingerprint and layout already on disk are kept (resume); anything else in the folder
        is cleared first. ``teacher_fn`` must return (stop - start, num_tokens, dim) float targets; they are stored
        as fp16 on CPU and must stay finite there. ``batch_size`` (default: the shard size) splits a shard into
        several teacher calls, bounding accelerator memory independently of the shard size on disk, which
        changing it does not touch. Returns the store folder.
        """
        if num_items < 1 or shard_size < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError(
                f"num_items, shard_size and batch_size must be positive, got {num_items}, {shard_size}, {batch_size}"
            )
        step = shard_size if batch_size is None else batch_size
        digest = fingerprint_hash(fingerprint)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(_TMP_GLOB):  # half-written files of a killed run
            stale.unlink(missing_ok=True)

        meta = self.read_meta()
        layout = {"format": STORE_FORMAT, "fingerprint_hash": digest, "num_items": num_items, "shard_size": shard_size}
        if meta is None or any(meta.get(k) != v for k, v in layout.items()):
            if meta is not None and meta.get("fingerprint_hash") != digest:
                reason = f"fingerprint changed ({str(meta.get('fingerprint_hash'))[:12]} -> {digest[:12]})"
            elif meta is not None:
                reason = "layout changed (num_items/shard_size/format)"
            else:
                reason = f"new store for fingerprint {digest[:12]}"
            self._clear(reason)
            meta = {**layout, "fingerprint": dict(fingerprint), "shape": None, "dtype": str(TARGET_DTYPE)}
            self._write_meta(meta)  # first: shards written from now on belong to this fingerprint
        else:
            logger.info("target store %s: resuming fingerprint %s", self.root, digest[:12])

        count = self.num_shards(num_items, shard_size)
        todo = [i for i in range(count) if not self.shard_path(i).is_file() or not self._shard_ok(i, meta)]
        done_items = num_items - sum(self._rows(i, num_items, shard_size) for i in todo)
        if not todo:
            logger.info("target store %s: all %d shard(s) present, nothing to compute", self.root, count)
        shape_saved = meta["shape"] is not None
        with tqdm(
            total=num_items, initial=done_items, disable=not progress, desc="teacher targets", unit="img"
        ) as bar:
            for index in todo:
                start = index * shard_size
                stop = min(start + shard_size, num_items)
                parts = []
                for lo in range(start, stop, step):
                    hi = min(lo + step, stop)
                    with torch.no_grad():
                        part = teacher_fn(batch_fn(lo, hi))
                    parts.append(self._check_targets(part, index, hi - lo, meta))
                    if meta["shape"] is None:  # later batches are checked against the first one
                        meta["shape"] = [num_items, *parts[-1].shape[1:]]
                    bar.update(hi - lo)
                targets = parts[0] if len(parts) == 1 else torch.cat(parts)
                if not shape_saved:  # the shape is on disk before the first shard is
                    self._write_meta(meta)
                    shape_saved = True
                payload = {"fingerprint_hash": digest, "start": start, "stop": stop, "targets": targets}
                _atomic_write_bytes(self.shard_path(index), lambda tmp: torch.save(payload, tmp))
        return self.root

    @staticmethod
    def _rows(index: int, num_items: int, shard_size: int) -> int:
        return min(shard_size, num_items - index * shard_size)

    def _check_targets(self, targets: Tensor, index: int, rows: int, meta: Mapping[str, Any]) -> Tensor:
        if not isinstance(targets, Tensor) or targets.ndim != 3 or targets.shape[0] != rows:
            got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(f"teacher_fn must return ({rows}, num_tokens, dim) targets (shard {index}), got {got}")
        if meta["shape"] is not None and list(targets.shape[1:]) != list(meta["shape"][1:]):
            raise ValueError(
                f"teacher_fn returned targets of shape {tuple(targets.shape[1:])} per item for shard {index}, "
                f"earlier targets of this store have {tuple(meta['shape'][1:])}"
            )
        out = targets.detach().to(device="cpu", dtype=TARGET_DTYPE).contiguous()
        if not torch.isfinite(out).all():
            raise ValueError(
                f"shard {index}: targets are not finite in {TARGET_DTYPE} (NaN, or beyond fp16 range 65504); "
                "check the teacher's output scale"
            )
        return out

    # -- reading ------------------------------------------------------------------------------------------------
    def _read_shard(self, index: int, meta: Mapping[str, Any], mmap: bool = False) -> Tensor:
        path = self.shard_path(index)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except FileNotFoundError:
            raise TargetStoreError(f"target shard {path} is missing: {_RERUN_HINT}") from None
        except Exception as exc:  # torch raises RuntimeError/EOFError/UnpicklingError/zip errors for bad files
            reason = f"{type(exc).__name__}: {exc}"
            raise TargetStoreError(f"target shard {path} is corrupt ({reason}): {_RERUN_HINT}") from exc
        start = index * int(meta["shard_size"])
        rows = self._rows(index, int(meta["num_items"]), int(meta["shard_size"]))
        problem = None
        if not isinstance(payload, dict) or not isinstance(payload.get("targets"), Tensor):
            problem = "holds no targets tensor"
        elif payload.get("fingerprint_hash") != meta["fingerprint_hash"]:
            problem = "belongs to a different fingerprint"
        elif payload.get("start") != start or payload["targets"].shape[0] != rows:
            problem = f"covers the wrong rows (expected {start}..{start + rows})"
        elif payload["targets"].dtype != TARGET_DTYPE or payload["targets"].ndim != 3 or (
            meta.get("shape") is not None and list(payload["targets"].shape[1:]) != list(meta["shape"][1:])
        ):
            problem = f"has {payload['targets'].dtype} targets of shape {tuple(payload['targets'].shape)}"
        if problem:
            raise TargetStoreError(f"target shard {path} is corrupt: it {problem}: {_RERUN_HINT}")
        return payload["targets"]

    def load(self, expected_fingerprint: Mapping[str, Any] | None = None) -> Tensor:
        """All targets (num_items, num_tokens, dim) fp16 on CPU; TargetStoreError if absent, stale or damaged."""
        meta = self.read_meta()
        if meta is None:
            raise TargetStoreError(f"no target store at {self.root} ({META_FILE} missing): {_RERUN_HINT}")
        if expected_fingerprint is not None and meta.get("fingerprint_hash") != fingerprint_hash(expected_fingerprint):
            changed = _diff_keys(meta.get("fingerprint") or {}, expected_fingerprint)
            raise TargetStoreError(
                f"target store {self.root} was computed for a different fingerprint (differs in {changed}): "
                f"{_RERUN_HINT}"
            )
        missing = self.missing_shards(meta)
        if missing or meta.get("shape") is None:
            total = self.num_shards(int(meta["num_items"]), int(meta["shard_size"]))
            names = ", ".join(self.shard_path(i).name for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise TargetStoreError(
                f"target store {self.root} is incomplete: {len(missing)} of {total} shard(s) missing ({names}): "
                f"{_RERUN_HINT}"
            )
        out = torch.empty(tuple(meta["shape"]), dtype=TARGET_DTYPE)  # preallocated: no second copy from torch.cat
        shard_size = int(meta["shard_size"])
        for index in range(self.num_shards(int(meta["num_items"]), shard_size)):
            targets = self._read_shard(index, meta, mmap=True)
            out[index * shard_size : index * shard_size + targets.shape[0]] = targets
        return out


def _diff_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Top-level fingerprint keys whose values differ (for error messages)."""
    keys = sorted(set(old) | set(new))
    return [k for k in keys if fingerprint_hash({"v": old.get(k)}) != fingerprint_hash({"v": new.get(k)})]


def compute_targets(
    store_root: str | os.PathLike[str],
    fingerprint: Mapping[str, Any],
    num_items: int,
    batch_fn: Callable[[int, int], Tensor],
    teacher_fn: Callable[[Tensor], Tensor],
    shard_size: int = 1024,
    progress: bool = True,
    batch_size: int | None = None,
) -> Path:
    """Compute (or resume, or reuse) the targets of ``fingerprint`` in ``store_root``; see ``TargetStore.compute``."""
    return TargetStore(store_root).compute(
        fingerprint, num_items, batch_fn, teacher_fn, shard_size=shard_size, progress=progress, batch_size=batch_size
    )


def load_targets(store_root: str | os.PathLike[str], expected_fingerprint: Mapping[str, Any] | None = None) -> Tensor:
    """Targets (N, num_tokens, dim) fp16 from ``store_root``; see :meth:`TargetStore.load`."""
    return TargetStore(store_root).load(expected_fingerprint)


def is_complete(store_root: str | os.PathLike[str], fingerprint: Mapping[str, Any]) -> bool:
    """True when ``store_root`` holds every shard for ``fingerprint``; see :meth:`TargetStore.is_complete`."""
    return TargetStore(store_root).is_complete(fingerprint)
