"""Ingestion: the manifest built from every source, de-duplicated, validated, reported.

Memory does not grow with the number of images (Merged-30M: 29.6M): :func:`write_manifest` keeps at most one
chunk (:data:`~eva_pipeline.ingest.scan.CHUNK_ROWS` items) of a source in Python lists and spills the rest to disk
(Arrow IPC for items, JSON lines for rejections, in a work folder next to the output), de-duplicates through a
sqlite table of content hashes (:class:`~eva_pipeline.ingest.scan.DiskSet`, bounded page cache), validates chunk
by chunk and writes the manifest to Parquet in row groups. :func:`build_manifest` is the same build returning a
DataFrame, for small manifests (tests, notebooks). Every unreadable item is recorded as a rejection with its
reason (:mod:`eva_pipeline.ingest.decode`), never dropped silently nor replaced by another image.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# Imported for its side effect: the image_folder, file_list and webdataset readers register their kinds.
from eva_pipeline.ingest import sources as _builtin_readers  # noqa: F401
from eva_pipeline.ingest.idx import EMBEDDED_DATA_DIR, read_idx
from eva_pipeline.ingest.scan import (
    CHUNK_ROWS,
    REPORT_EXAMPLES,
    DiskSet,
    SourceScan,
    SourceSpec,
    build_settings,
    register_source_kind,
    source_kinds,
    source_reader,
)
from eva_pipeline.ingest.scan_cache import UnitCache, cache_file, source_settings
from eva_pipeline.manifest import ROW_GROUP_ROWS, SPLITS, Manifest, manifest_file_schema

#: Owner codes of the seen-hash table: ``source index << CODE_SHIFT | item index``.
CODE_SHIFT = 40


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
            raise ValueError(f"IDX labels {spec.labels}: {raw.shape[0]} labels for {available} images in {spec.images}")
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
    if unknown := sorted({s.kind for s in specs} - set(source_kinds())):
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

    With ``cache_dir`` the scan is incremental (:mod:`eva_pipeline.ingest.scan_cache`): each unit of input (an image
    file, a shard, an IDX pair) whose path, size and mtime are unchanged is taken from the cache without being
    opened; the manifest and report are the same as without the cache, plus per source ``read`` / ``from_cache``
    (units) and ``removed_since_cache`` (cached units no longer present).

    Memory is flat in the number of images: at most ``chunk_rows`` (default :data:`CHUNK_ROWS`) items per source
    in Python lists, the rest spilled to a temporary work folder under ``work_dir`` (default: the folder of
    ``path``; it needs disk for about two copies of the manifest plus the hash table), removed at the end; the
    Parquet file is written in row groups of ``row_group_rows`` (default :data:`ROW_GROUP_ROWS`).
    """

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
        scans: list[SourceScan] = []
        with build_settings(work, chunk):
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
    reader = source_reader(spec.kind)
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
                    codes = range((k << CODE_SHIFT) + pos, (k << CODE_SHIFT) + pos + n)
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
    return f"{specs[code >> CODE_SHIFT].name}/{code & ((1 << CODE_SHIFT) - 1)}"


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
    return _WritePass(kept, split_items, split_labelled, split_sources, histograms, errors, writer.peak_rows)


def _write_rejections(path: Path, specs: Sequence[SourceSpec], scans: Sequence[SourceScan]) -> None:
    """Every rejection as one JSON line (written to a temporary file, then moved into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for spec, scan in zip(specs, scans, strict=True):
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
    for k, (spec, scan) in enumerate(zip(specs, scans, strict=True)):
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
