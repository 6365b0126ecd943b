"""The manifest: the torch-free contract between stages, one row per image, whatever container it lives in.

Every stage after ingestion (teacher targets, pre-training, probing) reads images only through the manifest, so the
schema is written for large sources too: ``location`` is a plain file path, ``"path#index"`` for an item of an
array container (IDX), or ``"shard.tar#member"``. The ``split`` column says which stage may read an image
(:data:`SPLITS`) and keeps the held-out ones (:data:`HELD_OUT_SPLITS`) out of training; ``content_hash`` lets
ingestion keep the same image out of both. This module holds the schema, its validation,
split selection, the pixel digest that keys caches, and :class:`Manifest`, the lazy handle of a manifest Parquet
file that the ``manifest`` catalog entry loads (a Merged-30M manifest has 29.6M rows; no stage needs them all in
one DataFrame). Ingestion (:mod:`eva_pipeline.ingest`) writes it; the loader and the stages read it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import weakref
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from eva_pipeline.fileio import replace_atomically

#: What images are for: ``pretrain`` (pre-training; labels unused), ``finetune`` (the labelled images fine-tuning
#: trains on; never pre-training), ``probe`` (the linear probe and the validation MIM loss) and ``eval`` (only
#: evaluation reads them).
SPLITS: tuple[str, ...] = ("pretrain", "finetune", "probe", "eval")
#: Splits never trained on: their sources claim their images first at de-duplication, and no row of another split
#: may have a held-out row's content (the leak check).
HELD_OUT_SPLITS: tuple[str, ...] = ("probe", "eval")

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
#: Rows per row group of the manifest Parquet file (Arrow-side buffer of the writer).
ROW_GROUP_ROWS: int = 65_536


@cache
def manifest_file_schema(columns: tuple[str, ...] = MANIFEST_COLUMNS) -> pa.Schema:
    """:data:`MANIFEST_SCHEMA` (restricted to ``columns``) plus pandas metadata, so that ``pd.read_parquet`` and
    ``Table.to_pandas`` give the manifest's dtypes (:data:`MANIFEST_DTYPES`: ``label`` Int64 even with nulls)."""
    schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
    empty = pd.DataFrame({c: pd.Series([], dtype=MANIFEST_DTYPES[c]) for c in columns})
    meta = pa.Table.from_pandas(empty, schema=schema, preserve_index=False).schema.metadata
    return schema.with_metadata(meta)


def held_out_leak_error(leaked: Mapping[str, int]) -> str | None:
    """The leak check's message for ``{training split: rows whose content is a held-out row's}``; None: no leak.

    One wording for :func:`validate_manifest` and ingestion's de-duplication pass, which count the same thing."""
    counts = [f"{leaked[split]} {split}" for split in SPLITS if leaked.get(split)]
    if not counts:
        return None
    held_out = " or ".join(HELD_OUT_SPLITS)
    return f"{' and '.join(counts)} image(s) are also held-out images ({held_out}; same content_hash)"


def validate_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Check columns, dtypes, unique ids and locations, split values and held-out leakage; returns ``df``.

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
        held_out = hashes["split"].isin(HELD_OUT_SPLITS)
        leaked = hashes.loc[~held_out & hashes["content_hash"].isin(set(hashes.loc[held_out, "content_hash"]))]
        if message := held_out_leak_error(leaked["split"].value_counts().to_dict()):
            errors.append(message)
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


# ---------------------------------------------------------------------------------------------------- file handle
def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Manifest:
    """A manifest Parquet file (:data:`~eva_pipeline.manifest.MANIFEST_SCHEMA` columns, manifest row order).

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
        :func:`~eva_pipeline.manifest.select_split` gives on the whole DataFrame (same dtypes)."""
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
        """:func:`~eva_pipeline.manifest.manifest_digest` of the rows of ``split`` (all rows: None), streamed: one pass
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
        place = shutil.move if self._owned_dir is not None else shutil.copyfile
        replace_atomically(target, lambda tmp: place(self.path, tmp))
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
    target = replace_atomically(path, lambda tmp: pq.write_table(table, tmp, row_group_size=row_group_rows))
    return Manifest(target)
