"""The write pass of a build: the kept items of every source -> the manifest's Parquet file, checked as they go.

Items are read back from each source's spilled scan in order, filtered by the keep mask of de-duplication
(:mod:`eva_pipeline.ingest.dedup`), given their ids (``"<source>/<item index>"``) and written in row groups of a
fixed size; the checks of :func:`~eva_pipeline.manifest.validate_manifest` (locations present and unique, width
and height positive, sizes not negative) and the per-split counts of the report are made chunk by chunk, so memory
stays flat.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from eva_pipeline.ingest.scan import SourceScan, SourceSpec
from eva_pipeline.ingest.spill import DiskSet
from eva_pipeline.manifest import SPLITS, manifest_file_schema


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
class WritePass:
    """What the write pass counted (per source and per split) and found wrong with the rows."""

    kept: list[int]
    split_items: Counter[str]
    split_labelled: Counter[str]
    split_sources: dict[str, set[str]]
    histograms: dict[str, Counter[int]]
    errors: list[str]
    peak_rows: int


def _count(mask: pa.Array) -> int:
    return int(pc.sum(mask).as_py() or 0)


def write_pass(
    specs: Sequence[SourceSpec], scans: Sequence[SourceScan], masks: Sequence[Path], out: Path, group: int, work: Path
) -> WritePass:
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
        for k, (spec, scan) in enumerate(zip(specs, scans, strict=True)):
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
    return WritePass(kept, split_items, split_labelled, split_sources, histograms, errors, writer.peak_rows)
