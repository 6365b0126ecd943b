"""Incremental ingestion: a per-source cache of scan results, one entry per *unit of input*.

A unit is what a reader opens as a whole: one image file (``image_folder``, ``file_list``), one shard ``.tar``
(``webdataset``), the IDX images + labels pair (``idx``). Its cached result (the accepted items and rejections it
produced, plus a small reader-specific ``meta`` dict) is keyed by the unit's location as the reader names it and
a *stamp* of its files (absolute path, size, mtime_ns). A re-run takes a unit whose stamp matches from the cache
without opening it; new or changed units are read; units no longer present are dropped from the cache and counted
(``removed_since_cache``). The whole cache of a source is void when the source's reader-relevant settings (kind,
split, labels, layout, limit) or :data:`CACHE_VERSION` change.

A source's cache is one Parquet file under ``cache_dir``, written in row groups to a temporary file while the
source is scanned and moved into place (``os.replace``) when the scan succeeds. Rows: one header row per unit
(``row_type`` 0: unit, stamp, meta JSON) followed by its items (1: location, label, width, height, size_bytes,
hash) and rejections (2: location, reason, detail), in scan order, so a cached scan replays identically.

Files modified within :data:`RACY_NS` of being stamped are read but not cached ("racily clean" as git calls it):
a later rewrite within the same mtime tick and with the same size would otherwise go unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

#: Bump when the cache layout or what a reader produces for a unit changes: older caches are then ignored.
CACHE_VERSION = 1
#: A file whose mtime is this close to (or after) the time it was stamped is not cached.
RACY_NS = 2_000_000_000
#: Entries buffered before a row group is written.
_CHUNK = 65_536
_HEADER, _ITEM, _REJECTION = 0, 1, 2
_KEEP = object()

_SCHEMA = pa.schema(
    [
        pa.field("row_type", pa.int8()),
        pa.field("unit", pa.string()),
        pa.field("stamp", pa.string()),
        pa.field("meta", pa.string()),
        pa.field("location", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("size_bytes", pa.int64()),
        pa.field("hash", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
    ]
)
_SETTINGS_KEY = b"eva_pipeline.scan_cache.settings"


def source_settings(spec: Any) -> str:
    """The settings of a source that its cache depends on, as canonical JSON."""
    return json.dumps(
        {
            "version": CACHE_VERSION,
            "kind": spec.kind,
            "split": spec.split,
            "labels": None if spec.labels is None else Path(spec.labels).as_posix(),
            "layout": spec.layout,
            "limit": spec.limit,
        },
        sort_keys=True,
    )


def cache_file(cache_dir: str | os.PathLike[str], source_name: str) -> Path:
    """Where the cache of source ``source_name`` lives (readable name + a hash, so any source name is safe)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", source_name)[:80]
    return Path(cache_dir) / f"{safe}-{hashlib.sha1(source_name.encode()).hexdigest()[:10]}.parquet"


def stamp(paths: Sequence[str | os.PathLike[str]]) -> tuple[str, bool]:
    """``(stamp, racy)`` of the files of one unit; raises OSError when one cannot be stat'ed."""
    parts = []
    racy = False
    for path in paths:
        st = os.stat(path)
        now = time.time_ns()
        racy = racy or st.st_mtime_ns >= now - RACY_NS
        parts.append(f"{os.path.abspath(path)}\x1f{st.st_size}\x1f{st.st_mtime_ns}")
    return "\x1e".join(parts), racy


class UnitCache:
    """The cache of one source during one scan; readers call :meth:`run` once per unit, in scan order.

    ``UnitCache(None, ...)`` caches nothing (every unit is read) but still counts units. Counters: ``read``,
    ``from_cache``, ``removed_since_cache`` (the latter known after :meth:`commit`).
    """

    def __init__(self, path: Path | None, settings: str = "") -> None:
        self.path = path
        self.settings = settings
        self.read = 0
        self.from_cache = 0
        self.removed_since_cache = 0
        self.invalidated = False
        self._index: dict[str, tuple[int, int]] = {}
        self._cols: dict[str, list[Any]] = {}
        self._looked_up: set[str] = set()
        self._buffer: dict[str, list[Any]] = {name: [] for name in _SCHEMA.names}
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        if path is not None:
            self._load(path)

    # ------------------------------------------------------------------ loading
    def _load(self, path: Path) -> None:
        if not path.exists():
            return
        try:
            pf = pq.ParquetFile(path)
            meta = pf.schema_arrow.metadata or {}
            if meta.get(_SETTINGS_KEY, b"").decode() != self.settings or pf.schema_arrow.names != _SCHEMA.names:
                self.invalidated = True
                return
            table = pf.read()
        except (OSError, pa.ArrowException):  # unreadable cache: rebuild it
            self.invalidated = True
            return
        self._cols = {name: table.column(name).to_pylist() for name in _SCHEMA.names}
        del table
        row_type = self._cols["row_type"]
        units = self._cols["unit"]
        start = None
        for i, kind in enumerate(row_type):
            if kind == _HEADER:
                if start is not None:
                    self._index[units[start]] = (start, i)
                start = i
        if start is not None:
            self._index[units[start]] = (start, len(row_type))

    # ------------------------------------------------------------------ scanning
    def run(
        self,
        scan: Any,
        unit: str,
        paths: Sequence[str | os.PathLike[str]],
        read: Callable[[Any], dict[str, Any] | None],
        *,
        label: Any = _KEEP,
        reusable: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """Add one unit's items and rejections to ``scan``: from the cache when its stamp matches (and
        ``reusable(meta)`` agrees), else by calling ``read(sub_scan)`` (which returns the unit's ``meta``).

        ``label``, when given, overrides the label of every accepted item of the unit (labels of image files
        come from their folder or list line, not from the file). Returns the unit's ``meta``.
        """
        try:
            unit_stamp, racy = stamp(paths)
        except OSError:
            unit_stamp, racy = None, True
        if self.path is not None and unit_stamp is not None and unit in self._index:
            self._looked_up.add(unit)
            start, end = self._index[unit]
            meta = json.loads(self._cols["meta"][start] or "{}")
            if self._cols["stamp"][start] == unit_stamp and (reusable is None or reusable(meta)):
                self.from_cache += 1
                self._replay(scan, start, end, label)
                self._write(unit, unit_stamp, meta, self._cols, start + 1, end)
                return meta
        self.read += 1
        if self.path is None or unit_stamp is None or racy:
            n_items = len(scan.labels)
            meta = read(scan) or {}
            if label is not _KEEP:
                for i in range(n_items, len(scan.labels)):
                    scan.labels[i] = label
            return meta
        sub = type(scan)(available=0)
        meta = read(sub) or {}
        if label is not _KEEP:
            sub.labels = [label] * len(sub.labels)
        cols = {
            "row_type": [_ITEM] * len(sub.locations) + [_REJECTION] * len(sub.rejections),
            "location": sub.locations + [r["location"] for r in sub.rejections],
            "label": sub.labels + [None] * len(sub.rejections),
            "width": sub.widths + [None] * len(sub.rejections),
            "height": sub.heights + [None] * len(sub.rejections),
            "size_bytes": sub.size_bytes + [None] * len(sub.rejections),
            "hash": sub.hashes + [None] * len(sub.rejections),
            "reason": [None] * len(sub.locations) + [r["reason"] for r in sub.rejections],
            "detail": [None] * len(sub.locations) + [r["detail"] for r in sub.rejections],
        }
        self._write(unit, unit_stamp, meta, cols, 0, len(cols["row_type"]))
        self.merge(scan, sub)
        return meta

    def _replay(self, scan: Any, start: int, end: int, label: Any) -> None:
        c = self._cols
        for i in range(start + 1, end):
            if c["row_type"][i] == _ITEM:
                scan.add(
                    c["location"][i],
                    c["label"][i] if label is _KEEP else label,
                    c["width"][i],
                    c["height"][i],
                    c["size_bytes"][i],
                    c["hash"][i],
                )
            else:
                scan.reject(c["location"][i], c["reason"][i], c["detail"][i] or "")

    @staticmethod
    def merge(scan: Any, sub: Any) -> None:
        scan.locations.extend(sub.locations)
        scan.labels.extend(sub.labels)
        scan.widths.extend(sub.widths)
        scan.heights.extend(sub.heights)
        scan.size_bytes.extend(sub.size_bytes)
        scan.hashes.extend(sub.hashes)
        scan.rejections.extend(sub.rejections)

    # ------------------------------------------------------------------ writing
    def _write(
        self, unit: str, unit_stamp: str, meta: dict[str, Any], cols: dict[str, list[Any]], start: int, end: int
    ) -> None:
        if self.path is None:
            return
        buf = self._buffer
        header = {"row_type": _HEADER, "unit": unit, "stamp": unit_stamp, "meta": json.dumps(meta, sort_keys=True)}
        for name in _SCHEMA.names:
            buf[name].append(header.get(name))
        n = end - start
        for name in _SCHEMA.names:
            if name in ("unit", "stamp", "meta"):
                buf[name].extend([None] * n)
            else:
                buf[name].extend(cols[name][start:end])
        if len(buf["row_type"]) >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self.path is None or not self._buffer["row_type"]:
            return
        writer = self._open_writer()
        writer.write_table(pa.table(self._buffer, schema=writer.schema))
        self._buffer = {name: [] for name in _SCHEMA.names}

    def _open_writer(self) -> pq.ParquetWriter:
        if self._writer is None:
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            schema = _SCHEMA.with_metadata({_SETTINGS_KEY: self.settings.encode()})
            self._writer = pq.ParquetWriter(self._tmp, schema)
        return self._writer

    def commit(self) -> None:
        """The source scanned successfully: move the new cache into place and count the vanished units."""
        self.removed_since_cache = len(set(self._index) - self._looked_up)
        self._cols, self._index = {}, {}
        if self.path is None:
            return
        self._flush()
        writer = self._open_writer()  # also when no unit at all: an empty cache
        writer.close()
        self._writer = None
        assert self._tmp is not None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """The scan failed: drop the partial new cache (the old one stays)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)

    def report(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "from_cache": self.from_cache,
            "removed_since_cache": self.removed_since_cache,
            "cache_invalidated": self.invalidated,
        }
