"""De-duplication of a build: which scanned items survive, decided by content hash, held-out sources first; and
the list of every duplicate with its kept copy.

Every content hash goes through a sqlite table on disk (:class:`~eva_pipeline.ingest.spill.DiskSet`), so memory
does not grow with the number of images. Held-out sources (:data:`~eva_pipeline.manifest.HELD_OUT_SPLITS`: probe,
eval) claim their images first: an image present in a held-out and a training split stays held out and never
enters pre-training or fine-tuning. The result is one keep mask per source (a file of bools, one
per accepted item), read back by the write pass (:mod:`eva_pipeline.ingest.write`), and the duplicates
(:class:`DuplicateList`, another sqlite table): each with its location and label and those of its kept copy, which a
second streaming pass over the scans reads back. A duplicate whose kept copy has another class is a *label
conflict* (:meth:`DuplicateList.records`): the manifest keeps the kept copy's label, the report counts and lists it.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from eva_pipeline.ingest.scan import SourceScan, SourceSpec
from eva_pipeline.ingest.spill import SQLITE_CACHE_KIB, DiskSet, unlink_all
from eva_pipeline.manifest import HELD_OUT_SPLITS, held_out_leak_error

#: Owner codes of the seen-hash table: ``source index << CODE_SHIFT | item index``.
CODE_SHIFT = 40
#: The reason of a duplicate in the rejections list.
DUPLICATE = "duplicate"


def _source_of(code: int) -> int:
    return code >> CODE_SHIFT


def _index_of(code: int) -> int:
    return code & ((1 << CODE_SHIFT) - 1)


class DuplicateList:
    """Every duplicate of a build in a sqlite file (memory: its page cache): its code (source, item index),
    location and label, and its kept copy's code; :meth:`resolve` adds the kept copies' locations and labels."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{SQLITE_CACHE_KIB}"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute(
            "CREATE TABLE duplicates (code INTEGER PRIMARY KEY, location TEXT NOT NULL, label INTEGER, owner INTEGER"
            " NOT NULL)"
        )
        self._db.execute("CREATE TABLE owners (code INTEGER PRIMARY KEY, location TEXT NOT NULL, label INTEGER)")
        self._db.execute("BEGIN")
        self.size = 0
        self._resolved = False

    def add(self, rows: Sequence[tuple[int, str, int | None, int]]) -> None:
        """``(code, location, label, kept copy's code)`` of duplicates."""
        self._db.executemany("INSERT INTO duplicates VALUES (?, ?, ?, ?)", rows)
        self.size += len(rows)

    def resolve(self, scans: Sequence[SourceScan]) -> None:
        """Read the location and label of every kept copy back from the scans: one streaming pass over the items
        of the sources that keep a copy, a batch at a time."""
        self._resolved = True
        if not self.size:
            return
        self._db.execute("CREATE INDEX duplicates_owner ON duplicates (owner)")
        sources = [int(k) for (k,) in self._db.execute("SELECT DISTINCT owner >> ? FROM duplicates", (CODE_SHIFT,))]
        for k in sources:
            start = k << CODE_SHIFT
            for batch in scans[k].iter_item_batches():
                stop = start + batch.num_rows
                owners = [
                    int(code)
                    for (code,) in self._db.execute(
                        "SELECT DISTINCT owner FROM duplicates WHERE owner >= ? AND owner < ?", (start, stop)
                    )
                ]
                if owners:
                    rows = batch.take(pa.array([code - start for code in owners], pa.int64()))
                    locations, labels = rows.column("location").to_pylist(), rows.column("label").to_pylist()
                    self._db.executemany(
                        "INSERT INTO owners VALUES (?, ?, ?)", zip(owners, locations, labels, strict=True)
                    )
                start = stop

    def records(
        self, specs: Sequence[SourceSpec], classes: Sequence[Sequence[str] | None]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(source index, record)`` of every duplicate, source by source in scan order (after :meth:`resolve`).

        A record is a line of the rejections list: ``location``, ``reason`` (:data:`DUPLICATE`), ``detail``, the
        kept copy (``duplicate_of``: its location, ``duplicate_of_source``, ``duplicate_of_id``: its manifest id),
        both labels as class names (``label``, ``duplicate_of_label``: None when unlabelled; ``classes`` per source
        in label order, from the write pass) and ``label_conflict``: both copies labelled, with other class names
        (what fine-tuning combines sources by)."""
        if not self._resolved:
            raise RuntimeError("DuplicateList.records: resolve() the kept copies first")
        cursor = self._db.execute(
            "SELECT d.code, d.location, d.label, d.owner, o.location, o.label FROM duplicates AS d"
            " JOIN owners AS o ON o.code = d.owner ORDER BY d.code"
        )
        for code, location, label, owner, owner_location, owner_label in cursor:
            k, j = _source_of(code), _source_of(owner)
            name, kept_name = _class_name(classes[k], label), _class_name(classes[j], owner_label)
            conflict = name is not None and kept_name is not None and name != kept_name
            detail = f"same content as {owner_location} (source {specs[j].name!r}), the copy kept"
            if conflict:
                detail += f"; label conflict: class {name!r} here, {kept_name!r} on the kept copy (the manifest's)"
            yield (
                k,
                {
                    "location": location,
                    "reason": DUPLICATE,
                    "detail": detail,
                    "duplicate_of": owner_location,
                    "duplicate_of_source": specs[j].name,
                    "duplicate_of_id": f"{specs[j].name}/{_index_of(owner)}",
                    "label": name,
                    "duplicate_of_label": kept_name,
                    "label_conflict": conflict,
                },
            )

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None  # type: ignore[assignment]
        unlink_all([self.path])


def _class_name(classes: Sequence[str] | None, label: int | None) -> str | None:
    """The class name of ``label`` (its number as text when outside the names: the build fails on those anyway)."""
    if label is None:
        return None
    if classes is not None and 0 <= label < len(classes):
        return str(classes[label])
    return str(label)


@dataclass
class DedupPass:
    """What de-duplication decided: per source the keep mask file and duplicate count; every duplicate (on disk);
    the leak error."""

    masks: list[Path]  # per source: one bool per accepted item (raw bytes), True = kept
    duplicates: list[int]
    listing: DuplicateList
    errors: list[str]

    def close(self) -> None:
        self.listing.close()


def dedup_pass(specs: Sequence[SourceSpec], scans: Sequence[SourceScan], dedup: bool, work: Path) -> DedupPass:
    """Decide which items survive de-duplication, held-out sources first (they claim their images); every hash
    goes through a sqlite table on disk, every duplicate into a :class:`DuplicateList`, resolved to its kept copy
    at the end. Without ``dedup`` only the held-out hashes are stored, for the leak check."""
    masks = [work / f"keep-{k}.bin" for k in range(len(specs))]
    duplicates = [0] * len(specs)
    listing = DuplicateList(work / "duplicates.sqlite")
    leaked: Counter[str] = Counter()  # training split -> items whose content is held out
    seen = DiskSet(work / "hashes.sqlite")
    try:
        for k in sorted(range(len(specs)), key=lambda k: (specs[k].split not in HELD_OUT_SPLITS, k)):
            held_out = specs[k].split in HELD_OUT_SPLITS
            pos = 0
            with masks[k].open("wb") as fh:
                for batch in scans[k].iter_item_batches():
                    hashes = batch.column("hash").to_pylist()
                    n = len(hashes)
                    keep = np.ones(n, dtype=bool)
                    base = (k << CODE_SHIFT) + pos
                    codes = range(base, base + n)
                    if dedup:
                        dup = seen.claim(hashes, codes)
                        keep[dup] = False
                        if rows := np.flatnonzero(dup).tolist():
                            duplicates[k] += len(rows)
                            picked = batch.take(pa.array(rows, pa.int64()))
                            owners = [seen.owner(hashes[i]) for i in rows]
                            listing.add(
                                list(
                                    zip(
                                        [base + i for i in rows],
                                        picked.column("location").to_pylist(),
                                        picked.column("label").to_pylist(),
                                        owners,
                                        strict=True,
                                    )
                                )
                            )
                    elif held_out:
                        seen.claim(hashes, codes)  # remembered for the leak check only
                    else:
                        leaked[specs[k].split] += int(seen.contains(hashes).sum())
                    keep.tofile(fh)
                    pos += n
        listing.resolve(scans)
    except BaseException:
        listing.close()
        raise
    finally:
        seen.close()
    message = held_out_leak_error(leaked)
    errors = [message] if message else []
    return DedupPass(masks, duplicates, listing, errors)
