"""The write pass of a build: the kept items of every source -> the manifest's Parquet file, checked as they go.

Items are read back from each source's spilled scan in order, filtered by the keep mask of de-duplication
(:mod:`eva_pipeline.ingest.dedup`), given their ids (``"<source>/<item index>"``) and written in row groups of a
fixed size; the checks of :func:`~eva_pipeline.manifest.validate_manifest` (locations present and unique, width
and height positive, sizes not negative) and the per-split counts of the report are made chunk by chunk, so memory
stays flat.

Class names: every labelled source gets its class names in label order (what fine-tuning combines sources by):
its ``classes``, else those its reader found (``info["classes"]``: an image folder's sorted class folders), else
``"0"``, ``"1"``, ... up to its largest label. A label is an index into them, so a negative label or one past the
last name is an error of the build (not a rejection: the labels or the configured names are wrong as a whole, and
training on the items that happen to fit would hide it); the labels of every accepted item count, kept or not.
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

#: The most class names a labelled source without ``classes`` gets ("0".."n-1"): a larger label is taken for a
#: broken label rather than a class, and such a source must name its classes.
MAX_DEFAULT_CLASSES: int = 1_000_000
#: How many items with a label outside the class names an error lists.
_LABEL_EXAMPLES = 5


class _SourceLabels:
    """The labels of one source's accepted items: how many, the largest, those outside its class names; and
    from them the source's class names (:meth:`class_names`)."""

    def __init__(self, spec: SourceSpec, scan: SourceScan) -> None:
        self.spec = spec
        found = scan.info.get("classes")
        self.found = None if found is None else [str(c) for c in found]
        named = spec.classes if spec.classes is not None else self.found
        self.limit = MAX_DEFAULT_CLASSES if named is None else len(named)
        self.labelled = 0
        self.largest = -1
        self.outside = 0
        self.examples: list[str] = []

    def see(self, batch: pa.RecordBatch) -> None:
        labels = batch.column("label")
        n = len(labels) - labels.null_count
        if not n:
            return
        self.labelled += n
        self.largest = max(self.largest, int(pc.max(labels).as_py()))
        outside = pc.or_(pc.less(labels, 0), pc.greater_equal(labels, self.limit))
        if count := _count(outside):
            self.outside += count
            room = _LABEL_EXAMPLES - len(self.examples)
            rows = np.flatnonzero(outside.fill_null(False).to_numpy(zero_copy_only=False))[: max(room, 0)]
            locations = batch.column("location")
            self.examples += [f"{locations[i].as_py()} (label {labels[i].as_py()})" for i in rows.tolist()]

    def class_names(self) -> tuple[list[str] | None, str | None]:
        """(the class names in label order or None for an unlabelled source, the error or None)."""
        name = f"source {self.spec.name!r}"
        if self.spec.classes is not None and self.found is not None:
            return None, f"{name}: its reader names the classes itself ({len(self.found)}); remove 'classes'"
        if self.outside:
            if self.spec.classes is not None or self.found is not None:
                what = f"its {self.limit} class names (labels 0..{self.limit - 1})"
                fix = "check its 'classes' against the labels" if self.spec.classes is not None else "check the labels"
            else:
                what = f"0..{MAX_DEFAULT_CLASSES - 1:,}"
                fix = f"a label is a class index (>= 0); more than {MAX_DEFAULT_CLASSES:,} classes need 'classes'"
            return None, f"{name}: {self.outside} item(s) have a label outside {what}, e.g. {self.examples}; {fix}"
        if self.spec.classes is not None:
            if not self.labelled:
                return None, f"{name}: 'classes' names {len(self.spec.classes)} classes but no item has a label"
            return list(self.spec.classes), None
        if self.found is not None:
            return list(self.found), None
        return ([str(i) for i in range(self.largest + 1)] if self.labelled else None), None


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
    classes: list[list[str] | None]  # per source: class names in label order; None: unlabelled
    errors: list[str]
    peak_rows: int


def _count(mask: pa.Array) -> int:
    return int(pc.sum(mask).as_py() or 0)


def write_pass(
    specs: Sequence[SourceSpec], scans: Sequence[SourceScan], masks: Sequence[Path], out: Path, group: int, work: Path
) -> WritePass:
    """Write the kept items in source order, in row groups of ``group`` rows, checking them as they go.

    Ids are ``"<source>/<item index>"``: unique because source names are unique and an index has no ``/``.
    Locations are checked for uniqueness through a sqlite table on disk, labels against the class names.
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
    source_labels = [_SourceLabels(spec, scan) for spec, scan in zip(specs, scans, strict=True)]
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
                    source_labels[k].see(batch)
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
    classes = []
    for labels in source_labels:
        names, error = labels.class_names()
        classes.append(names)
        errors += [error] if error else []
    return WritePass(kept, split_items, split_labelled, split_sources, histograms, classes, errors, writer.peak_rows)
