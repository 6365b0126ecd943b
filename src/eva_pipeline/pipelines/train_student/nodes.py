"""Thin nodes over ``eva_pipeline.training``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import Tensor, nn

from eva_pipeline.config import PretrainParams, TeacherTargetsParams
from eva_pipeline.datasets import TeacherTargets
from eva_pipeline.evaluation import loss_curve, mask_overview
from eva_pipeline.loader.batches import BatchPlan, PretrainBatches
from eva_pipeline.loader.pixels import ManifestPixels
from eva_pipeline.manifest import Manifest
from eva_pipeline.models import EvaMIM, load_official_checkpoint
from eva_pipeline.pipelines.common import build_teacher, manifest_file, split_source, student_config
from eva_pipeline.preflight import check_augmentation, raise_if_problems
from eva_pipeline.runtime.launch import launch
from eva_pipeline.tracking import active_run_logger
from eva_pipeline.training.loop import run_pretraining
from eva_pipeline.training.recipe import epoch_order, make_augmentation, make_mask_generator
from eva_pipeline.training.validation import ValidationSet, open_validation_set
from eva_pipeline.training.worker import HISTORY_FILE, WEIGHTS_FILE, RunSpec


def pretrain_student(
    manifest: Manifest | pd.DataFrame,
    teacher_targets: TeacherTargets,
    checkpoints: Path,
    params: PretrainParams,
    teacher_params: TeacherTargetsParams,
) -> tuple[nn.Module, pd.DataFrame, dict, Figure]:
    """Pre-train the student; per-step metrics go to the MLflow run as checkpoints hold them (a resumed run's too).

    ``params``: the resolved student config (``student_config``). ``teacher_targets``: what the teacher_targets
    stage made (the stored targets' reader, or the teacher to run
    online; the validation set's targets). ``checkpoints``: the folder (``pretrain_checkpoints``) the run resumes
    from and checkpoints into, one sub-folder per training configuration. World size 1 trains in this process; more
    ranks are launched as workers on a frozen run file (same loop), written with their log into
    ``checkpoints/launch/``.
    """
    rows = split_source(manifest, "pretrain")  # streamed by the loader: the listing is never held in memory
    raise_if_problems(check_augmentation(params, teacher_params))
    t = teacher_targets
    data_fingerprint = json.dumps(
        {
            "manifest_digest": t.manifest_digest,
            "teacher": t.teacher,
            "mode": t.mode,
            "views_per_image": t.views_per_image,
        },
        sort_keys=True,
    )
    if t.num_items != len(rows):
        raise ValueError(
            f"the teacher targets cover {t.num_items} images but the manifest has {len(rows)} pre-training images: "
            "re-run the teacher_targets pipeline"
        )
    target_dim = t.target_dim  # known without building the teacher (stored, or its config)
    if params.world_size > 1:  # each rank builds its own online teacher, on its own GPU
        model, records, steps = _train_distributed(
            manifest, t, checkpoints, params, teacher_params, target_dim, data_fingerprint
        )
    else:
        if t.cached:
            targets = t.reader()  # read by the loader, with their crops
        else:
            teacher, grid = build_teacher(teacher_params.teacher, teacher_params.device), t.grid

            def targets(index: Tensor, x: Tensor) -> Tensor:
                return teacher.targets(x, grid)

        result = run_pretraining(
            params,
            ManifestPixels(rows),
            targets,
            target_dim,
            checkpoint_dir=checkpoints,
            metrics_fn=active_run_logger(prefix="pretrain/"),
            data_fingerprint=data_fingerprint,
            validation=None
            if t.validation is None
            else _validation_set(split_source(manifest, t.validation["split"]), t, params),
        )
        model, records, steps = result.model, result.run_history, result.steps  # the whole run, even resumed
    history = pd.DataFrame(records)
    if history.empty:  # resumed at the end of a run whose per-step records were not kept (older checkpoints)
        figure = Figure()
        figure.text(0.5, 0.5, "no per-step records for this run (resumed from a finished checkpoint)", ha="center")
    else:
        history["step"] = history["step"].astype("int64")
        figure = _loss_figure(history)
    return model, history, _summary(records, steps), figure


def _validation_set(rows, teacher_targets: TeacherTargets, params: PretrainParams) -> ValidationSet:
    config = student_config(params.model)
    return open_validation_set(
        rows,
        str(teacher_targets.validation_root),
        config.img_size,
        params.validation.every_steps,
        params.validation.batch_size,
    )


def _loss_figure(history: pd.DataFrame) -> Figure:
    """Training loss per step, and the held-out loss where it was evaluated."""
    extra = {}
    if "val_loss" in history:
        evaluated = history.dropna(subset=["val_loss"])
        extra["held-out (fixed mask)"] = (evaluated["step"].to_numpy(), evaluated["val_loss"].to_numpy())
    return loss_curve(
        history["step"].to_numpy(),
        history["loss"].to_numpy(),
        title="EVA pre-training loss (-cos)",
        label="training batches",
        extra=extra,
    )


def _summary(records: list[dict], steps: int) -> dict[str, float]:
    last = records[-10:]
    if not last:
        return {"steps": float(steps), "final_loss": float("nan"), "images_per_second": float("nan")}
    evaluated = [r["val_loss"] for r in records if "val_loss" in r]
    return {
        "steps": float(steps),
        "final_loss": float(np.mean([r["loss"] for r in last])),
        "images_per_second": float(np.mean([r["images_per_second"] for r in last])),
        "final_val_loss": float(evaluated[-1]) if evaluated else float("nan"),
    }


def _train_distributed(
    manifest: Manifest | pd.DataFrame,
    teacher_targets: TeacherTargets,
    checkpoints: Path,
    params: PretrainParams,
    teacher_params: TeacherTargetsParams,
    target_dim: int,
    data_fingerprint: str,
) -> tuple[nn.Module, list[dict], int]:
    """Launch ``world_size`` ranks on a frozen run file; rank 0 writes the weights and history read back here."""
    run_dir = Path(checkpoints) / "launch"
    run_dir.mkdir(parents=True, exist_ok=True)
    mlflow_run = None
    logger = active_run_logger(prefix="pretrain/")
    if logger is not None:
        mlflow_run = {"run_id": logger.run_id, "tracking_uri": logger.tracking_uri}
    spec = RunSpec(
        params=params.model_dump(mode="json"),
        images=manifest_file(manifest, "pretrain", run_dir / "pretrain_images.parquet"),
        target_dim=target_dim,
        output_dir=str(run_dir),
        checkpoint_dir=str(checkpoints),
        targets_store=None if teacher_targets.store_root is None else str(teacher_targets.store_root),
        teacher=teacher_params.teacher.model_dump(mode="json"),
        teacher_device=teacher_params.device,
        data_fingerprint=data_fingerprint,
        mlflow=mlflow_run,
        validation=_validation_spec(manifest, teacher_targets, run_dir),
    )
    for stale in (WEIGHTS_FILE, HISTORY_FILE):
        (run_dir / stale).unlink(missing_ok=True)
    launch(params, spec.write(run_dir / "run.json"), run_dir / "ranks.log")
    model = EvaMIM(student_config(params.model, target_dim=target_dim))
    load_official_checkpoint(model, run_dir / WEIGHTS_FILE)
    written = json.loads((run_dir / HISTORY_FILE).read_text())
    return model, written["history"], int(written["steps"])


def _validation_spec(manifest: Manifest | pd.DataFrame, teacher_targets: TeacherTargets, run_dir: Path) -> dict | None:
    """Where the ranks find the validation set: its target store and the held-out split's rows."""
    validation = teacher_targets.validation
    if validation is None:
        return None
    rows = manifest_file(manifest, validation["split"], run_dir / f"{validation['split']}_images.parquet")
    return {"store": str(teacher_targets.validation_root), "split": validation["split"], "manifest": rows}


def draw_mask_examples(manifest: Manifest | pd.DataFrame, params: PretrainParams) -> Figure:
    """What the student sees in its first step: the first samples of epoch 0 as the loader builds them (the
    augmented view when augmentation is on, the same crop stored views hold for epoch 0) with their block masks."""
    rows = split_source(manifest, "pretrain")
    config = student_config(params.model)
    count = min(params.mask_examples, len(rows))
    plan = BatchPlan(  # a batch of `count`: the first positions of epoch 0, views and masks as in training
        pixels=ManifestPixels(rows),
        order=epoch_order(params, len(rows)),
        global_batch=count,
        rank=0,
        world_size=1,
        img_size=config.img_size,
        seed=params.seed,
        masker=make_mask_generator(params, config.grid_size),
        view_mode="augment" if params.augmentation.enabled else "resize",
        augment=make_augmentation(params, config.img_size),
    )
    batch = PretrainBatches(plan, 0, 1).batch(0)
    grid = config.grid_size
    return mask_overview(batch.images, batch.mask.numpy().reshape(-1, grid, grid), max_images=count)
