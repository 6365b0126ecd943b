"""Helpers shared by several pipelines' nodes (the one place that decides which rows a split is, in which order)."""

from __future__ import annotations

import pandas as pd

from eva_pipeline.config import ModelParams, TeacherParams
from eva_pipeline.data import select_split
from eva_pipeline.models import EvaConfig, get_config
from eva_pipeline.teachers import Teacher, create_teacher
from eva_pipeline.training.engine import resolve_device


def split_rows(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of ``split`` in manifest order (row ``i`` is sample index ``i`` downstream); none is a config error."""
    rows = select_split(manifest, split)
    if rows.empty:
        raise ValueError(f"the manifest has no '{split}' images; check the ingestion sources in conf/")
    return rows


def student_config(model: ModelParams, target_dim: int | None = None) -> EvaConfig:
    """The student's EvaConfig; ``target_dim`` (the teacher's feature width) sizes lm_head."""
    overrides = dict(model.overrides)
    if target_dim is not None:
        overrides["target_dim"] = target_dim
    return get_config(model.name, **overrides)


def build_teacher(teacher: TeacherParams, device: str = "auto") -> Teacher:
    """The configured teacher on ``device`` (``auto``: the GPU when there is one)."""
    return create_teacher(teacher.kind, **{"device": str(resolve_device(device)), **teacher.options})
