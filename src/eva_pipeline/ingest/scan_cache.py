"""Incremental ingestion: a per-source cache of scan results, one entry per *unit of input*.

A unit is what a reader opens as a whole: one image file (``image_folder``, ``file_list``), one shard ``.tar``
(``webdataset``), the IDX images + labels pair (``idx``). Its cached result (the accepted items and rejections it
produced, plus a small reader-specific ``meta`` dict) is keyed by the unit's location as the reader names it and
a *stamp* of its files (absolute path, size, mtime_ns). A re-run takes a unit whose stamp matches from the cache
without opening it; new or changed units are read; units no longer present are dropped from the cache and counted
(``removed_since_cache``). The whole cache of a source is void when the source's reader-relevant settings (kind,
split, labels, layout, limit) or :data:`CACHE_VERSION` change.

A source's cache is one sqlite3 database under ``cache_dir`` (ImageNet-21K: 14M units, about 180 bytes each),
looked up unit by unit with a bounded page cache, never loaded whole: table ``units`` (unit PRIMARY KEY, a 128-bit
digest of the stamp, meta JSON) and table ``entries`` (per unit, in scan order: kind 1 = item with location, label,
width, height, size_bytes, hash; kind 2 = rejection with location, reason, detail), so a cached scan replays
identically. A scan writes a *new* database to a temporary file (the previous one attached read-only for the
lookups; reused units are copied over inside sqlite) and moves it into place (``os.replace``) when the source
scanned successfully: a failed scan leaves the previous cache as it was.

Files modified within :data:`RACY_NS` of being stamped are read but not cached ("racily clean" as git calls it):
a later rewrite within the same mtime tick and with the same size would otherwise go unnoticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: Bump when the cache layout or what a reader produces for a unit changes: older caches are then ignored.
CACHE_VERSION = 3  # 3: rejection details without memory addresses
#: A file whose mtime is this close to (or after) the time it was stamped is not cached.
RACY_NS = 2_000_000_000
#: sqlite page cache of a scan's cache database (new + previous), in KiB.
CACHE_KIB = 8_192
#: Entries of one unit buffered before they are inserted.
_FLUSH_ROWS = 4_096
_ITEM, _REJECTION = 1, 2
KEEP_LABEL = object()

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE units (unit TEXT PRIMARY KEY, id INTEGER NOT NULL, stamp BLOB NOT NULL, meta TEXT NOT NULL)"
    " WITHOUT ROWID",
    "CREATE TABLE entries (unit_id INTEGER NOT NULL, pos INTEGER NOT NULL, kind INTEGER NOT NULL, location TEXT,"
    " label INTEGER, width INTEGER, height INTEGER, size_bytes INTEGER, hash TEXT, reason TEXT, detail TEXT,"
    " PRIMARY KEY (unit_id, pos)) WITHOUT ROWID",
)
_ENTRY_COLUMNS = "kind, location, label, width, height, size_bytes, hash, reason, detail"


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
    return Path(cache_dir) / f"{safe}-{hashlib.sha1(source_name.encode()).hexdigest()[:10]}.sqlite"


def _stamp_key(unit_stamp: str) -> bytes:
    """What the cache stores of a stamp: a 128-bit digest (compared for equality only; a third of the size)."""
    return hashlib.blake2b(unit_stamp.encode(), digest_size=16).digest()


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


class _UnitSink:
    """What a reader's ``read`` gets for one unit: forwards every item and rejection to the source's scan (with
    the unit's label, when given) and records it for the new cache (``db`` None: records nothing)."""

    def __init__(self, scan: Any, label: Any, db: sqlite3.Connection | None, unit_id: int) -> None:
        self.scan = scan
        self.label = label
        self.info: dict[str, Any] = {}
        self.available = 0
        self._db = db
        self._unit_id = unit_id
        self._rows: list[tuple[Any, ...]] = []
        self._pos = 0

    def add(
        self, location: str, label: int | None, width: int, height: int, size_bytes: int, digest: str | None
    ) -> None:
        if self.label is not KEEP_LABEL:
            label = self.label
        self.scan.add(location, label, width, height, size_bytes, digest)
        if self._db is not None:
            label = None if label is None else int(label)
            self._record(_ITEM, location, label, int(width), int(height), int(size_bytes), digest, None, None)

    def reject(self, location: str, reason: str, detail: str = "") -> None:
        self.scan.reject(location, reason, detail)
        if self._db is not None:
            self._record(_REJECTION, location, None, None, None, None, None, reason, detail)

    def _record(self, *entry: Any) -> None:
        self._rows.append((self._unit_id, self._pos, *entry))
        self._pos += 1
        if len(self._rows) >= _FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._db is not None and self._rows:
            self._db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", self._rows)
            self._rows = []


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
        self._db: sqlite3.Connection | None = None
        self._tmp: Path | None = None
        self._has_old = False
        self._next_id = 0
        if path is not None:
            self._open(Path(path))

    # ------------------------------------------------------------------ opening
    def _open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        self._tmp.unlink(missing_ok=True)
        db = self._db = sqlite3.connect(self._tmp.resolve().as_uri(), uri=True, isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{CACHE_KIB // 2}"):
            db.execute(f"PRAGMA {pragma}")
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute("INSERT INTO meta VALUES ('settings', ?)", (self.settings,))
        db.execute("CREATE TEMP TABLE looked_up (unit TEXT PRIMARY KEY) WITHOUT ROWID")
        if path.exists():
            try:
                db.execute("ATTACH DATABASE ? AS old", (path.resolve().as_uri() + "?mode=ro",))
                row = db.execute("SELECT value FROM old.meta WHERE key = 'settings'").fetchone()
                db.execute(f"PRAGMA old.cache_size=-{CACHE_KIB // 2}")
                self._has_old = row is not None and row[0] == self.settings
            except sqlite3.DatabaseError:  # unreadable or another layout: rebuild it
                self._has_old = False
            if not self._has_old:
                self.invalidated = True
                self._detach()
        db.execute("BEGIN")

    def _detach(self) -> None:
        assert self._db is not None
        with contextlib.suppress(sqlite3.DatabaseError):
            self._db.execute("DETACH DATABASE old")

    # ------------------------------------------------------------------ scanning
    def run(
        self,
        scan: Any,
        unit: str,
        paths: Sequence[str | os.PathLike[str]],
        read: Callable[[Any], dict[str, Any] | None],
        *,
        label: Any = KEEP_LABEL,
        reusable: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """Add one unit's items and rejections to ``scan``: from the cache when its stamp matches (and
        ``reusable(meta)`` agrees), else by calling ``read(sink)`` (which returns the unit's ``meta``; ``sink``
        has the scan's ``add`` and ``reject``).

        ``label``, when given, overrides the label of every accepted item of the unit (labels of image files
        come from their folder or list line, not from the file). Returns the unit's ``meta``.
        """
        try:
            unit_stamp, racy = stamp(paths)
        except OSError:
            unit_stamp, racy = None, True
        db = self._db
        if db is not None and self._has_old and unit_stamp is not None:
            row = db.execute("SELECT id, stamp, meta FROM old.units WHERE unit = ?", (unit,)).fetchone()
            key = _stamp_key(unit_stamp)
            if row is not None:
                db.execute("INSERT OR IGNORE INTO temp.looked_up VALUES (?)", (unit,))
                old_id, old_stamp, meta_json = row
                meta = json.loads(meta_json or "{}")
                if old_stamp == key and (reusable is None or reusable(meta)):
                    self.from_cache += 1
                    self._replay(scan, old_id, label)
                    new_id = self._new_id()
                    db.execute(
                        f"INSERT INTO entries SELECT ?, pos, {_ENTRY_COLUMNS} FROM old.entries WHERE unit_id = ?",
                        (new_id, old_id),
                    )
                    db.execute("INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?)", (unit, new_id, key, meta_json))
                    return meta
        self.read += 1
        if db is None or unit_stamp is None or racy:
            return read(_UnitSink(scan, label, None, 0)) or {}
        new_id = self._new_id()
        sink = _UnitSink(scan, label, db, new_id)
        meta = read(sink) or {}
        sink.flush()
        db.execute(
            "INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?)",
            (unit, new_id, _stamp_key(unit_stamp), json.dumps(meta, sort_keys=True)),
        )
        return meta

    def is_cached(
        self,
        unit: str,
        paths: Sequence[str | os.PathLike[str]],
        reusable: Callable[[dict[str, Any]], bool] | None = None,
    ) -> bool:
        """Whether :meth:`run` would take ``unit`` from the cache now (no side effects): lets a caller skip reading
        ahead what the cache already holds."""
        if self._db is None or not self._has_old:
            return False
        try:
            unit_stamp, _ = stamp(paths)
        except OSError:
            return False
        row = self._db.execute("SELECT stamp, meta FROM old.units WHERE unit = ?", (unit,)).fetchone()
        if row is None or row[0] != _stamp_key(unit_stamp):
            return False
        return reusable is None or reusable(json.loads(row[1] or "{}"))

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _replay(self, scan: Any, old_id: int, label: Any) -> None:
        assert self._db is not None
        rows = self._db.execute(f"SELECT {_ENTRY_COLUMNS} FROM old.entries WHERE unit_id = ? ORDER BY pos", (old_id,))
        for kind, location, item_label, width, height, size_bytes, digest, reason, detail in rows:
            if kind == _ITEM:
                scan.add(location, item_label if label is KEEP_LABEL else label, width, height, size_bytes, digest)
            else:
                scan.reject(location, reason, detail or "")

    # ------------------------------------------------------------------ finishing
    def commit(self) -> None:
        """The source scanned successfully: move the new cache into place and count the vanished units."""
        db = self._db
        if db is None or self.path is None or self._tmp is None:
            return
        if self._has_old:
            (old_units,) = db.execute("SELECT COUNT(*) FROM old.units").fetchone()
            (looked_up,) = db.execute("SELECT COUNT(*) FROM temp.looked_up").fetchone()
            self.removed_since_cache = int(old_units) - int(looked_up)
        db.execute("COMMIT")
        if self._has_old:
            self._detach()
        db.close()
        self._db = None
        os.replace(self._tmp, self.path)
        self.path.with_suffix(".parquet").unlink(missing_ok=True)  # the cache format before CACHE_VERSION 2

    def abort(self) -> None:
        """The scan failed: drop the partial new cache (the old one stays)."""
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)

    def report(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "from_cache": self.from_cache,
            "removed_since_cache": self.removed_since_cache,
            "cache_invalidated": self.invalidated,
        }
