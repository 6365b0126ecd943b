"""Thin node over the teacher-target extraction (``eva_pipeline.targets.extract``) and the target store.

The node writes the shards into the store folder it is given (the ``teacher_targets_store`` dataset: resumable, so
written in place) and returns the receipt; the ``teacher_targets`` dataset writes the receipt into the same folder
once it has checked that the stores are complete (``eva_pipeline.datasets.TeacherTargetsDataset``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from eva_pipeline.config import PretrainParams, TeacherTargetsParams
from eva_pipeline.datasets import VALIDATION_STORE
from eva_pipeline.manifest import Manifest
from eva_pipeline.pipelines.common import manifest_file, split_digest, split_source, student_config
from eva_pipeline.runtime.launch import launch
from eva_pipeline.targets.extract import ExtractSpec, extract
from eva_pipeline.targets.layout import TargetStoreError
from eva_pipeline.targets.store import TargetStore
from eva_pipeline.teachers import teacher_target_dim

EXTRACT_MODULE = "eva_pipeline.targets.extract"


def compute_teacher_targets(
    manifest: Manifest | pd.DataFrame, store: Path, params: TeacherTargetsParams, student: PretrainParams
) -> dict:
    """Run the teacher over the pre-training images once (K views each, or the whole image) into the store folder
    ``store``; a re-run with the same inputs, views and teacher reuses them, an interrupted one computes only the
    missing shards. With ``world_size > 1`` one rank per GPU computes its share of the shards. The held-out
    validation images' targets are stored too (sub-folder ``validation``), in either mode (the validation MIM loss
    compares the student with them). ``student``: the resolved student config (``student_config``): the targets are
    made on its grid and input size, views with its seed and augmentation. Returns the receipt: what the targets
    are of and the stores' fingerprints."""
    store = Path(store)
    config = student_config(student.model)  # targets are made on the student's grid and input size
    rows = split_source(manifest, "pretrain")  # streamed: the listing is never held in memory
    views = params.views_per_image
    receipt = {
        "mode": params.mode,
        "teacher": params.teacher.model_dump(mode="json"),
        "num_items": len(rows),
        "grid": [config.grid_size, config.grid_size],
        "img_size": config.img_size,
        "manifest_digest": split_digest(manifest, "pretrain"),
        "views_per_image": views,
    }
    receipt["validation"] = _validation_targets(manifest, store / VALIDATION_STORE, params, config)
    if params.mode == "online":  # the training node runs the teacher on every batch instead
        return {**receipt, "target_dim": teacher_target_dim(params.teacher.kind, **params.teacher.options)}
    fingerprint = {k: receipt[k] for k in ("teacher", "num_items", "grid", "img_size", "manifest_digest")}
    if views:  # the crops depend on these: a change recomputes the store
        fingerprint["views"] = {"k": views, "seed": student.seed, **student.augmentation.model_dump(mode="json")}
    run_dir = store.parent / f".{store.name}_launch"
    spec = ExtractSpec(
        manifest="",  # set below for ranks
        store=str(store),
        fingerprint=fingerprint,
        teacher=params.teacher.model_dump(mode="json"),
        device=params.device,
        img_size=config.img_size,
        grid=config.grid_size,
        views_per_item=views,
        augmentation=student.augmentation.model_dump(mode="json"),
        seed=student.seed,
        shard_size=params.shard_size,
        batch_size=params.batch_size,
    )
    if params.world_size == 1:
        extract(spec, rows=rows)
    else:
        spec = replace(spec, manifest=manifest_file(manifest, "pretrain", run_dir / "pretrain_rows.parquet"))
        launch(params, spec.write(run_dir / "run.json"), run_dir / "ranks.log", module=EXTRACT_MODULE)
    if not TargetStore(store).is_complete(fingerprint):
        raise TargetStoreError(f"teacher-target extraction ended but the store {store} is incomplete")
    reader = TargetStore(store).reader(fingerprint)
    return {**receipt, "fingerprint": fingerprint, "target_dim": int(reader.shape[-1])}


def _validation_targets(
    manifest: Manifest | pd.DataFrame, store: Path, params: TeacherTargetsParams, config
) -> dict | None:
    """The validation set's targets (whole images of the held-out split, in-process) in ``store``; None when
    disabled."""
    wanted = params.validation
    if wanted.num_images == 0:
        return None
    try:
        rows = split_source(manifest, wanted.split)
    except ValueError:
        raise ValueError(
            f"teacher_targets.validation asks for {wanted.num_images} held-out '{wanted.split}' images but the "
            f"manifest has none: add a '{wanted.split}' source to the ingestion, or set "
            "teacher_targets.validation.num_images: 0 to train without the validation loss"
        ) from None
    num_images = min(wanted.num_images, len(rows))
    fingerprint = {
        "teacher": params.teacher.model_dump(mode="json"),
        "split": wanted.split,
        "num_images": num_images,
        "grid": [config.grid_size, config.grid_size],
        "img_size": config.img_size,
        "manifest_digest": split_digest(manifest, wanted.split),
    }
    spec = ExtractSpec(
        manifest="",
        store=str(store),
        fingerprint=fingerprint,
        teacher=params.teacher.model_dump(mode="json"),
        device=params.device,
        img_size=config.img_size,
        grid=config.grid_size,
        views_per_item=0,
        augmentation={},
        seed=0,
        shard_size=params.shard_size,
        batch_size=params.batch_size,
        split=wanted.split,
        num_images=num_images,
    )
    extract(spec, rows=rows)
    if not TargetStore(store).is_complete(fingerprint):
        raise TargetStoreError(f"validation-target extraction ended but the store {store} is incomplete")
    return {"split": wanted.split, "num_images": num_images, "fingerprint": fingerprint}
