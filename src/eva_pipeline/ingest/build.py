"""Ingestion: the manifest built from every source, de-duplicated, validated, reported; the steps in order.

:func:`write_manifest` checks the specs, scans every source with its reader (:mod:`eva_pipeline.ingest.readers`,
through the scan cache :mod:`eva_pipeline.ingest.scan_cache`), de-duplicates (:mod:`eva_pipeline.ingest.dedup`),
writes and validates the rows (:mod:`eva_pipeline.ingest.write`) and reports (:mod:`eva_pipeline.ingest.report`).

Memory does not grow with the number of images (Merged-30M: 29.6M): :func:`write_manifest` keeps at most one
chunk (:data:`~eva_pipeline.ingest.spill.CHUNK_ROWS` items) of a source in Python lists and spills the rest to disk
(Arrow IPC for items, JSON lines for rejections, in a work folder next to the output), de-duplicates through a
sqlite table of content hashes (:class:`~eva_pipeline.ingest.spill.DiskSet`, bounded page cache), validates chunk
by chunk and writes the manifest to Parquet in row groups. :func:`build_manifest` is the same build returning a
DataFrame, for small manifests (tests, notebooks). Every unreadable item is recorded as a rejection with its
reason (:mod:`eva_pipeline.ingest.decode`), never dropped silently nor replaced by another image; every duplicate
is listed with its kept copy.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

# Imported for its side effect: every built-in reader registers its source kind.
from eva_pipeline.ingest import readers as _builtin_readers  # noqa: F401
from eva_pipeline.ingest.dedup import dedup_pass
from eva_pipeline.ingest.readers.idx import EMBEDDED_DATA_DIR
from eva_pipeline.ingest.report import ingestion_report, write_rejections
from eva_pipeline.ingest.scan import SourceScan, SourceSpec, source_kinds, source_reader
from eva_pipeline.ingest.scan_cache import UnitCache, cache_file, source_settings
from eva_pipeline.ingest.spill import CHUNK_ROWS, build_settings
from eva_pipeline.ingest.write import write_pass
from eva_pipeline.manifest import ROW_GROUP_ROWS, Manifest

log = logging.getLogger(__name__)


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
    rejections_name: str | None = None,
) -> tuple[Manifest, dict[str, Any]]:
    """Scan every source, write the manifest to Parquet at ``path`` and return ``(Manifest handle, report)``.

    Raises before ``path`` is written (or replaced) if a source is bad or the manifest would be invalid (the
    checks of :func:`validate_manifest`, done chunk by chunk). With ``dedup`` an item whose content hash was
    already kept is dropped and counted. Held-out sources (split probe or eval) are de-duplicated first, so an
    image present in a held-out and a training split stays held out and is never trained on; without ``dedup``
    such an image is an error. ``report`` is JSON-ready: per source found / kept /
    rejected / duplicates (found == kept + rejected + duplicates), totals, per-split counts and the label
    histogram of each split (:mod:`eva_pipeline.ingest.report`). Each source lists its first
    :data:`~eva_pipeline.ingest.scan.REPORT_EXAMPLES` rejections and the count of every rejection reason; with
    ``rejections_path`` every rejection of every source is also written there as JSON lines (``source``,
    ``location``, ``reason``, ``detail``), followed by its duplicates (reason ``duplicate``, with the kept copy's
    location ``duplicate_of`` and both labels), and the report names the file. Nothing in either depends on the run
    (no memory address in a detail). A duplicate whose kept copy has another class is a label conflict: counted per
    source (``label_conflicts``), listed, and logged once as a warning naming the rejections list
    (``rejections_name``, default ``rejections_path``).

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
                deduped = dedup_pass(specs, scans, dedup, work)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                try:
                    written = write_pass(specs, scans, deduped.masks, tmp, group, work)
                    errors = written.errors + deduped.errors
                    if errors:
                        raise ValueError("invalid manifest:\n  - " + "\n  - ".join(errors))
                    report = ingestion_report(specs, scans, dedup, deduped, written, cache_reports)
                    if rejections_path is not None:
                        write_rejections(Path(rejections_path), specs, scans, deduped, written)
                        report["rejections_file"] = str(rejections_path)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
                    deduped.close()
            finally:
                for scan in scans:
                    scan.close()
    where = rejections_name or (None if rejections_path is None else str(rejections_path))
    for warning in report["warnings"]:  # logged once per build, with where the list is
        log.warning("ingestion: %s%s", warning, "" if where is None else f"; the rejections list: {where}")
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
