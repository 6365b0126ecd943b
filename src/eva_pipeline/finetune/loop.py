"""The image fine-tuning loop over a DeepSpeed engine (EVA-01 ``run_class_finetuning.py`` + ``engine_for_finetuning``).

The same machinery as pre-training (:mod:`eva_pipeline.training`): the engine and its ZeRO/precision config, the
shared :func:`~eva_pipeline.training.step.optimizer_step`, crash-safe resumable checkpoints (the EMA travels in them),
the non-finite rollback and the run's per-step records. What fine-tuning adds: layer-decayed AdamW groups, CutMix /
label smoothing and their loss, the EMA updated after every applied step, and top-1 on held-out images.

Everything a step consumes is a pure function of (seed, epoch, index, step): the epoch order and each image's
augmentation (:mod:`eva_pipeline.loader.classification`), the CutMix draw and drop path (seeded per step), so a run
resumed from a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm

from eva_pipeline.config import FinetuneParams
from eva_pipeline.finetune.ema import create_ema, update_ema
from eva_pipeline.finetune.recipe import ema_decay, make_mixing, make_optimizer, make_schedule, steps_per_epoch
from eva_pipeline.loader.classification import ClassificationDataset, classification_loader
from eva_pipeline.models import EvaClassifier
from eva_pipeline.runtime.device import resolve_device
from eva_pipeline.training import checkpointing
from eva_pipeline.training.engine import initialize_engine
from eva_pipeline.training.history import RUN_HISTORY_FILE, MetricsFn, RunHistory, StepReport
from eva_pipeline.training.nonfinite import NonFiniteGuard, roll_back
from eva_pipeline.training.precision import Precision, resolve_precision
from eva_pipeline.training.recipe import step_seed
from eva_pipeline.training.schedule import WarmupCosineSchedule
from eva_pipeline.training.step import optimizer_step

_MIX_SEED_TAG = 0xC07_313  # the CutMix/Mixup draw of a step, apart from its drop path draw


@dataclass
class FinetuneResult:
    """A finished stage: the trained classifier, its EMA (when kept) and how training went."""

    model: EvaClassifier
    ema: nn.Module | None
    steps: int
    steps_per_epoch: int
    resumed_from_step: int
    ema_decay: float | None = None
    run_history: list[dict[str, float]] = field(default_factory=list)  # steps 1..steps of the whole run (rank 0)


def finetune_fingerprint(params: FinetuneParams, num_items: int, start: str) -> str:
    """What a checkpoint must agree with to be resumed: the settings that shape the trajectory, the data and the
    starting weights (``start``: e.g. a digest of the start checkpoint and of the stage's rows)."""
    shaping = params.model_dump(
        mode="json",
        exclude={"checkpoint", "max_steps", "log_every_steps", "device", "distributed", "compile", "validation"},
    )
    blob = json.dumps({"params": shaping, "num_items": num_items, "start": start}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class _Run:
    params: FinetuneParams
    engine: Any
    ema: ModelEmaV3 | None
    ema_decay: float | None
    device: torch.device
    precision: Precision  # effective: bf16 asked on a CPU without bf16 runs (and resumes) as fp32
    schedule: WarmupCosineSchedule
    ckpt_dir: Path
    fingerprint: str
    steps_per_epoch: int
    last_step: int
    start_step: int

    def batches(self, train: ClassificationDataset, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of steps ``step`` .. ``last_step - 1``, epoch by epoch: each rank a contiguous share
        of every global batch (the same global batch for any number of ranks)."""
        p, rank, world = self.params, self.engine.global_rank, self.engine.world_size
        while step < self.last_step:
            epoch, offset = divmod(step, self.steps_per_epoch)
            loader = classification_loader(
                train,
                p.batch_size,
                shuffle=True,
                seed=p.seed,
                epoch=epoch,
                num_workers=p.loader.num_workers,
                start_batch=offset,
                rank=rank,
                world=world,
            )
            for batch in loader:
                if step >= self.last_step:
                    return
                yield batch
                step += 1


def run_finetuning(
    params: FinetuneParams,
    model: EvaClassifier,
    train: ClassificationDataset,
    *,
    checkpoint_dir: str | os.PathLike[str],
    start: str = "",
    validation: ClassificationDataset | None = None,
    metrics_fn: MetricsFn | None = None,
    progress: bool = True,
    desc: str = "finetune",
) -> FinetuneResult:
    """Fine-tune ``model`` (already initialised from its start weights) on ``train`` (labels in the head's order).

    Writes resumable DeepSpeed checkpoints (with the EMA) under ``checkpoint_dir/<fingerprint>`` every
    ``params.checkpoint.every_steps`` steps and at the end, and resumes from there; ``start`` identifies the
    starting weights and data (part of the fingerprint, so another start never resumes this run's state).
    ``validation``: held-out images whose top-1 (and the EMA's) is recorded as ``val_top1`` (``val_top1_ema``)
    every ``params.validation.every_steps`` steps and at the last step.
    """
    run = _setup(params, model, len(train), start, Path(checkpoint_dir))
    mixer, criterion = make_mixing(params, model.num_classes)
    rank = run.engine.global_rank
    trajectory = RunHistory(run.ckpt_dir / RUN_HISTORY_FILE, enabled=rank == 0)
    trajectory.truncate(run.start_step)
    bar = tqdm(total=run.last_step, initial=run.start_step, desc=desc, unit="step", disable=not progress or rank != 0)
    report = StepReport(bar, metrics_fn if rank == 0 else None, params.log_every_steps, run.last_step)
    report.start(run.fingerprint, run.start_step, trajectory.read())  # a resumed run's steps, logged again
    guard = NonFiniteGuard(params.nonfinite.max_consecutive_skips, params.nonfinite.max_rollbacks)
    run.engine.train()
    step = run.start_step
    batches = run.batches(train, step)
    while step < run.last_step:
        tick = time.perf_counter()
        images, labels = next(batches)
        images = images.to(run.device, non_blocking=True)
        labels = labels.to(run.device, non_blocking=True)
        if mixer is not None:  # timm's Mixup draws from NumPy: seeded per step, as drop path is
            np.random.seed(step_seed(params.seed, rank, step ^ _MIX_SEED_TAG) % 2**32)
            images, labels = mixer(images, labels)
        x = images.to(run.precision.input_dtype)  # the engine autocasts its own forward (bf16 on CPU)

        def loss_fn(x: torch.Tensor = x, labels: torch.Tensor = labels) -> torch.Tensor:
            return criterion(run.engine(x).float(), labels)

        record = optimizer_step(
            run.engine,
            loss_fn,
            run.schedule(step),
            images=x.shape[0],
            step=step,
            seed=params.seed,
            epoch=step // run.steps_per_epoch,
            started=tick,
        )
        applied = not record["step_skipped"]
        if applied and run.ema is not None:
            record["ema_decay"] = update_ema(run.ema, run.engine.module, step + 1)
        if validation is not None and applied and _validation_due(params, step + 1, run.last_step):
            record.update(_validate(run, validation))
        trajectory.append(record)
        if guard.observe(applied):
            step = _roll_back(run, guard, step)
            bar.reset(total=run.last_step)
            bar.update(step)
            trajectory.truncate(step)
            report.discard(step)
            batches = run.batches(train, step)
            continue
        report.step(record)
        if applied and ((step + 1) % params.checkpoint.every_steps == 0 or step + 1 == run.last_step):
            _save(run, step + 1)
            report.commit(step + 1)
        step += 1
    report.close()
    return FinetuneResult(
        model=run.engine.module,
        ema=None if run.ema is None else run.ema.module,
        steps=max(run.last_step, run.start_step),
        steps_per_epoch=run.steps_per_epoch,
        resumed_from_step=run.start_step,
        ema_decay=run.ema_decay,
        run_history=trajectory.read(),
    )


def _setup(params: FinetuneParams, model: EvaClassifier, num_items: int, start: str, checkpoint_dir: Path) -> _Run:
    """Check the settings, build the engine (layer-decayed AdamW) and the EMA, resume from the latest checkpoint."""
    device = resolve_device(params.device)
    precision = resolve_precision(params.precision, device)
    params = params.model_copy(update={"precision": precision.name})  # the fingerprint and engine of what runs
    steps = steps_per_epoch(params, num_items)
    total_steps = steps * params.epochs
    last_step = min(total_steps, params.max_steps or total_steps)
    fingerprint = finetune_fingerprint(params, num_items, start)
    ckpt_dir = checkpoint_dir / fingerprint
    checkpointing.ensure_writable(ckpt_dir)

    if params.grad_checkpointing:
        model.set_grad_checkpointing(True)
    engine = initialize_engine(model, make_optimizer(model, params), params, device)
    if engine.world_size != params.world_size:
        raise RuntimeError(
            f"world_size is {params.world_size} but this process group has {engine.world_size} rank(s): multi-process "
            "runs are started by the DeepSpeed launcher (README 'Scaling out')"
        )
    if params.compile:
        engine.compile()
    decay = ema_decay(params, total_steps)
    ema = None if decay is None else create_ema(engine.module, decay, warmup=params.ema.warmup, dtype=torch.float32)
    run = _Run(
        params=params,
        engine=engine,
        ema=ema,
        ema_decay=decay,
        device=device,
        precision=precision,
        schedule=make_schedule(params, steps),
        ckpt_dir=ckpt_dir,
        fingerprint=fingerprint,
        steps_per_epoch=steps,
        last_step=last_step,
        start_step=0,
    )
    if params.checkpoint.resume == "auto":
        run.start_step = _restore(run)
    return run


def _restore(run: _Run) -> int:
    """Load the newest checkpoint into the engine and the EMA; the step it was saved at (0: none)."""
    step, state = checkpointing.resume_state(run.engine, run.ckpt_dir, run.fingerprint)
    if step and run.ema is not None:
        run.ema.module.load_state_dict(state["ema"])
    return step


def _save(run: _Run, step: int) -> None:
    state: dict[str, Any] = {"global_step": step, "fingerprint": run.fingerprint}
    if run.ema is not None:
        state["ema"] = run.ema.module.state_dict()
    checkpointing.save(run.engine, run.ckpt_dir, step, run.params.checkpoint.keep_last, state)


def _roll_back(run: _Run, guard: NonFiniteGuard, step: int) -> int:
    """Restore the latest checkpoint (the EMA with it) after the guard's run of non-finite steps; its step."""
    return roll_back(
        guard,
        step,
        bool(checkpointing.tags(run.ckpt_dir)),
        lambda: _restore(run),
        every_steps=f"checkpoint.every_steps={run.params.checkpoint.every_steps}",
        advice="Lower optimizer.lr or check the images for NaN/inf",
    )


def _validation_due(params: FinetuneParams, done: int, last_step: int) -> bool:
    return done % params.validation.every_steps == 0 or done == last_step


@torch.inference_mode()
def predictions(
    model: nn.Module, dataset: ClassificationDataset, batch_size: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 predictions, labels) of ``model`` on every item of ``dataset``, in order (eval mode kept by caller)."""
    preds, labels = [], []
    for images, targets in classification_loader(dataset, batch_size, shuffle=False):
        preds.append(model(images.to(device, dtype)).argmax(dim=1).cpu())
        labels.append(targets)
    return torch.cat(preds), torch.cat(labels)


def _validate(run: _Run, validation: ClassificationDataset) -> dict[str, float]:
    """Top-1 of the current weights (and the EMA) on the validation images; back to training mode afterwards."""
    batch = run.params.validation.batch_size
    run.engine.eval()
    pred, labels = predictions(run.engine, validation, batch, run.device, run.precision.input_dtype)
    out = {"val_top1": float((pred == labels).float().mean())}
    run.engine.train()
    if run.ema is not None:
        pred, labels = predictions(run.ema.module, validation, batch, run.device, torch.float32)  # an fp32 copy
        out["val_top1_ema"] = float((pred == labels).float().mean())
    return out
