"""A source scan and the registry of source kinds: what every reader fills and how ingestion finds the reader.

:class:`SourceSpec` says where a source's images are; the reader registered for its ``kind``
(:func:`register_source_kind`) streams them into a :class:`SourceScan`, which spills to disk past
:data:`CHUNK_ROWS` items (memory flat in the number of images) and records every rejected item with its reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import sqlite3
import tempfile
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from eva_pipeline.manifest import SPLITS

#: How many rejected / duplicate items the report lists by name per source (all of them are counted).
REPORT_EXAMPLES: int = 20
#: Layouts of an ``image_folder`` source: decided from the tree, one class folder per label, or unlabelled.
FOLDER_LAYOUTS: tuple[str, ...] = ("auto", "class_folders", "flat")
#: Items per chunk of a build: the most a source scan holds in Python lists (about 0.5 KiB per item), the batches
#: it spills and that de-duplication and validation work on.
CHUNK_ROWS: int = 16_384
#: Page cache of each sqlite table a build keeps on disk (seen hashes, seen locations), in KiB.
SQLITE_CACHE_KIB: int = 8_192


@dataclass(frozen=True)
class SourceSpec:
    """One image source to ingest.

    ``kind`` names a registered reader ("idx" built in). ``images`` is the container or folder, ``labels`` an
    optional companion file, ``limit`` keeps only the first items (quick runs). Relative paths are stored as
    given, so a manifest built from the project root stays valid when the project moves. ``layout`` only
    matters for ``image_folder`` sources (see :data:`FOLDER_LAYOUTS`).
    """

    name: str
    kind: str
    split: str
    images: str | os.PathLike[str]
    labels: str | os.PathLike[str] | None = None
    limit: int | None = None
    layout: str = "auto"
    decode_workers: int = 1  # threads decoding files / shards ahead of the in-order scan (not a cache setting)

    def __post_init__(self) -> None:
        if not self.name or "#" in self.name or self.name != self.name.strip():
            raise ValueError(f"source name must be non-empty, without '#' or surrounding spaces, got {self.name!r}")
        if self.split not in SPLITS:
            raise ValueError(f"source {self.name!r}: split must be one of {SPLITS}, got {self.split!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or int(self.limit) != self.limit or self.limit < 1):
            raise ValueError(f"source {self.name!r}: limit must be a positive integer or None, got {self.limit!r}")
        if self.layout not in FOLDER_LAYOUTS:
            raise ValueError(f"source {self.name!r}: layout must be one of {FOLDER_LAYOUTS}, got {self.layout!r}")
        if (
            isinstance(self.decode_workers, bool)
            or int(self.decode_workers) != self.decode_workers
            or self.decode_workers < 1
        ):
            raise ValueError(
                f"source {self.name!r}: decode_workers must be a positive integer, got {self.decode_workers!r}"
            )

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> SourceSpec:
        """Build from a parameters mapping (e.g. one entry of ``ingestion.sources``); unknown keys are an error."""
        allowed = set(cls.__dataclass_fields__)
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(f"source spec has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**dict(params))


# ---------------------------------------------------------------------------------------------------- spilling
@dataclass(frozen=True)
class _BuildContext:
    spill_dir: Path | None = None
    chunk_rows: int | None = None


_NO_BUILD = _BuildContext()  # frozen: a shared default that no one can mutate
_CONTEXT: contextvars.ContextVar[_BuildContext] = contextvars.ContextVar("eva_manifest_build")


@contextlib.contextmanager
def build_settings(spill_dir: Path, chunk_rows: int) -> Iterator[None]:
    """Within a build: scans spill into ``spill_dir`` and hold at most ``chunk_rows`` items in Python lists."""
    token = _CONTEXT.set(_BuildContext(spill_dir=spill_dir, chunk_rows=chunk_rows))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def _chunk_rows() -> int:
    return int(_CONTEXT.get(_NO_BUILD).chunk_rows or CHUNK_ROWS)


def _spill_path(prefix: str, suffix: str) -> Path:
    """A new empty file in the build's work folder (the system temp folder outside a build)."""
    spill_dir = _CONTEXT.get(_NO_BUILD).spill_dir
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=None if spill_dir is None else str(spill_dir))
    os.close(fd)
    return Path(name)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


class DiskSet:
    """A set of strings in a sqlite table on disk (``key`` PRIMARY KEY), each remembering the integer code it was
    first added with (its owner). Memory: sqlite's page cache, at most ``cache_kib``; the file is removed by
    :meth:`close` (or when the object is collected)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, cache_kib: int | None = None) -> None:
        self.path = _spill_path("set-", ".sqlite") if path is None else Path(path)
        self._finalizer = weakref.finalize(self, _unlink_all, [self.path])
        self._db = sqlite3.connect(self.path, isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{int(cache_kib or SQLITE_CACHE_KIB)}"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute("CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, owner INTEGER) WITHOUT ROWID")
        self._db.execute("BEGIN")
        self._cur = self._db.cursor()
        self.size = 0

    def add(self, key: str, code: int = 0) -> bool:
        """Add one key; True when it was not there yet."""
        self._cur.execute("INSERT OR IGNORE INTO keys VALUES (?, ?)", (key, code))
        new = self._cur.rowcount == 1
        self.size += new
        return new

    def claim(self, keys: Sequence[str | None], codes: Iterable[int], *, expect_duplicates: bool = True) -> np.ndarray:
        """Add ``keys`` in order, key ``i`` owned by ``codes[i]`` (codes must differ from those of earlier calls);
        returns a bool array, True where the key was already there (added by an earlier call or earlier in
        ``keys``). ``None`` keys are skipped (False).

        ``expect_duplicates=False`` (e.g. locations, normally unique) inserts the chunk in one ``executemany`` and
        looks keys up only when some were already there; otherwise keys are inserted one by one.
        """
        seen = np.zeros(len(keys), dtype=bool)
        first: dict[str, tuple[int, int]] = {}  # key -> (code, position) of its first occurrence here
        for i, (key, code) in enumerate(zip(keys, codes, strict=True)):
            if key is None:
                continue
            if key in first:
                seen[i] = True
            else:
                first[key] = (code, i)
        ordered = sorted(first)  # key order: neighbouring B-tree pages, far fewer cache misses
        taken: list[str] = []
        if expect_duplicates:
            cur = self._cur
            for key in ordered:
                cur.execute("INSERT OR IGNORE INTO keys VALUES (?, ?)", (key, first[key][0]))
                if cur.rowcount != 1:
                    taken.append(key)
        else:
            before = self._db.total_changes
            self._cur.executemany("INSERT OR IGNORE INTO keys VALUES (?, ?)", ((k, first[k][0]) for k in ordered))
            if self._db.total_changes - before != len(ordered):  # some were there: those with another owner
                taken = [key for key in ordered if self.owner(key) != first[key][0]]
        for key in taken:
            seen[first[key][1]] = True
        self.size += len(ordered) - len(taken)
        return seen

    def contains(self, keys: Sequence[str | None]) -> np.ndarray:
        """Membership of each key (``None``: False), without adding anything."""
        cur = self._cur
        out = np.zeros(len(keys), dtype=bool)
        for i, key in enumerate(keys):
            if key is not None:
                out[i] = cur.execute("SELECT 1 FROM keys WHERE key = ?", (key,)).fetchone() is not None
        return out

    def owner(self, key: str) -> int | None:
        row = self._cur.execute("SELECT owner FROM keys WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None  # type: ignore[assignment]
        self._finalizer()


class StringSet:
    """A set of strings kept in memory up to ``limit`` keys (default :data:`CHUNK_ROWS`), then in a
    :class:`DiskSet`: cheap for small sources, memory-flat for large ones (e.g. the lines of a file list)."""

    def __init__(self, limit: int | None = None) -> None:
        self._limit = int(limit or _chunk_rows())
        self._mem: set[str] | None = set()
        self._disk: DiskSet | None = None

    def add(self, key: str) -> bool:
        """Add ``key``; True when it was not there yet."""
        if self._disk is not None:
            return self._disk.add(key)
        assert self._mem is not None
        if key in self._mem:
            return False
        self._mem.add(key)
        if len(self._mem) > self._limit:
            self._disk = DiskSet()
            for k in sorted(self._mem):
                self._disk.add(k)
            self._mem = None
        return True

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()


# ---------------------------------------------------------------------------------------------------- scans
#: Columns of a scan's spilled items (one Arrow IPC record batch per chunk).
SCAN_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("location", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("size_bytes", pa.int64()),
        pa.field("hash", pa.string()),
    ]
)


@dataclass(eq=False)
class SourceScan:
    """What a source reader found, item by item (after ``limit``), before de-duplication.

    Readers call :meth:`add` per accepted item and :meth:`reject` per unreadable one (with the reason), so that
    nothing is dropped silently. ``available`` is the number of items in the source before ``limit``; ``info`` is
    copied into the source's entry of the ingestion report (e.g. the class names of an image folder).

    The parallel lists (``locations``, ``labels``, ...) and ``rejections`` hold at most one chunk
    (:data:`CHUNK_ROWS`, or the build's ``chunk_rows``): when they fill up they are spilled to a temporary file
    (items: Arrow IPC, rejections: JSON lines) and emptied, so a scan of 14M images holds one chunk in memory.
    A plug-in reader may still append to the lists directly; :meth:`finish` spills them then. The report's
    per-reason counts and first :data:`REPORT_EXAMPLES` rejections are kept as the rejections go by.
    """

    available: int = 0
    locations: list[str] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    size_bytes: list[int] = field(default_factory=list)
    hashes: list[str | None] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    #: The most items or rejections held in the lists at once (a test hook: at most one chunk with add/reject).
    peak_buffered: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._chunk = _chunk_rows()
        self._files: list[Path] = []
        self._finalizer = weakref.finalize(self, _unlink_all, self._files)
        self._items_path: Path | None = None
        self._items_writer: pa.ipc.RecordBatchFileWriter | None = None
        self._rejections_path: Path | None = None
        self._rejections_fh: Any = None
        self._spilled_items = 0
        self._spilled_rejections = 0
        self._reasons: Counter[str] = Counter()
        self._examples: list[dict[str, Any]] = []
        self._finished = False

    # ------------------------------------------------------------------ the reader's API
    def add(
        self, location: str, label: int | None, width: int, height: int, size_bytes: int, digest: str | None
    ) -> None:
        """Record one accepted item."""
        self.locations.append(location)
        self.labels.append(None if label is None else int(label))
        self.widths.append(int(width))
        self.heights.append(int(height))
        self.size_bytes.append(int(size_bytes))
        self.hashes.append(digest)
        if len(self.locations) >= self._chunk:
            self._spill_items()

    def reject(self, location: str, reason: str, detail: str = "") -> None:
        """Record one unreadable item: ``reason`` is a stable code, ``detail`` the specifics."""
        self.rejections.append({"location": location, "reason": reason, "detail": detail})
        if len(self.rejections) >= self._chunk:
            self._spill_rejections()

    # ------------------------------------------------------------------ counts
    @property
    def items(self) -> int:
        """Accepted items so far."""
        return self._spilled_items + len(self.locations)

    @property
    def rejected(self) -> int:
        return self._spilled_rejections + len(self.rejections)

    @property
    def found(self) -> int:
        return self.items + self.rejected

    @property
    def rejection_reasons(self) -> dict[str, int]:
        """Count of every rejection reason, sorted by reason (complete after :meth:`finish`)."""
        return dict(sorted(self._reasons.items()))

    @property
    def rejected_examples(self) -> list[dict[str, Any]]:
        """The first :data:`REPORT_EXAMPLES` rejections (complete after :meth:`finish`)."""
        return list(self._examples)

    def check(self, name: str) -> None:
        """Readers are plug-ins: make sure the parallel lists line up before trusting them."""
        n = len(self.locations)
        lengths = {len(x) for x in (self.labels, self.widths, self.heights, self.size_bytes, self.hashes)}
        if lengths != {n}:
            raise RuntimeError(f"source {name!r}: reader returned misaligned item lists")

    # ------------------------------------------------------------------ spilling
    def _items_table(self, start: int, stop: int) -> pa.RecordBatch:
        try:
            return pa.record_batch(
                [
                    pa.array(self.locations[start:stop], pa.string()),
                    pa.array(self.labels[start:stop], pa.int64()),
                    pa.array(self.widths[start:stop], pa.int32()),
                    pa.array(self.heights[start:stop], pa.int32()),
                    pa.array(self.size_bytes[start:stop], pa.int64()),
                    pa.array(self.hashes[start:stop], pa.string()),
                ],
                schema=SCAN_SCHEMA,
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as exc:
            raise ValueError(f"reader returned an item that does not fit the manifest's columns: {exc}") from exc

    def _spill_items(self) -> None:
        if self._finished:
            raise RuntimeError("SourceScan: items added after the scan was finished")
        self.check("?")
        n = len(self.locations)
        self.peak_buffered = max(self.peak_buffered, n)
        if not n:
            return
        if self._items_writer is None:
            self._items_path = _spill_path("scan-items-", ".arrow")
            self._files.append(self._items_path)
            self._items_writer = pa.ipc.new_file(str(self._items_path), SCAN_SCHEMA)
        for start in range(0, n, self._chunk):
            self._items_writer.write_batch(self._items_table(start, min(n, start + self._chunk)))
        self._spilled_items += n
        for values in (self.locations, self.labels, self.widths, self.heights, self.size_bytes, self.hashes):
            values.clear()

    def _account(self, rejections: list[dict[str, Any]]) -> None:
        self._reasons.update(r.get("reason", "") for r in rejections)
        room = REPORT_EXAMPLES - len(self._examples)
        if room > 0:
            self._examples.extend(rejections[:room])

    def _spill_rejections(self) -> None:
        if self._finished:
            raise RuntimeError("SourceScan: rejections added after the scan was finished")
        n = len(self.rejections)
        self.peak_buffered = max(self.peak_buffered, n)
        if not n:
            return
        self._account(self.rejections)
        if self._rejections_fh is None:
            self._rejections_path = _spill_path("scan-rejections-", ".jsonl")
            self._files.append(self._rejections_path)
            self._rejections_fh = self._rejections_path.open("w", encoding="utf-8")
        self._rejections_fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rejections)
        self._spilled_rejections += n
        self.rejections.clear()

    def finish(self, name: str = "?") -> None:
        """The reader is done: check the lists, spill what exceeds one chunk, close the spill files."""
        if self._finished:
            return
        self.check(name)
        self.peak_buffered = max(self.peak_buffered, len(self.locations), len(self.rejections))
        if len(self.locations) > self._chunk or (self._items_writer is not None and self.locations):
            self._spill_items()
        if len(self.rejections) > self._chunk or (self._rejections_fh is not None and self.rejections):
            self._spill_rejections()
        else:
            self._account(self.rejections)  # stay in memory (less than a chunk), counted now
        self._close_spills()
        self._finished = True

    def _close_spills(self) -> None:
        if self._items_writer is not None:
            self._items_writer.close()
            self._items_writer = None
        if self._rejections_fh is not None:
            self._rejections_fh.close()
            self._rejections_fh = None

    # ------------------------------------------------------------------ reading back
    def iter_item_batches(self) -> Iterator[pa.RecordBatch]:
        """Every accepted item in scan order, in record batches of at most one chunk (:data:`SCAN_SCHEMA`)."""
        self.finish()
        if self._items_path is not None:
            with pa.OSFile(str(self._items_path), "rb") as fh:
                reader = pa.ipc.open_file(fh)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
        if self.locations:
            yield self._items_table(0, len(self.locations))

    def iter_rejections(self) -> Iterator[dict[str, Any]]:
        """Every rejection in scan order."""
        self.finish()
        if self._rejections_path is not None:
            with self._rejections_path.open(encoding="utf-8") as fh:
                for line in fh:
                    yield json.loads(line)
        yield from self.rejections

    def close(self) -> None:
        """Remove the spill files (the scan cannot be read back afterwards)."""
        self._close_spills()
        self._finalizer()


#: ``reader(spec)``, or ``reader(spec, units=UnitCache)`` for a reader that scans unit by unit through the
#: incremental scan cache (:mod:`eva_pipeline.ingest.scan_cache`); a reader without ``units`` is always read whole.
SourceReader = Callable[..., SourceScan]
_SOURCE_READERS: dict[str, SourceReader] = {}


def register_source_kind(kind: str) -> Callable[[SourceReader], SourceReader]:
    """Decorator: make ``reader`` handle ``SourceSpec(kind=kind, ...)`` in :func:`build_manifest`."""

    def decorate(reader: SourceReader) -> SourceReader:
        if kind in _SOURCE_READERS and _SOURCE_READERS[kind] is not reader:
            raise ValueError(f"source kind {kind!r} is already registered")
        _SOURCE_READERS[kind] = reader
        return reader

    return decorate


def source_reader(kind: str) -> SourceReader:
    """The reader registered for ``kind`` (KeyError if none: check :func:`source_kinds` first)."""
    return _SOURCE_READERS[kind]


def source_kinds() -> tuple[str, ...]:
    """Registered source kinds."""
    return tuple(sorted(_SOURCE_READERS))
