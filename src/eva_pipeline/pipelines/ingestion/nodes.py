"""Thin nodes over ``eva_pipeline.data``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from eva_pipeline.config import IngestionParams
from eva_pipeline.data import Manifest, SourceSpec, write_manifest


def build_manifest(params: IngestionParams) -> tuple[Manifest, dict]:
    """Index every configured source into one manifest; the report counts what was found, kept and rejected.

    Every rejected item (unreadable, corrupt, too small, ...) is listed with its reason in ``rejections_path``.
    With ``cache_dir`` a re-run reads only the files / shards that are new or changed since the last run.

    The manifest is written in row groups to a temporary Parquet file (next to ``cache_dir`` when set, so on the
    data disk; else in the system temp folder) and returned as a :class:`~eva_pipeline.data.Manifest` handle that
    owns it: the ``manifest`` dataset (``eva_pipeline.datasets.ManifestDataset``) moves the file into place.
    Memory does not grow with the number of images.
    """
    specs = [
        SourceSpec(
            name=s.name,
            kind=s.kind,
            split=s.split,
            images=s.images,
            labels=s.labels,
            limit=s.limit,
            layout=s.layout,
            decode_workers=params.decode_workers,
        )
        for s in params.sources
    ]
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
