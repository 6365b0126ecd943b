"""A memory-mapped index of one split of a manifest: any row in O(1), for a loader that reads rows in random order.

Every epoch visits the rows in a uniform random order (:class:`~eva_pipeline.loader.order.EpochOrder`), so a batch's
rows are scattered over the whole manifest: reading them from the Parquet file would decode nearly every 65k-row
group at every step, and finding a tar member by name would scan its shard's headers for every image. The index is
built once per manifest file and split, streamed over the row groups (memory: one row group and one shard's member
table), and holds per row, in one fixed-size record of ``rows.bin``:

* the ``location`` string, as a span of one uint8 blob (``locations.bin``), and ``width``, ``height``;
* for a member of a webdataset ``.tar`` shard, the data offset and size of the member, read from the shard's headers
  during the build (one shard at a time: a shard's rows are consecutive in the manifest), so that reading it is one
  seek and one read, like an image file; -1 for other rows (files, IDX items) and unreadable shards.

It lives in ``<manifest folder>/.manifest_rows/<manifest name>.<split>.<key>/`` (a temporary folder when that one is
not writable), ``key`` a digest of the manifest's identity (size, modification time, digest of the Parquet footer),
the split, the root shards are resolved against and :data:`FORMAT`: a changed manifest gets a new folder and the
stale ones are removed. The folder is written under a temporary name and renamed into place, so ranks and workers
that build at once never see half an index (a file lock lets one build while the others wait, where the file system
has locks); whoever finds it complete uses it. Lookups read memory maps opened lazily in each process, so the
handle pickles to DataLoader workers as a path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from eva_pipeline.loader.pixels import reads_as_tar, split_location, tar_member_spans

log = logging.getLogger(__name__)

#: Version of the on-disk layout; part of the key, so an index of another layout is never read.
FORMAT: int = 1
#: Folder next to the manifest holding its row indices (hidden: never a DVC output, git-ignored with ``data/``).
INDEX_DIRNAME: str = ".manifest_rows"
#: Hex digits of the key in a folder name.
KEY_CHARS: int = 16
#: A build folder older than this was left by a crashed builder and is removed.
STALE_BUILD_SECONDS: float = 24 * 3600.0
#: Bytes at the end of a Parquet file: footer length (little-endian uint32) and the magic ``PAR1``.
PARQUET_TAIL: int = 8
#: One row of the index (packed little-endian record, 36 bytes).
ROW_DTYPE = np.dtype(
    [
        ("location_start", "<i8"),
        ("location_length", "<i4"),
        ("width", "<i4"),
        ("height", "<i4"),
        ("member_offset", "<i8"),
        ("member_size", "<i8"),
    ]
)
#: Columns of :meth:`RowIndex.rows`.
INDEX_COLUMNS: tuple[str, ...] = ("location", "width", "height", "member_offset", "member_size")

_ROWS_FILE, _LOCATIONS_FILE, _META_FILE = "rows.bin", "locations.bin", "meta.json"
_BUILDING_PREFIX = ".building-"
_READ_COLUMNS = ["location", "width", "height", "split"]


def manifest_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies the manifest file's content cheaply: size, modification time and a digest of its footer
    (the Parquet metadata: schema, row groups, their byte ranges and column statistics)."""
    path = Path(path)
    st = path.stat()
    with path.open("rb") as fh:
        fh.seek(max(0, st.st_size - PARQUET_TAIL))
        tail = fh.read(PARQUET_TAIL)
        footer_len = int.from_bytes(tail[:4], "little") if len(tail) == PARQUET_TAIL else 0
        fh.seek(max(0, st.st_size - PARQUET_TAIL - footer_len))
        footer = hashlib.sha256(fh.read(footer_len + PARQUET_TAIL)).hexdigest()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "footer_sha256": footer}


class RowIndex:
    """A built row index (see the module docstring): ``len``, and ``rows(indices)`` -> frame of
    :data:`INDEX_COLUMNS` in the order asked. Use :meth:`open` to get one for a manifest split."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.meta: dict[str, Any] = json.loads((self.folder / _META_FILE).read_text())
        self.num_rows = int(self.meta["rows"])
        self._maps: tuple[np.ndarray, mmap.mmap | bytes] | None = None

    @classmethod
    def open(
        cls,
        manifest: str | os.PathLike[str],
        split: str,
        root: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> RowIndex:
        """The index of ``split`` of ``manifest``, built first unless a complete one for this very file exists.

        ``root``: the folder relative shard paths resolve against (default: the working directory, as
        :class:`~eva_pipeline.loader.pixels.PixelReader`). ``cache_dir``: where indices live (default: next to the
        manifest, :data:`INDEX_DIRNAME`).
        """
        manifest = Path(manifest)
        expected = {
            "format": FORMAT,
            "manifest": manifest_identity(manifest),
            "split": split,
            "root": str(Path(root if root is not None else ".").resolve()),
        }
        key = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:KEY_CHARS]
        parent = _writable_dir(Path(cache_dir) if cache_dir is not None else manifest.parent / INDEX_DIRNAME)
        folder = parent / f"{manifest.name}.{split}.{key}"
        if not _is_complete(folder, expected):
            with _build_lock(parent / f"{folder.name}.lock"):
                if not _is_complete(folder, expected):  # another process may have built it while we waited
                    if folder.exists():  # damaged by hand: an atomic build never leaves one
                        shutil.rmtree(folder, ignore_errors=True)
                    started = time.perf_counter()
                    _build(manifest, split, Path(expected["root"]), folder, expected)
                    log.info(
                        "built the row index of %s (%s) in %.1f s: %s",
                        manifest,
                        split,
                        time.perf_counter() - started,
                        folder,
                    )
            _prune(parent, f"{manifest.name}.{split}.", keep=folder.name, identity=expected["manifest"])
        return cls(folder)

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}  # memory maps are opened again in the receiving process

    def _open_maps(self) -> tuple[np.ndarray, mmap.mmap | bytes]:
        if self._maps is None:
            if self.num_rows == 0:  # an empty file cannot be mapped
                self._maps = (np.empty(0, dtype=ROW_DTYPE), b"")
            else:
                records = np.memmap(self.folder / _ROWS_FILE, dtype=ROW_DTYPE, mode="r", shape=(self.num_rows,))
                blob: mmap.mmap | bytes = b""
                if int(self.meta["location_bytes"]):
                    with (self.folder / _LOCATIONS_FILE).open("rb") as fh:
                        blob = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps = (records, blob)
        return self._maps

    def rows(self, indices: np.ndarray) -> pd.DataFrame:
        """The rows at ``indices`` (in that order): location, width, height, and the tar member span (-1: none)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise IndexError(f"row index out of range for the {self.num_rows} rows of {self.folder}")
        records, blob = self._open_maps()
        picked = np.asarray(records[indices])
        starts, lengths = picked["location_start"].tolist(), picked["location_length"].tolist()
        return pd.DataFrame(
            {
                "location": pd.Series(
                    [blob[a : a + n].decode() for a, n in zip(starts, lengths, strict=True)], dtype="str"
                ),
                "width": picked["width"],
                "height": picked["height"],
                "member_offset": picked["member_offset"],
                "member_size": picked["member_size"],
            },
            columns=list(INDEX_COLUMNS),
        )


# ------------------------------------------------------------------------------------------------------- build
class _ShardSpans:
    """Member spans of the shard currently being indexed (one shard's table in memory at a time)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path: str | None = None
        self.table: dict[str, tuple[int, int]] | None = None
        self.unreadable: list[str] = []

    def _members(self, path: str) -> dict[str, tuple[int, int]] | None:
        if path != self.path:
            shard = Path(path) if Path(path).is_absolute() else self.root / path
            self.path, self.table = path, None
            if reads_as_tar(shard):
                try:
                    self.table = tar_member_spans(shard)
                except (OSError, tarfile.TarError) as exc:  # missing or damaged: read by name later (and fail there)
                    self.unreadable.append(f"{shard} ({exc})")
        return self.table

    def spans(self, locations: pa.Array) -> np.ndarray:
        """(n, 2) int64 (data offset, size) of the tar members among ``locations``; -1 elsewhere."""
        out = np.full((len(locations), 2), -1, dtype=np.int64)
        in_container = pc.match_substring(locations, "#").to_numpy(zero_copy_only=False)
        picks = np.flatnonzero(in_container)
        for k, location in zip(picks.tolist(), locations.take(pa.array(picks)).to_pylist(), strict=True):
            path, member = split_location(location)
            table = None if member is None else self._members(path)
            if table is not None and (span := table.get(member)) is not None:
                out[k] = span
        return out


def _build(manifest: Path, split: str, root: Path, folder: Path, meta: dict[str, Any]) -> None:
    """Write the index of ``split`` into a build folder, streamed row group by row group, then rename it to
    ``folder`` (atomic: a complete index or none; if another process got there first, its index is kept)."""
    tmp = folder.parent / f"{_BUILDING_PREFIX}{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        shards = _ShardSpans(root)
        rows = location_bytes = tar_members = 0
        with (tmp / _ROWS_FILE).open("wb") as rows_out, (tmp / _LOCATIONS_FILE).open("wb") as blob_out:
            for table in _split_tables(manifest, split):
                locations = table.column("location").combine_chunks().cast(pa.large_string())
                offsets = np.frombuffer(locations.buffers()[1], dtype=np.int64)
                offsets = offsets[locations.offset : locations.offset + len(locations) + 1]
                data = locations.buffers()[2]
                if data is not None:
                    blob_out.write(memoryview(data)[int(offsets[0]) : int(offsets[-1])])
                record = np.empty(len(locations), dtype=ROW_DTYPE)
                record["location_start"] = offsets[:-1] - offsets[0] + location_bytes
                record["location_length"] = np.diff(offsets)
                record["width"] = table.column("width").to_numpy()
                record["height"] = table.column("height").to_numpy()
                spans = shards.spans(locations)
                record["member_offset"], record["member_size"] = spans[:, 0], spans[:, 1]
                rows_out.write(record.tobytes())
                rows += len(record)
                tar_members += int((spans[:, 0] >= 0).sum())
                location_bytes += int(offsets[-1] - offsets[0])
        if shards.unreadable:
            log.warning(
                "row index of %s: %d shard(s) could not be read, their members are read by name later, e.g. %s",
                manifest,
                len(shards.unreadable),
                shards.unreadable[:3],
            )
        counts = {"rows": rows, "location_bytes": location_bytes, "tar_members": tar_members}
        (tmp / _META_FILE).write_text(json.dumps({**meta, **counts}, indent=1, sort_keys=True))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_complete(folder, meta):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _split_tables(manifest: Path, split: str) -> Iterator[pa.Table]:
    """The rows of ``split``, one row group at a time (never more of the file in memory)."""
    with pq.ParquetFile(manifest) as pf:
        for g in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(g, columns=_READ_COLUMNS)
            table = table.filter(pc.equal(table.column("split"), split))
            if table.num_rows:
                yield table


# ------------------------------------------------------------------------------------------------------- cache
def _is_complete(folder: Path, expected: dict[str, Any]) -> bool:
    try:
        meta = json.loads((folder / _META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return all(meta.get(k) == v for k, v in expected.items()) and "rows" in meta


def _writable_dir(folder: Path) -> Path:
    """``folder``, created; a temporary folder instead when it cannot be written (a read-only data mount)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / "eva_pipeline" / INDEX_DIRNAME
    log.warning("cannot write the row index next to the manifest (%s): using %s", folder, fallback)
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """An exclusive lock while one process builds (others wait, then find the index); no lock where the file
    system has none: then several build and the atomic rename keeps one index."""
    try:
        import fcntl

        handle = path.open("a+")
    except (ImportError, OSError):
        yield
        return
    with handle:
        with suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _prune(parent: Path, prefix: str, keep: str, identity: dict[str, Any]) -> None:
    """Remove the indices of this manifest and split built for another version of the file, and build folders
    abandoned by crashed builders."""
    now = time.time()
    for entry in parent.iterdir():
        name = entry.name
        if name.startswith(prefix) and name != keep and entry.is_dir():
            try:
                stale = json.loads((entry / _META_FILE).read_text()).get("manifest") != identity
            except (OSError, ValueError):
                stale = False  # being written or unreadable: left alone
            if stale:
                shutil.rmtree(entry, ignore_errors=True)
                (parent / f"{name}.lock").unlink(missing_ok=True)
        elif name.startswith(_BUILDING_PREFIX + prefix):
            try:
                if now - entry.stat().st_mtime > STALE_BUILD_SECONDS:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass
