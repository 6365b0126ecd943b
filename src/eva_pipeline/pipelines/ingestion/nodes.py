"""Thin nodes over ``eva_pipeline.data``."""

from __future__ import annotations

import pandas as pd

from eva_pipeline.config import IngestionParams
from eva_pipeline.data import SourceSpec
from eva_pipeline.data import build_manifest as _build_manifest


def build_manifest(params: IngestionParams) -> tuple[pd.DataFrame, dict]:
    """Index every configured source into one manifest; the report counts what was found, kept and rejected.

    Every rejected item (unreadable, corrupt, too small, ...) is listed with its reason in ``rejections_path``.
    With ``cache_dir`` a re-run reads only the files / shards that are new or changed since the last run.
    """
    specs = [
        SourceSpec(
            name=s.name, kind=s.kind, split=s.split, images=s.images, labels=s.labels, limit=s.limit, layout=s.layout
        )
        for s in params.sources
    ]
    return _build_manifest(specs, rejections_path=params.rejections_path, cache_dir=params.cache_dir)
