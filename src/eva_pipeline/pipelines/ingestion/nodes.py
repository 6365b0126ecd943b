"""Thin nodes over ``eva_pipeline.ingest``."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from eva_pipeline.config import IngestionParams
from eva_pipeline.ingest.build import write_manifest
from eva_pipeline.ingest.scan import SourceSpec
from eva_pipeline.manifest import Manifest


def build_manifest(params: IngestionParams, scan_cache: Path) -> tuple[Manifest, dict, Path]:
    """Index every configured source into one manifest; the report counts what was found, kept and rejected, and
    every item not kept (unreadable, corrupt, too small, ..., or a duplicate: with its kept copy) is listed with its
    reason in a JSON-lines file. Label conflicts among the duplicates are logged once as a warning.

    ``scan_cache``: the folder of the incremental scan cache (``ingestion_scan_cache``), updated in place: a re-run
    reads only the files / shards that are new or changed since the last run.

    The manifest is written in row groups to a temporary Parquet file and the rejections to a temporary file, both
    next to the scan cache (on the data disk); the manifest returns as a :class:`~eva_pipeline.manifest.Manifest`
    handle that owns its file, the rejections as the file's path, and their datasets (``manifest``,
    ``ingestion_rejections``) move them into place. Memory does not grow with the number of images.
    """
    specs = [SourceSpec(**s.model_dump(), decode_workers=params.decode_workers) for s in params.sources]
    work_root = Path(scan_cache).parent
    work_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".manifest-", dir=work_root))
    handle, name = tempfile.mkstemp(prefix=".rejections-", suffix=".jsonl", dir=work_root)
    os.close(handle)
    rejections = Path(name)
    try:
        built, report = write_manifest(
            specs,
            tmp / "manifest.parquet",
            rejections_path=rejections,
            cache_dir=scan_cache,
            rejections_name="the ingestion_rejections dataset (rejections.jsonl beside the ingestion report)",
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        rejections.unlink(missing_ok=True)
        raise
    report.pop("rejections_file", None)  # a temporary path: the listing is the ingestion_rejections dataset
    return Manifest(built.path, owned_dir=tmp), report, rejections


def class_names(report: dict) -> dict[str, list[str]]:
    """``{source: [class names in label order]}`` of every labelled source, as the build named them (given, an
    image folder's class folders, or "0", "1", ...): fine-tuning combines sources by class name, not by label."""
    return {name: list(entry["classes"]) for name, entry in report["sources"].items() if entry.get("classes")}


SOURCE_TABLE_COLUMNS: tuple[str, ...] = (
    "source", "kind", "split", "images", "available", "found", "kept", "duplicates", "rejected", "share_of_kept",
)  # fmt: skip


def source_table(report: dict) -> pd.DataFrame:
    """One row per source: images found / kept / duplicate / rejected and its share of the kept images, plus a
    total row: the composition of the merged data set (e.g. Merged-30M's), reproducible from the report alone."""
    rows = [
        {"source": name, **{k: entry.get(k) for k in ("kind", "split", "images", "available", "found", "kept",
                                                       "duplicates", "rejected")}}
        for name, entry in report["sources"].items()
    ]  # fmt: skip
    table = pd.DataFrame(rows, columns=list(SOURCE_TABLE_COLUMNS[:-1]))
    kept = int(table["kept"].sum())
    table["share_of_kept"] = (table["kept"] / kept).round(6) if kept else 0.0
    total = {"source": "total", "kind": "", "split": "", "images": "", "share_of_kept": 1.0 if kept else 0.0}
    total.update({k: int(table[k].sum()) for k in ("available", "found", "kept", "duplicates", "rejected")})
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)


def source_metrics(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """The table's counts as MLflow metrics (``ingestion/<source>/<count>``, kedro-mlflow's format), comparable
    across runs; characters MLflow does not allow in a metric name, and ``/`` (the separator), become ``_``."""
    return {
        f"{re.sub(r'[^A-Za-z0-9_. -]', '_', str(row.source))}/{k}": {"value": float(getattr(row, k)), "step": 0}
        for row in table.itertuples()
        for k in ("found", "kept", "duplicates", "rejected")
    }
