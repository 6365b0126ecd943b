"""Thin nodes over ``eva_pipeline.ingest``."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from eva_pipeline.config import IngestionParams
from eva_pipeline.ingest.build import write_manifest
from eva_pipeline.ingest.scan import SourceSpec
from eva_pipeline.manifest import Manifest


def build_manifest(params: IngestionParams) -> tuple[Manifest, dict]:
    """Index every configured source into one manifest; the report counts what was found, kept and rejected.

    Every rejected item (unreadable, corrupt, too small, ...) is listed with its reason in ``rejections_path``.
    With ``cache_dir`` a re-run reads only the files / shards that are new or changed since the last run.

    The manifest is written in row groups to a temporary Parquet file (next to ``cache_dir`` when set, so on the
    data disk; else in the system temp folder) and returned as a :class:`~eva_pipeline.manifest.Manifest` handle that
    owns it: the ``manifest`` dataset (``eva_pipeline.datasets.ManifestDataset``) moves the file into place.
    Memory does not grow with the number of images.
    """
    specs = [SourceSpec(**s.model_dump(), decode_workers=params.decode_workers) for s in params.sources]
    work_root = None if params.cache_dir is None else Path(params.cache_dir).parent
    if work_root is not None:
        work_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".manifest-", dir=work_root))
    try:
        built, report = write_manifest(
            specs, tmp / "manifest.parquet", rejections_path=params.rejections_path, cache_dir=params.cache_dir
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Manifest(built.path, owned_dir=tmp), report


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
    """The table's counts as MLflow metrics (``ingestion.<source>.<count>``, kedro-mlflow's format), comparable
    across runs; characters MLflow does not allow in a metric name become ``_``."""
    return {
        f"{re.sub(r'[^A-Za-z0-9_./ -]', '_', str(row.source))}.{k}": {"value": float(getattr(row, k)), "step": 0}
        for row in table.itertuples()
        for k in ("found", "kept", "duplicates", "rejected")
    }
