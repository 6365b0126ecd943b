"""A manifest on disk, read lazily: :class:`Manifest` is what the ``manifest`` catalog entry loads.

A Merged-30M manifest has 29.6M rows; no stage needs them all in one DataFrame. :class:`Manifest` keeps only the
path and the Parquet footer; :meth:`Manifest.split` materialises the rows of one split (what a stage consumes),
:meth:`Manifest.iter_batches` streams, :meth:`Manifest.digest` computes :func:`~eva_pipeline.data.manifest_digest`
of a split without loading it (the same value, so caches and DVC keyed on it do not change).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import weakref
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from eva_pipeline.data.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_SCHEMA,
    PIXEL_DIGEST_COLUMNS,
    REQUIRED_COLUMNS,
    ROW_GROUP_ROWS,
    SPLITS,
    manifest_file_schema,
)


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Manifest:
    """A manifest Parquet file (:data:`~eva_pipeline.data.MANIFEST_SCHEMA` columns, manifest row order).

    ``owned_dir``: a temporary folder holding the file (what an ingestion build returns); it is removed when the
    handle is collected, and :meth:`save` then moves the file instead of copying it.
    """

    def __init__(self, path: str | os.PathLike[str], *, owned_dir: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path)
        meta = pq.read_metadata(self.path)
        self.num_rows: int = meta.num_rows
        self.columns: tuple[str, ...] = tuple(meta.schema.to_arrow_schema().names)
        missing = [c for c in REQUIRED_COLUMNS if c not in self.columns]
        if missing:
            raise ValueError(
                f"{self.path}: not a manifest, missing columns {missing}; expected {list(MANIFEST_COLUMNS)}"
            )
        self._owned_dir = None if owned_dir is None else Path(owned_dir)
        self._finalizer = None if owned_dir is None else weakref.finalize(self, _rmtree, self._owned_dir)

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return f"Manifest({str(self.path)!r}, num_rows={self.num_rows})"

    # ------------------------------------------------------------------ reading
    def _row_groups(self, pf: pq.ParquetFile, split: str | None) -> list[int]:
        """Row groups that may hold ``split`` (by the column statistics: splits come in long runs)."""
        groups = list(range(pf.metadata.num_row_groups))
        if split is None:
            return groups
        col = self.columns.index("split")
        keep = []
        for g in groups:
            stats = pf.metadata.row_group(g).column(col).statistics
            if stats is not None and stats.has_min_max and not (stats.min <= split <= stats.max):
                continue
            keep.append(g)
        return keep

    def iter_tables(
        self, columns: Sequence[str] | None = None, split: str | None = None, batch_rows: int = ROW_GROUP_ROWS
    ) -> Iterator[pa.Table]:
        """Non-empty Arrow tables of at most ``batch_rows`` rows of ``split`` (all rows: None), in manifest order."""
        _check_split(split)
        cols = list(self.columns if columns is None else columns)
        if unknown := [c for c in cols if c not in self.columns]:
            raise KeyError(f"manifest {self.path} has no column(s) {unknown}; it has {list(self.columns)}")
        read = cols if split is None or "split" in cols else [*cols, "split"]
        with pq.ParquetFile(self.path) as pf:
            groups = self._row_groups(pf, split)
            if not groups:
                return
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=read):
                if split is not None:
                    batch = batch.filter(pc.equal(batch.column("split"), split))
                if batch.num_rows:
                    yield pa.Table.from_batches([batch]).select(cols)

    def iter_batches(
        self, columns: Sequence[str] | None = None, split: str | None = None, batch_rows: int = ROW_GROUP_ROWS
    ) -> Iterator[pd.DataFrame]:
        """DataFrames of at most ``batch_rows`` rows of ``split`` (all rows: None), manifest dtypes; the index
        continues across batches, so concatenating them gives :meth:`split` (or :meth:`to_pandas`)."""
        start = 0
        for table in self.iter_tables(columns, split, batch_rows):
            frame = _to_frame(table)
            frame.index = pd.RangeIndex(start, start + len(frame))
            start += len(frame)
            yield frame

    def _table(self, columns: Sequence[str] | None, split: str | None) -> pa.Table:
        cols = list(self.columns if columns is None else columns)
        tables = list(self.iter_tables(cols, split))
        if not tables:
            return manifest_file_schema(tuple(cols)).empty_table()
        return pa.concat_tables(tables)

    def split(self, name: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Rows of split ``name`` in manifest order with a fresh 0..n-1 index: what
        :func:`~eva_pipeline.data.select_split` gives on the whole DataFrame (same dtypes)."""
        if name is None:
            raise ValueError(f"split must be one of {SPLITS}, got None")
        _check_split(name)
        return _to_frame(self._table(columns, name))

    def to_pandas(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Every row in one DataFrame (small manifests only)."""
        return _to_frame(self._table(columns, None))

    def count(self, split: str | None = None) -> int:
        """Rows of ``split`` (all rows: None)."""
        if split is None:
            return self.num_rows
        return sum(t.num_rows for t in self.iter_tables(["split"], split))

    def digest(
        self,
        split: str | None = None,
        columns: Sequence[str] = PIXEL_DIGEST_COLUMNS,
        batch_rows: int = ROW_GROUP_ROWS,
    ) -> str:
        """:func:`~eva_pipeline.data.manifest_digest` of the rows of ``split`` (all rows: None), streamed: one pass
        per column, one batch in memory. Equal to ``manifest_digest(select_split(df, split), columns)``."""
        _check_split(split)
        cols = [c for c in columns if c in self.columns]
        h = hashlib.sha256()
        h.update(("\x1f".join(cols) + f"\x1e{self.count(split)}\x1e").encode())
        for col in cols:
            first = True
            for table in self.iter_tables([col], split, batch_rows):
                text = "\x1f".join("\x00" if v is None else str(v) for v in table.column(col).to_pylist())
                h.update((text if first else "\x1f" + text).encode())
                first = False
            h.update(b"\x1e")
        return h.hexdigest()

    # ------------------------------------------------------------------ writing
    def save(self, path: str | os.PathLike[str]) -> Manifest:
        """Put this manifest at ``path`` (atomically): moved when the handle owns a temporary file, else copied.
        Returns ``self``, now pointing at ``path``."""
        target = Path(path)
        if target.exists() and self.path.exists() and os.path.samefile(target, self.path):
            return self
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            if self._owned_dir is not None:
                shutil.move(self.path, tmp)
            else:
                shutil.copyfile(self.path, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        self.path = target
        if self._finalizer is not None:
            self._finalizer()  # the temporary folder is no longer needed
            self._finalizer, self._owned_dir = None, None
        return self


def _to_frame(table: pa.Table) -> pd.DataFrame:
    """Arrow -> pandas with the manifest's dtypes (pandas metadata for exactly the table's columns)."""
    schema = manifest_file_schema(tuple(table.column_names))
    return table.replace_schema_metadata(schema.metadata).to_pandas()


def write_frame(df: pd.DataFrame, path: str | os.PathLike[str], row_group_rows: int = ROW_GROUP_ROWS) -> Manifest:
    """Write a manifest DataFrame (its manifest columns, in schema order) to ``path`` atomically; -> handle."""
    cols = tuple(c for c in MANIFEST_COLUMNS if c in df.columns)
    schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in cols])
    table = pa.Table.from_pandas(df[list(cols)], schema=schema, preserve_index=False)
    table = table.replace_schema_metadata(manifest_file_schema(cols).metadata)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, row_group_size=row_group_rows)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return Manifest(target)
