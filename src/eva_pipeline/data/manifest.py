"""The image manifest: one row per image, whatever container it lives in, plus the ingestion that builds it.

Every later stage (teacher targets, pre-training, probing) reads images only through the manifest, so the
schema is written for large sources too: ``location`` is a plain file path, ``"path#index"`` for an item of an
array container (IDX), and later ``"shard.tar#member"``. The ``split`` column keeps probe images out of
pre-training; exact-duplicate detection by content hash keeps the same image from appearing in both.

Source kinds are looked up in a small registry (:func:`register_source_kind`), so new kinds ("image_folder",
"file_list", "webdataset") plug in without changing :func:`build_manifest` or its callers. The readers of
encoded images live in :mod:`eva_pipeline.data.sources`; every unreadable item is recorded as a rejection with
its reason (:mod:`eva_pipeline.data.decode`), never dropped silently nor replaced by another image.

Memory does not grow with the number of images (Merged-30M: 29.6M): :func:`write_manifest` keeps at most one
chunk (:data:`CHUNK_ROWS` items) of a source in Python lists and spills the rest to disk (Arrow IPC for items,
JSON lines for rejections, in a work folder next to the output), de-duplicates through a sqlite table of content
hashes (:class:`DiskSet`, bounded page cache), validates chunk by chunk and writes the manifest to Parquet in row
groups. :func:`build_manifest` is the same build returning a DataFrame, for small manifests (tests, notebooks).
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import json
import os
import sqlite3
import tempfile
import weakref
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from eva_pipeline.data.idx import EMBEDDED_DATA_DIR, read_idx
from eva_pipeline.data.scan_cache import UnitCache, cache_file, source_settings

if TYPE_CHECKING:
    from eva_pipeline.data.manifest_file import Manifest

#: What images are for. Probe images are held out: never used in pre-training.
SPLITS: tuple[str, ...] = ("pretrain", "probe")

#: Column order and types of a manifest on disk (parquet). ``content_hash`` is the sha1 hex of the item's raw
#: bytes (the encoded file, or the H*W*C pixel bytes of an array item); null where a source cannot afford hashing.
MANIFEST_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("location", pa.string(), nullable=False),
        pa.field("label", pa.int64(), nullable=True),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("size_bytes", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=True),
    ]
)
MANIFEST_COLUMNS: tuple[str, ...] = tuple(MANIFEST_SCHEMA.names)
#: ``content_hash`` may be absent from a manifest; every other column is required.
REQUIRED_COLUMNS: tuple[str, ...] = tuple(c for c in MANIFEST_COLUMNS if c != "content_hash")
#: The pandas dtypes of the same columns ("str": pandas' default string dtype).
MANIFEST_DTYPES: dict[str, str] = {
    "id": "str",
    "source": "str",
    "location": "str",
    "label": "Int64",
    "width": "int32",
    "height": "int32",
    "size_bytes": "int64",
    "split": "str",
    "content_hash": "str",
}
_STRING_COLUMNS = ("id", "source", "location", "split")
#: Columns that determine the pixels of the rows (not labels or splits): what a target cache must depend on.
PIXEL_DIGEST_COLUMNS: tuple[str, ...] = ("id", "location", "width", "height", "size_bytes", "content_hash")
#: How many rejected / duplicate items the report lists by name per source (all of them are counted).
REPORT_EXAMPLES: int = 20
#: Layouts of an ``image_folder`` source: decided from the tree, one class folder per label, or unlabelled.
FOLDER_LAYOUTS: tuple[str, ...] = ("auto", "class_folders", "flat")
#: Items per chunk of a build: the most a source scan holds in Python lists (about 0.5 KiB per item), the batches
#: it spills and that de-duplication and validation work on.
CHUNK_ROWS: int = 16_384
#: Rows per row group of the manifest Parquet file (Arrow-side buffer of the writer).
ROW_GROUP_ROWS: int = 65_536
#: Page cache of each sqlite table a build keeps on disk (seen hashes, seen locations), in KiB.
SQLITE_CACHE_KIB: int = 8_192
#: Owner codes of the seen-hash table: ``source index << _CODE_SHIFT | item index``.
_CODE_SHIFT = 40


@lru_cache(maxsize=None)
def manifest_file_schema(columns: tuple[str, ...] = MANIFEST_COLUMNS) -> pa.Schema:
    """:data:`MANIFEST_SCHEMA` (restricted to ``columns``) plus pandas metadata, so that ``pd.read_parquet`` and
    ``Table.to_pandas`` give the manifest's dtypes (:data:`MANIFEST_DTYPES`: ``label`` Int64 even with nulls)."""
    schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
    empty = pd.DataFrame({c: pd.Series([], dtype=MANIFEST_DTYPES[c]) for c in columns})
    meta = pa.Table.from_pandas(empty, schema=schema, preserve_index=False).schema.metadata
    return schema.with_metadata(meta)


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
        if isinstance(self.decode_workers, bool) or int(self.decode_workers) != self.decode_workers or \
                self.decode_workers < 1:
            raise ValueError(f"source {self.name!r}: decode_workers must be a positive integer, got {self.decode_workers!r}")

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> "SourceSpec":
        """Build from a parameters mapping (e.g. one entry of ``ingestion.sources``); unknown keys are an error."""
        allowed = {f for f in cls.__dataclass_fields__}
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(f"source spec has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**dict(params))


# ---------------------------------------------------------------------------------------------------- spilling
@dataclass(frozen=True)
class _BuildContext:
    spill_dir: Path | None = None
    chunk_rows: int | None = None


_CONTEXT: contextvars.ContextVar[_BuildContext] = contextvars.ContextVar("eva_manifest_build", default=_BuildContext())


def _chunk_rows() -> int:
    return int(_CONTEXT.get().chunk_rows or CHUNK_ROWS)


def _spill_path(prefix: str, suffix: str) -> Path:
    """A new empty file in the build's work folder (the system temp folder outside a build)."""
    spill_dir = _CONTEXT.get().spill_dir
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=None if spill_dir is None else str(spill_dir))
    os.close(fd)
    return Path(name)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except OSError:
            pass


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

    def claim(
        self, keys: Sequence[str | None], codes: Iterable[int], *, expect_duplicates: bool = True
    ) -> np.ndarray:
        """Add ``keys`` in order, key ``i`` owned by ``codes[i]`` (codes must differ from those of earlier calls);
        returns a bool array, True where the key was already there (added by an earlier call or earlier in
        ``keys``). ``None`` keys are skipped (False).

        ``expect_duplicates=False`` (e.g. locations, normally unique) inserts the chunk in one ``executemany`` and
        looks keys up only when some were already there; otherwise keys are inserted one by one.
        """
        seen = np.zeros(len(keys), dtype=bool)
        first: dict[str, tuple[int, int]] = {}  # key -> (code, position) of its first occurrence here
        for i, (key, code) in enumerate(zip(keys, codes)):
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
#: incremental scan cache (:mod:`eva_pipeline.data.scan_cache`); a reader without ``units`` is always read whole.
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


def source_kinds() -> tuple[str, ...]:
    """Registered source kinds."""
    return tuple(sorted(_SOURCE_READERS))


def _as_location_path(path: str | os.PathLike[str]) -> str:
    return Path(path).as_posix()


@register_source_kind("idx")
def _read_idx_source(spec: SourceSpec, units: UnitCache | None = None) -> SourceScan:
    """IDX images (N, H, W) or (N, H, W, C) uint8, optional IDX labels (N,); item ``i`` -> ``"path#i"``.
    The images + labels pair is one cache unit."""
    scan = SourceScan(available=0)
    if units is None:
        scan.available = _scan_idx(spec, scan)
        return scan
    paths = [spec.images] + ([] if spec.labels is None else [spec.labels])
    meta = units.run(scan, _as_location_path(spec.images), paths, lambda sub: {"available": _scan_idx(spec, sub)})
    scan.available = meta["available"]
    return scan


def _scan_idx(spec: SourceSpec, scan: Any) -> int:
    """Add the items of an IDX source to ``scan`` (everything is checked before the first one); -> available."""
    images = read_idx(spec.images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise ValueError(
            f"IDX images {spec.images}: expected uint8 of shape (N, H, W) or (N, H, W, 1|3), "
            f"got {images.dtype} {images.shape}"
        )
    available = int(images.shape[0])
    n = available if spec.limit is None else min(available, int(spec.limit))
    labels: list[int | None] = [None] * n
    if spec.labels is not None:
        raw = read_idx(spec.labels)
        if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"IDX labels {spec.labels}: expected a 1-D integer array, got {raw.dtype} {raw.shape}")
        if raw.shape[0] != available:
            raise ValueError(
                f"IDX labels {spec.labels}: {raw.shape[0]} labels for {available} images in {spec.images}"
            )
        labels = raw[:n].tolist()
    height, width = int(images.shape[1]), int(images.shape[2])
    channels = 1 if images.ndim == 3 else int(images.shape[3])
    size = height * width * channels
    base = _as_location_path(spec.images)
    for i in range(n):  # C-contiguous rows: hashed without copies
        scan.add(f"{base}#{i}", labels[i], width, height, size, hashlib.sha1(images[i]).hexdigest())
    return available


def _check_paths(spec: SourceSpec) -> None:
    """Fail on a missing input before reading anything, naming every missing path of the source."""
    missing = [str(p) for p in (spec.images, spec.labels) if p is not None and not Path(p).exists()]
    if missing:
        raise FileNotFoundError(
            f"source {spec.name!r} ({spec.kind}): missing {', '.join(missing)} (cwd {Path.cwd()}; the embedded "
            f"demo data lives in {EMBEDDED_DATA_DIR}/ under the project root)"
        )


def _check_specs(specs: Sequence[SourceSpec]) -> list[SourceSpec]:
    specs = list(specs)
    if not specs:
        raise ValueError("build_manifest: no sources given")
    names = Counter(s.name for s in specs)
    if dup_names := sorted(n for n, c in names.items() if c > 1):
        raise ValueError(f"source names must be unique (they prefix the ids), repeated: {dup_names}")
    if unknown := sorted({s.kind for s in specs} - set(_SOURCE_READERS)):
        raise ValueError(f"unknown source kind(s) {unknown}; registered: {list(source_kinds())}")
    for spec in specs:
        _check_paths(spec)
    return specs


def write_manifest(
    specs: Sequence[SourceSpec],
    path: str | os.PathLike[str],
    *,
    dedup: bool = True,
    rejections_path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    chunk_rows: int | None = None,
    row_group_rows: int | None = None,
    work_dir: str | os.PathLike[str] | None = None,
) -> tuple[Manifest, dict[str, Any]]:
    """Scan every source, write the manifest to Parquet at ``path`` and return ``(Manifest handle, report)``.

    Raises before ``path`` is written (or replaced) if a source is bad or the manifest would be invalid (the
    checks of :func:`validate_manifest`, done chunk by chunk). With ``dedup`` an item whose content hash was
    already kept is dropped and counted. Probe sources are de-duplicated first, so an image present in both
    splits stays a probe image and never enters pre-training. ``report`` is JSON-ready: per source found / kept /
    rejected / duplicates (found == kept + rejected + duplicates), totals, per-split counts and the label
    histogram of each split. Each source lists its first :data:`REPORT_EXAMPLES` rejections and the count of every
    rejection reason; with ``rejections_path`` every rejection of every source is also written there as JSON lines
    (``source``, ``location``, ``reason``, ``detail``), and the report names the file.

    With ``cache_dir`` the scan is incremental (:mod:`eva_pipeline.data.scan_cache`): each unit of input (an image
    file, a shard, an IDX pair) whose path, size and mtime are unchanged is taken from the cache without being
    opened; the manifest and report are the same as without the cache, plus per source ``read`` / ``from_cache``
    (units) and ``removed_since_cache`` (cached units no longer present).

    Memory is flat in the number of images: at most ``chunk_rows`` (default :data:`CHUNK_ROWS`) items per source
    in Python lists, the rest spilled to a temporary work folder under ``work_dir`` (default: the folder of
    ``path``; it needs disk for about two copies of the manifest plus the hash table), removed at the end; the
    Parquet file is written in row groups of ``row_group_rows`` (default :data:`ROW_GROUP_ROWS`).
    """
    from eva_pipeline.data.manifest_file import Manifest

    specs = _check_specs(specs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = int(chunk_rows or CHUNK_ROWS)
    group = int(row_group_rows or ROW_GROUP_ROWS)
    if chunk < 1 or group < 1:
        raise ValueError(f"chunk_rows and row_group_rows must be positive, got {chunk_rows}, {row_group_rows}")
    work_root = path.parent if work_dir is None else Path(work_dir)
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".manifest-work-", dir=work_root) as work_name:
        work = Path(work_name)
        token = _CONTEXT.set(_BuildContext(spill_dir=work, chunk_rows=chunk))
        scans: list[SourceScan] = []
        try:
            cache_reports: list[dict[str, Any]] = []
            for spec in specs:
                scan, cache_report = _scan_source(spec, cache_dir)
                scans.append(scan)
                cache_reports.append(cache_report)
            dedup_pass = _dedup_pass(specs, scans, dedup, work)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                written = _write_pass(specs, scans, dedup_pass.masks, tmp, group, work)
                errors = written.errors + dedup_pass.errors
                if errors:
                    raise ValueError("invalid manifest:\n  - " + "\n  - ".join(errors))
                report = _report(specs, scans, dedup, dedup_pass, written, cache_reports)
                if rejections_path is not None:
                    _write_rejections(Path(rejections_path), specs, scans)
                    report["rejections_file"] = str(rejections_path)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        finally:
            for scan in scans:
                scan.close()
            _CONTEXT.reset(token)
    return Manifest(path), report


def build_manifest(
    specs: Sequence[SourceSpec],
    *,
    dedup: bool = True,
    rejections_path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    chunk_rows: int | None = None,
    row_group_rows: int | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """:func:`write_manifest` into a temporary file, returned as ``(manifest DataFrame, report)``.

    For small manifests (tests, notebooks, the demo): the DataFrame holds every row. The ingestion pipeline uses
    :func:`write_manifest`, whose memory does not grow with the number of images.
    """
    with tempfile.TemporaryDirectory(prefix="eva-manifest-") as tmp:
        manifest, report = write_manifest(
            specs,
            Path(tmp) / "manifest.parquet",
            dedup=dedup,
            rejections_path=rejections_path,
            cache_dir=cache_dir,
            chunk_rows=chunk_rows,
            row_group_rows=row_group_rows,
        )
        return manifest.to_pandas(), report


def _scan_source(spec: SourceSpec, cache_dir: str | os.PathLike[str] | None) -> tuple[SourceScan, dict[str, Any]]:
    """Run the source's reader (through its scan cache with ``cache_dir``); -> (finished scan, cache counters)."""
    reader = _SOURCE_READERS[spec.kind]
    units = None
    if cache_dir is not None:
        units = UnitCache(cache_file(cache_dir, spec.name), source_settings(spec))
    try:
        if units is not None and "units" in inspect.signature(reader).parameters:
            scan = reader(spec, units=units)
        else:
            scan = reader(spec)
            if units is not None:
                units.read = 1  # a reader without units: the whole source, read
        scan.finish(spec.name)
    except ValueError as exc:
        if units is not None:
            units.abort()
        raise ValueError(f"source {spec.name!r} ({spec.kind}): {exc}") from exc
    except BaseException:
        if units is not None:
            units.abort()
        raise
    if units is None:
        return scan, {}
    units.commit()
    return scan, units.report()


@dataclass
class _DedupPass:
    masks: list[Path]  # per source: one bool per accepted item (raw bytes), True = kept
    duplicates: list[int]
    examples: list[list[dict[str, str]]]
    errors: list[str]


def _dedup_pass(specs: Sequence[SourceSpec], scans: Sequence[SourceScan], dedup: bool, work: Path) -> _DedupPass:
    """Decide which items survive de-duplication, probe sources first (they claim their images); every hash goes
    through a sqlite table on disk. Without ``dedup`` only the probe hashes are stored, for the leak check."""
    masks = [work / f"keep-{k}.bin" for k in range(len(specs))]
    duplicates = [0] * len(specs)
    examples: list[list[dict[str, str]]] = [[] for _ in specs]
    leaked = 0
    seen = DiskSet(work / "hashes.sqlite")
    try:
        for k in sorted(range(len(specs)), key=lambda k: (specs[k].split != "probe", k)):
            probe = specs[k].split == "probe"
            pos = 0
            with masks[k].open("wb") as fh:
                for batch in scans[k].iter_item_batches():
                    hashes = batch.column("hash").to_pylist()
                    n = len(hashes)
                    keep = np.ones(n, dtype=bool)
                    codes = range((k << _CODE_SHIFT) + pos, (k << _CODE_SHIFT) + pos + n)
                    if dedup:
                        dup = seen.claim(hashes, codes)
                        keep[dup] = False
                        duplicates[k] += int(dup.sum())
                        room = REPORT_EXAMPLES - len(examples[k])
                        for i in np.flatnonzero(dup)[: max(room, 0)].tolist():
                            owner = seen.owner(hashes[i])
                            assert owner is not None
                            item_id = f"{specs[k].name}/{pos + i}"
                            examples[k].append({"id": item_id, "duplicate_of": _code_id(specs, owner)})
                    elif probe:
                        seen.claim(hashes, codes)  # remembered for the leak check only
                    else:
                        leaked += int(seen.contains(hashes).sum())
                    keep.tofile(fh)
                    pos += n
    finally:
        seen.close()
    errors = [f"{leaked} pre-training image(s) are also probe images (same content_hash)"] if leaked else []
    return _DedupPass(masks, duplicates, examples, errors)


def _code_id(specs: Sequence[SourceSpec], code: int) -> str:
    return f"{specs[code >> _CODE_SHIFT].name}/{code & ((1 << _CODE_SHIFT) - 1)}"


class _RowGroupWriter:
    """Tables in, Parquet row groups of exactly ``rows`` rows out (the last one shorter); buffers < one group."""

    def __init__(self, path: Path, schema: pa.Schema, rows: int) -> None:
        self.rows = rows
        self.peak_rows = 0
        self._writer = pq.ParquetWriter(path, schema)
        self._pending: list[pa.Table] = []
        self._n = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            take = min(self.rows - self._n, table.num_rows)
            self._pending.append(table.slice(0, take))
            self._n += take
            self.peak_rows = max(self.peak_rows, self._n)
            table = table.slice(take)
            if self._n >= self.rows:
                self._flush()

    def _flush(self) -> None:
        if self._n:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=self.rows)
            self._pending, self._n = [], 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


@dataclass
class _WritePass:
    kept: list[int]
    split_items: Counter[str]
    split_labelled: Counter[str]
    split_sources: dict[str, set[str]]
    histograms: dict[str, Counter[int]]
    errors: list[str]
    peak_rows: int


def _count(mask: pa.Array) -> int:
    return int(pc.sum(mask).as_py() or 0)


def _write_pass(
    specs: Sequence[SourceSpec], scans: Sequence[SourceScan], masks: Sequence[Path], out: Path, group: int, work: Path
) -> _WritePass:
    """Write the kept items in source order, in row groups of ``group`` rows, checking them as they go.

    Ids are ``"<source>/<item index>"``: unique because source names are unique and an index has no ``/``.
    Locations are checked for uniqueness through a sqlite table on disk.
    """
    schema = manifest_file_schema()
    kept = [0] * len(specs)
    split_items: Counter[str] = Counter()
    split_labelled: Counter[str] = Counter()
    split_sources: dict[str, set[str]] = {split: set() for split in SPLITS}
    histograms: dict[str, Counter[int]] = {split: Counter() for split in SPLITS}
    bad = Counter()  # problem -> rows
    dup_locations: list[str] = []
    n_dup_locations = 0
    locations = DiskSet(work / "locations.sqlite")
    rows = 0  # manifest rows written
    writer = _RowGroupWriter(out, schema, group)
    try:
        for k, (spec, scan) in enumerate(zip(specs, scans)):
            name, split = pa.scalar(spec.name, pa.string()), pa.scalar(spec.split, pa.string())
            pos = 0
            with masks[k].open("rb") as fh:
                for batch in scan.iter_item_batches():
                    n = batch.num_rows
                    keep = np.fromfile(fh, dtype=np.bool_, count=n)
                    if len(keep) != n:
                        raise RuntimeError(f"source {spec.name!r}: de-duplication mask shorter than the scan")
                    idx = np.flatnonzero(keep)
                    m = len(idx)
                    if m:
                        items = batch if m == n else batch.take(pa.array(idx))
                        ids = pc.binary_join_element_wise(name, pc.cast(pa.array(idx + pos), pa.string()), "/")
                        table = pa.Table.from_arrays(
                            [
                                ids,
                                pa.repeat(name, m),
                                items.column("location"),
                                items.column("label"),
                                items.column("width"),
                                items.column("height"),
                                items.column("size_bytes"),
                                pa.repeat(split, m),
                                items.column("hash"),
                            ],
                            schema=schema,
                        )
                        loc = items.column("location")
                        bad["location"] += loc.null_count + _count(pc.equal(loc, ""))
                        for col in ("width", "height"):
                            values = items.column(col)
                            bad[col] += values.null_count + _count(pc.less_equal(values, 0))
                        sizes = items.column("size_bytes")
                        bad["size_bytes"] += sizes.null_count + _count(pc.less(sizes, 0))
                        loc_values = loc.to_pylist()
                        seen = locations.claim(loc_values, range(rows, rows + m), expect_duplicates=False)
                        if seen.any():
                            n_dup_locations += int(seen.sum())
                            for i in np.flatnonzero(seen).tolist():
                                if len(dup_locations) < 5 and loc_values[i] not in dup_locations:
                                    dup_locations.append(loc_values[i])
                        labels = items.column("label")
                        split_items[spec.split] += m
                        split_labelled[spec.split] += m - labels.null_count
                        split_sources[spec.split].add(spec.name)
                        for entry in pc.value_counts(labels.drop_null()).to_pylist():
                            histograms[spec.split][int(entry["values"])] += int(entry["counts"])
                        writer.write(table)
                        kept[k] += m
                        rows += m
                    pos += n
    finally:
        writer.close()
        locations.close()
    errors = []
    if bad["location"]:
        errors.append("column 'location' has missing or empty values")
    for col in ("width", "height"):
        if bad[col]:
            errors.append(f"column {col!r} has non-positive values")
    if bad["size_bytes"]:
        errors.append("column 'size_bytes' has negative values")
    if n_dup_locations:
        errors.append(f"{n_dup_locations} duplicate location(s), e.g. {dup_locations}")
    return _WritePass(kept, split_items, split_labelled, split_sources, histograms, errors, writer.peak_rows)


def _write_rejections(path: Path, specs: Sequence[SourceSpec], scans: Sequence[SourceScan]) -> None:
    """Every rejection as one JSON line (written to a temporary file, then moved into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for spec, scan in zip(specs, scans):
            for rejection in scan.iter_rejections():
                fh.write(json.dumps({"source": spec.name, **rejection}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _report(
    specs: Sequence[SourceSpec],
    scans: Sequence[SourceScan],
    dedup: bool,
    dedup_pass: _DedupPass,
    written: _WritePass,
    cache_reports: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """Per source counts, totals, per-split counts and per-split label histograms (string keys: saved as JSON)."""
    sources: dict[str, Any] = {}
    for k, (spec, scan) in enumerate(zip(specs, scans)):
        sources[spec.name] = {
            "kind": spec.kind,
            "split": spec.split,
            "images": str(spec.images),
            "labels": None if spec.labels is None else str(spec.labels),
            "limit": spec.limit,
            "available": scan.available,
            "found": scan.found,
            "kept": written.kept[k],
            "rejected": scan.rejected,
            "duplicates": dedup_pass.duplicates[k],
            "rejection_reasons": scan.rejection_reasons,
            "rejected_examples": scan.rejected_examples,
            "duplicate_examples": dedup_pass.examples[k],
            **{key: value for key, value in scan.info.items() if key not in ("kind", "split", "found", "kept")},
            **cache_reports[k],
        }
    totals = {key: sum(int(s[key]) for s in sources.values()) for key in ("found", "kept", "rejected", "duplicates")}
    splits = {
        split: {
            "items": written.split_items[split],
            "labelled": written.split_labelled[split],
            "sources": sorted(written.split_sources[split]),
        }
        for split in SPLITS
    }
    histogram = {split: {str(k): v for k, v in sorted(written.histograms[split].items())} for split in SPLITS}
    return {"dedup": dedup, "sources": sources, "totals": totals, "splits": splits, "label_histogram": histogram}


def validate_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Check columns, dtypes, unique ids and locations, split values and probe/pretrain leakage; returns ``df``.

    All problems are collected into one ValueError, so a bad manifest is fixed in one round.
    """
    errors: list[str] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest is missing columns {missing}; expected {list(MANIFEST_COLUMNS)}")
    for col in _STRING_COLUMNS + (("content_hash",) if "content_hash" in df.columns else ()):
        series = df[col]
        if not (pd.api.types.is_string_dtype(series.dtype) or series.dtype == object):
            errors.append(f"column {col!r} must hold strings, has dtype {series.dtype}")
            continue
        values = series.dropna()
        if not values.map(lambda v: isinstance(v, str)).all():
            errors.append(f"column {col!r} holds non-string values")
        if col != "content_hash" and (len(values) != len(series) or (values == "").any()):
            errors.append(f"column {col!r} has missing or empty values")
    if str(df["label"].dtype) not in ("Int64", "int64"):
        errors.append(f"column 'label' must be Int64 (nullable integer), has dtype {df['label'].dtype}")
    for col, want in (("width", "int32"), ("height", "int32"), ("size_bytes", "int64")):
        if str(df[col].dtype) != want:
            errors.append(f"column {col!r} must be {want}, has dtype {df[col].dtype}")
        elif col != "size_bytes" and (df[col] <= 0).any():
            errors.append(f"column {col!r} has non-positive values")
        elif col == "size_bytes" and (df[col] < 0).any():
            errors.append("column 'size_bytes' has negative values")
    for col in ("id", "location"):
        dupes = df[col][df[col].duplicated()].unique()
        if len(dupes):
            errors.append(f"{len(dupes)} duplicate {col}(s), e.g. {list(dupes[:5])}")
    bad_splits = sorted(set(df["split"].dropna().unique()) - set(SPLITS))
    if bad_splits:
        errors.append(f"unknown split value(s) {bad_splits}; allowed: {list(SPLITS)}")
    if "content_hash" in df.columns:
        hashes = df[["content_hash", "split"]].dropna()
        probe = set(hashes.loc[hashes["split"] == "probe", "content_hash"])
        leaked = hashes.loc[(hashes["split"] != "probe") & hashes["content_hash"].isin(probe)]
        if len(leaked):
            errors.append(f"{len(leaked)} pre-training image(s) are also probe images (same content_hash)")
    if errors:
        raise ValueError("invalid manifest:\n  - " + "\n  - ".join(errors))
    return df


def select_split(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of one split in manifest order, with a fresh 0..n-1 index (row i <-> target row i)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return manifest[manifest["split"] == split].reset_index(drop=True)


def manifest_digest(manifest: pd.DataFrame, columns: Sequence[str] = PIXEL_DIGEST_COLUMNS) -> str:
    """sha256 hex of the given columns, row order included: a stable key for caches derived from the images.

    By default only the columns that determine pixels count, so relabelling does not invalidate teacher targets.
    Columns absent from the manifest are skipped (e.g. ``content_hash``).
    """
    h = hashlib.sha256()
    cols = [c for c in columns if c in manifest.columns]
    h.update(("\x1f".join(cols) + f"\x1e{len(manifest)}\x1e").encode())
    for col in cols:
        values = manifest[col].astype(object).where(manifest[col].notna(), None)
        h.update(("\x1f".join("\x00" if v is None else str(v) for v in values) + "\x1e").encode())
    return h.hexdigest()


# Built-in readers of encoded images ("image_folder", "file_list", "webdataset") register themselves on import.
from eva_pipeline.data import sources as _sources  # noqa: E402,F401  (after the registry exists: circular import)
