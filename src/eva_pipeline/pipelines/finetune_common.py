"""What the two image fine-tune stages' nodes share: a stage's labelled images, one run from given start weights,
and the records of runs (history, summary, figure). The work itself is ``eva_pipeline.finetune``'s."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from eva_pipeline.config import FinetuneParams, PretrainParams
from eva_pipeline.evaluation import loss_curve
from eva_pipeline.finetune import eval_transform, train_transform
from eva_pipeline.finetune.data import ClassNames, evenly_spaced, label_budget, stage_classes, stage_labels
from eva_pipeline.finetune.loop import run_finetuning
from eva_pipeline.finetune.recipe import make_classifier
from eva_pipeline.finetune.worker import HISTORY_FILE, RESULT_FILE, WORKER_MODULE, FinetuneRunSpec
from eva_pipeline.loader.classification import ClassificationDataset
from eva_pipeline.loader.pixels import ManifestPixels
from eva_pipeline.loader.rows import FrameRows
from eva_pipeline.manifest import Manifest, manifest_digest
from eva_pipeline.models import (
    ClassifierCheckpoint,
    EvaClassifier,
    load_classifier_checkpoint,
    save_classifier_checkpoint,
)
from eva_pipeline.pipelines.common import source_rows
from eva_pipeline.runtime.launch import launch
from eva_pipeline.tracking import active_run_logger

#: Initialises a freshly built classifier in place (loads start weights, or nothing for random init).
StartFn = Callable[[EvaClassifier], object]


def labelled_rows(
    manifest: Manifest | pd.DataFrame,
    class_names: ClassNames,
    sources: Sequence[str],
    classes: Sequence[str],
    *,
    per_class: int | None = None,
    keep: int | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows of ``sources`` labelled in ``classes`` (by name), cut to ``per_class`` per class, then to ``keep``
    evenly spaced rows."""
    rows = source_rows(manifest, sources)
    labels = stage_labels(rows, class_names, classes)
    chosen = label_budget(labels, per_class)
    chosen = chosen[evenly_spaced(len(chosen), keep)]
    return rows.iloc[chosen].reset_index(drop=True), labels[chosen]


def stage_data(
    manifest: Manifest | pd.DataFrame, class_names: ClassNames, params: FinetuneParams
) -> tuple[list[str], tuple[pd.DataFrame, np.ndarray], tuple[pd.DataFrame, np.ndarray] | None]:
    """A stage's classes (its sources' class names), its labelled training rows (the label budget applied) and its
    held-out validation rows (None without validation sources)."""
    classes = stage_classes(class_names, params.data.sources)
    train = labelled_rows(manifest, class_names, params.data.sources, classes, per_class=params.data.per_class)
    validation = None
    if params.validation.sources:
        sources = params.validation.sources
        validation = labelled_rows(manifest, class_names, sources, classes, keep=params.validation.num_images)
    return classes, train, validation


def _dataset(rows: pd.DataFrame, labels: np.ndarray, transform: object, seed: int) -> ClassificationDataset:
    return ClassificationDataset(ManifestPixels(FrameRows(rows)), labels, transform, seed)


def state_digest(state: Mapping[str, torch.Tensor] | None) -> str:
    """sha256 of a state dict's names, shapes and bytes: identifies start weights in a run's fingerprint."""
    digest = hashlib.sha256()
    for name, tensor in sorted((state or {}).items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train_run(
    run: str,
    params: FinetuneParams,
    student: PretrainParams,
    classes: Sequence[str],
    train: tuple[pd.DataFrame, np.ndarray],
    validation: tuple[pd.DataFrame, np.ndarray] | None,
    start: StartFn,
    start_id: str,
    checkpoints: Path,
) -> tuple[ClassifierCheckpoint, list[dict], dict[str, float]]:
    """One fine-tune run: the student's architecture at the stage's size, initialised by ``start`` (from a seeded
    init, so random init is reproducible), trained by :func:`~eva_pipeline.finetune.loop.run_finetuning`; per-step
    metrics stream to MLflow as ``<run>/...`` (``run``: e.g. ``finetune/student``, also its progress bar's name).
    Returns the checkpoint, the run's per-step records and a summary."""
    torch.manual_seed(params.seed)
    model = make_classifier(params, student.model, len(classes))
    start(model)
    identity = run_identity(start_id, *train)
    if params.world_size > 1:
        return train_distributed(run, params, classes, model, train, validation, identity, checkpoints)
    rows, labels = train
    a = params.augmentation
    train_set = _dataset(
        rows,
        labels,
        train_transform(params.img_size, a.scale, auto_augment=a.auto_augment, hflip=a.hflip, re_prob=a.re_prob),
        params.seed,
    )
    val_set = None
    if validation is not None:
        val_set = _dataset(*validation, eval_transform(params.img_size, params.crop_pct), params.seed)
    return fit(run, params, model, classes, train_set, val_set, identity, checkpoints)


def run_identity(start_id: str, rows: pd.DataFrame, labels: np.ndarray, columns: Sequence[str] | None = None) -> str:
    """What a run's checkpoints must agree with besides its settings: its start weights, rows (``columns``; default
    the image manifest's pixel columns) and labels."""
    digest = manifest_digest(rows) if columns is None else manifest_digest(rows, columns)
    return json.dumps({"start": start_id, "rows": digest, "labels": hashlib.sha256(labels.tobytes()).hexdigest()})


def fit(
    run: str,
    params: FinetuneParams,
    model: EvaClassifier,
    classes: Sequence[str],
    train_set: torch.utils.data.Dataset,
    val_set: torch.utils.data.Dataset | None,
    identity: str,
    checkpoints: Path,
) -> tuple[ClassifierCheckpoint, list[dict], dict[str, float]]:
    """Train an initialised classifier (image or video) on its datasets in this process; per-step metrics stream to
    MLflow as ``<run>/...``. Returns the checkpoint, the run's per-step records and a summary."""
    result = run_finetuning(
        params,
        model,
        train_set,
        checkpoint_dir=checkpoints,
        start=identity,
        validation=val_set,
        metrics_fn=active_run_logger(prefix=f"{run}/"),
        desc=run,
    )
    checkpoint = ClassifierCheckpoint.from_modules(result.model, classes, result.ema)
    return checkpoint, result.run_history, run_summary(result.run_history, result.steps, result.ema_decay)


def train_distributed(
    run: str,
    params: FinetuneParams,
    classes: Sequence[str],
    model: EvaClassifier,
    train: tuple[pd.DataFrame, np.ndarray],
    validation: tuple[pd.DataFrame, np.ndarray] | None,
    identity: str,
    checkpoints: Path,
) -> tuple[ClassifierCheckpoint, list[dict], dict[str, float]]:
    """Launch ``world_size`` ranks of ``eva_pipeline.finetune.worker`` on a frozen run file: the initialised
    classifier (image or video), the rows (manifest or clip rows) and labels are written to
    ``checkpoints/launch/<run>/``; rank 0's results are read back."""
    run_dir = Path(checkpoints) / "launch" / run
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (RESULT_FILE, HISTORY_FILE):
        (run_dir / stale).unlink(missing_ok=True)
    save_classifier_checkpoint(ClassifierCheckpoint.from_modules(model, classes), run_dir / "initial.pt")
    train[0].to_parquet(run_dir / "train_rows.parquet")
    np.save(run_dir / "train_labels.npy", train[1])
    val_files: dict[str, str | None] = {"validation_rows": None, "validation_labels": None}
    if validation is not None:
        validation[0].to_parquet(run_dir / "validation_rows.parquet")
        np.save(run_dir / "validation_labels.npy", validation[1])
        val_files = {
            "validation_rows": str(run_dir / "validation_rows.parquet"),
            "validation_labels": str(run_dir / "validation_labels.npy"),
        }
    logger = active_run_logger()
    spec = FinetuneRunSpec(
        params=params.model_dump(mode="json"),
        initial=str(run_dir / "initial.pt"),
        train_rows=str(run_dir / "train_rows.parquet"),
        train_labels=str(run_dir / "train_labels.npy"),
        checkpoint_dir=str(checkpoints),
        output_dir=str(run_dir),
        start=identity,
        mlflow=None if logger is None else {"run_id": logger.run_id, "tracking_uri": logger.tracking_uri},
        prefix=f"{run}/",
        **val_files,
    )
    launch(params, spec.write(run_dir / "run.json"), run_dir / "ranks.log", module=WORKER_MODULE)
    written = json.loads((run_dir / HISTORY_FILE).read_text())
    checkpoint = load_classifier_checkpoint(run_dir / RESULT_FILE)
    return checkpoint, written["history"], run_summary(written["history"], written["steps"], written["ema_decay"])


def run_summary(records: list[dict], steps: int, ema_decay: float | None) -> dict[str, float]:
    """Steps, the mean loss of the last 10 steps, throughput and the last held-out top-1 (NaN when none)."""
    last = records[-10:]
    evaluated = [r for r in records if "val_top1" in r]
    nan = float("nan")
    return {
        "steps": float(steps),
        "final_loss": float(np.mean([r["loss"] for r in last])) if last else nan,
        "images_per_second": float(np.mean([r["images_per_second"] for r in last])) if last else nan,
        "final_val_top1": float(evaluated[-1]["val_top1"]) if evaluated else nan,
        "final_val_top1_ema": float(evaluated[-1].get("val_top1_ema", nan)) if evaluated else nan,
        "ema_decay": nan if ema_decay is None else float(ema_decay),
    }


def history_frame(histories: Mapping[str, list[dict]]) -> pd.DataFrame:
    """Every run's per-step records in one table, ``run`` first."""
    frames = [pd.DataFrame(records).assign(run=run) for run, records in histories.items() if records]
    if not frames:
        return pd.DataFrame(columns=["run", "step", "loss"])
    table = pd.concat(frames, ignore_index=True)
    table["step"] = table["step"].astype("int64")
    return table[["run", *[c for c in table.columns if c != "run"]]]


def loss_figure(history: pd.DataFrame, title: str) -> Figure:
    """Training loss per step, one line per run."""
    runs = list(dict.fromkeys(history["run"])) if not history.empty else []
    if not runs:
        figure = Figure()
        figure.text(0.5, 0.5, "no per-step records (resumed from a finished checkpoint)", ha="center")
        return figure
    first, *others = (history[history["run"] == run] for run in runs)
    extra = {run: (h["step"].to_numpy(), h["loss"].to_numpy()) for run, h in zip(runs[1:], others, strict=True)}
    return loss_curve(first["step"].to_numpy(), first["loss"].to_numpy(), title, label=runs[0], extra=extra)
