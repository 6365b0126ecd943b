"""Spilling to disk during a build: what keeps memory flat in the number of images.

:func:`build_settings` says, for the duration of one build, where spill files go (the build's work folder) and how
many items a chunk holds (:data:`CHUNK_ROWS`); :func:`spill_file` makes a new file there. :class:`DiskSet` is a set
of strings in a sqlite table (the seen content hashes and locations of a build), :class:`StringSet` one that stays
in memory while small and moves to a :class:`DiskSet` past one chunk.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sqlite3
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Items per chunk of a build: the most a source scan holds in Python lists (about 0.5 KiB per item), the batches
#: it spills and that de-duplication and validation work on.
CHUNK_ROWS: int = 16_384
#: Page cache of each sqlite table a build keeps on disk (seen hashes, seen locations), in KiB.
SQLITE_CACHE_KIB: int = 8_192


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


def current_chunk_rows() -> int:
    """The build's ``chunk_rows`` (:data:`CHUNK_ROWS` outside a build)."""
    return int(_CONTEXT.get(_NO_BUILD).chunk_rows or CHUNK_ROWS)


def spill_file(prefix: str, suffix: str) -> Path:
    """A new empty file in the build's work folder (the system temp folder outside a build)."""
    spill_dir = _CONTEXT.get(_NO_BUILD).spill_dir
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=None if spill_dir is None else str(spill_dir))
    os.close(fd)
    return Path(name)


def unlink_all(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


class DiskSet:
    """A set of strings in a sqlite table on disk (``key`` PRIMARY KEY), each remembering the integer code it was
    first added with (its owner). Memory: sqlite's page cache, at most ``cache_kib``; the file is removed by
    :meth:`close` (or when the object is collected)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, cache_kib: int | None = None) -> None:
        self.path = spill_file("set-", ".sqlite") if path is None else Path(path)
        self._finalizer = weakref.finalize(self, unlink_all, [self.path])
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
        self._limit = int(limit or current_chunk_rows())
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
