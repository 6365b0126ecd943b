"""Thin node over the teacher and the target store."""

from __future__ import annotations

import pandas as pd

from eva_pipeline.config import PretrainParams, TeacherTargetsParams
from eva_pipeline.data import compute_targets, load_images, manifest_digest, to_model_input
from eva_pipeline.pipelines.common import build_teacher, split_rows, student_config


def compute_teacher_targets(manifest: pd.DataFrame, params: TeacherTargetsParams, pretrain: PretrainParams) -> dict:
    """Run the teacher over the pre-training images once; a re-run with the same inputs and teacher reuses them."""
    config = student_config(pretrain.model)  # targets are made on the student's grid and input size
    grid = (config.grid_size, config.grid_size)
    rows = split_rows(manifest, "pretrain")
    receipt = {
        "mode": params.mode,
        "teacher": params.teacher.model_dump(mode="json"),
        "num_items": len(rows),
        "grid": list(grid),
        "img_size": config.img_size,
        "manifest_digest": manifest_digest(rows),
    }
    if params.mode == "online":
        return receipt  # the training node runs the teacher on every batch instead
    teacher = build_teacher(params.teacher, params.device)
    images = load_images(rows)
    fingerprint = {k: receipt[k] for k in ("teacher", "num_items", "grid", "img_size", "manifest_digest")}
    store = compute_targets(
        params.output_dir,
        fingerprint,
        num_items=len(rows),
        batch_fn=lambda start, stop: to_model_input(images[start:stop], config.img_size),
        teacher_fn=lambda x: teacher.targets(x, grid),
        shard_size=params.shard_size,
        batch_size=params.batch_size,
    )
    return {**receipt, "store": str(store), "target_dim": teacher.target_dim}
