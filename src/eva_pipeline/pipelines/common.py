"""Helpers shared by several pipelines' nodes (the one place that decides which rows a split is, in which order)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from eva_pipeline.config import ModelParams, TeacherParams
from eva_pipeline.loader.rows import FrameRows, ParquetRows
from eva_pipeline.manifest import SPLITS, Manifest, manifest_digest, select_split
from eva_pipeline.models import EvaConfig, get_config
from eva_pipeline.runtime.device import resolve_device
from eva_pipeline.teachers import Teacher, create_teacher


def split_rows(manifest: Manifest | pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of ``split`` in manifest order (row ``i`` is sample index ``i`` downstream); none is a config error.

    ``manifest``: the lazy handle the ``manifest`` dataset loads (only that split is read) or a whole DataFrame.
    """
    rows = select_split(manifest, split) if isinstance(manifest, pd.DataFrame) else manifest.split(split)
    if rows.empty:
        raise ValueError(f"the manifest has no '{split}' images; check the ingestion sources in conf/")
    return rows


def split_source(manifest: Manifest | pd.DataFrame, split: str) -> FrameRows | ParquetRows:
    """Row access to ``split`` for the streaming loader: read from the manifest file row group by row group (no
    listing in memory), or from an in-memory frame."""
    if isinstance(manifest, pd.DataFrame):
        return FrameRows(split_rows(manifest, split))
    rows = ParquetRows(manifest.path, split)
    if len(rows) == 0:
        raise ValueError(f"the manifest has no '{split}' images; check the ingestion sources in conf/")
    return rows


def split_digest(manifest: Manifest | pd.DataFrame, split: str) -> str:
    """``manifest_digest`` of the split's rows (streamed from the file for a Manifest handle)."""
    if isinstance(manifest, pd.DataFrame):
        return manifest_digest(split_rows(manifest, split))
    return manifest.digest(split)


def manifest_file(manifest: Manifest | pd.DataFrame, split: str, fallback: Path) -> str:
    """A Parquet path whose ``split`` rows are the samples, for worker processes: the manifest's own file, or
    ``fallback`` written from an in-memory frame."""
    if not isinstance(manifest, pd.DataFrame):
        return str(manifest.path)
    fallback.parent.mkdir(parents=True, exist_ok=True)
    split_rows(manifest, split).to_parquet(fallback)
    return str(fallback)


def student_config(model: ModelParams, target_dim: int | None = None) -> EvaConfig:
    """The student's EvaConfig; ``target_dim`` (the teacher's feature width) sizes lm_head."""
    overrides = dict(model.overrides)
    if target_dim is not None:
        overrides["target_dim"] = target_dim
    return get_config(model.name, **overrides)


def build_teacher(teacher: TeacherParams, device: str = "auto") -> Teacher:
    """The configured teacher on ``device`` (``auto``: the GPU when there is one)."""
    return create_teacher(teacher.kind, **{"device": str(resolve_device(device)), **teacher.options})


def source_rows(manifest: Manifest | pd.DataFrame, sources: Sequence[str]) -> pd.DataFrame:
    """The rows of ``sources`` (any split), source by source in the order given, each in manifest order, with a
    fresh 0..n-1 index; a source with no row is a config error naming the sources the manifest has."""
    frames, seen = [], set()
    for split in SPLITS:
        try:
            rows = split_rows(manifest, split)
        except ValueError:  # a split no source feeds
            continue
        seen.update(rows["source"].unique().tolist())
        frames.append(rows[rows["source"].isin(sources)])
    missing = [s for s in sources if s not in seen]
    if missing:
        raise ValueError(f"the manifest has no images of source(s) {missing}; its sources: {sorted(seen)} (conf/)")
    merged = pd.concat(frames, ignore_index=True)
    order = {name: i for i, name in enumerate(sources)}
    return merged.sort_values("source", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
