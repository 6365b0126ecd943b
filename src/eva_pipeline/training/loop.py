"""The EVA pre-training loop over a DeepSpeed engine: deterministic data order and masks, per-step LR, checkpoints.

Everything a step consumes is a pure function of (seed, epoch, index): the epoch permutation, each sample's mask
and hence each batch; stochastic layers (drop path) draw from a torch seed of (seed, rank, step). A run resumed from a
checkpoint therefore continues exactly where it stopped, and ranks draw different drop-path patterns (as the public
code's ``seed + rank``).

Laid out as MAE's ``main_pretrain.py`` + ``engine_pretrain.py``: the parts built from the config
(:mod:`~eva_pipeline.training.recipe`), one step (:func:`~eva_pipeline.training.step.train_step`, also what
``benchmarks/pretrain_step.py`` times) and :func:`run_pretraining`'s short loop here, which adds validation, the
non-finite rollback (:mod:`~eva_pipeline.training.nonfinite`), checkpoints and the run's records
(:mod:`~eva_pipeline.training.history`) through small helpers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from eva_pipeline.config import PretrainParams
from eva_pipeline.loader.batches import BatchPlan, batch_loader
from eva_pipeline.loader.pixels import TensorPixels
from eva_pipeline.models import EvaConfig, EvaMIM
from eva_pipeline.runtime.device import resolve_device
from eva_pipeline.training import checkpointing
from eva_pipeline.training.engine import initialize_engine
from eva_pipeline.training.history import RUN_HISTORY_FILE, MetricsFn, RunHistory, StepReport
from eva_pipeline.training.nonfinite import NonFiniteGuard, roll_back
from eva_pipeline.training.precision import Precision, resolve_precision
from eva_pipeline.training.recipe import initial_student, make_optimizer, make_plan, make_schedule, training_fingerprint
from eva_pipeline.training.schedule import WarmupCosineSchedule
from eva_pipeline.training.step import TargetFn, step_inputs, train_step
from eva_pipeline.training.validation import ValidationSet, validation_loss


@dataclass
class PretrainResult:
    """What a finished run hands back: the trained student and how training went."""

    model: EvaMIM
    steps: int
    steps_per_epoch: int
    resumed_from_step: int
    history: list[dict[str, float]] = field(default_factory=list)  # this call's steps, skipped ones included
    run_history: list[dict[str, float]] = field(default_factory=list)  # steps 1..steps of the whole run (rank 0)


@dataclass
class _Run:
    """What :func:`_setup` builds for the loop: the engine at its starting step and everything that drives it."""

    params: PretrainParams
    engine: Any
    config: EvaConfig
    device: torch.device
    precision: Precision  # effective: bf16 asked on a CPU without bf16 runs (and resumes) as fp32
    schedule: WarmupCosineSchedule
    plan: BatchPlan
    ckpt_dir: Path
    fingerprint: str
    steps_per_epoch: int
    last_step: int
    start_step: int

    @property
    def rank(self) -> int:
        return self.engine.global_rank

    @property
    def world(self) -> int:
        return self.engine.world_size

    def checkpoint_due(self, done: int) -> bool:
        """Whether the state after ``done`` steps is saved: every ``checkpoint.every_steps`` steps and the last."""
        return done % self.params.checkpoint.every_steps == 0 or done == self.last_step

    def batches(self, step: int) -> Iterator[Any]:
        """The batches of steps ``step`` .. ``last_step - 1``, in order."""
        return iter(batch_loader(self.plan, step, self.last_step, self.params.loader.num_workers))


def run_pretraining(
    params: PretrainParams,
    pixels: torch.Tensor | object,
    targets: TargetFn | object,
    target_dim: int,
    *,
    checkpoint_dir: str | os.PathLike[str],
    metrics_fn: MetricsFn | None = None,
    progress: bool = True,
    data_fingerprint: str = "",
    validation: ValidationSet | None = None,
) -> PretrainResult:
    """Pre-train an EVA student on ``pixels`` against per-patch teacher targets.

    ``pixels``: the pre-training images, a :class:`~eva_pipeline.loader.pixels.ManifestPixels` (streamed from the
    manifest) or a uint8 tensor (N, C, H, W) held in memory. ``targets``: a target-store reader (its targets, and
    crops when it has views, are read by the loader with the pixels) or a function ``(indices, model input) ->
    targets`` called on every batch (the online teacher). Batches stream through
    :func:`~eva_pipeline.loader.batches.batch_loader` with ``params.loader.num_workers`` workers.

    Writes resumable DeepSpeed checkpoints under ``checkpoint_dir`` (one sub-folder per training configuration,
    resumed from there; in the pipeline the ``pretrain_checkpoints`` catalog folder) every
    ``params.checkpoint.every_steps`` steps and returns the trained student (the caller stores it, e.g. in the
    official EVA-01 format). ``data_fingerprint`` identifies the images and targets (e.g. manifest digest and
    teacher) so that a checkpoint is never resumed on other data of the same size.
    ``validation``: held-out images and targets whose fixed-mask loss is recorded as ``val_loss`` every
    ``validation.every_steps`` steps and at the last step. ``metrics_fn`` gets each due record once a checkpoint holds
    its step, and first those of the steps a resumed run starts from
    (:class:`~eva_pipeline.training.history.StepReport`).
    """
    if isinstance(pixels, torch.Tensor):
        pixels = TensorPixels(pixels)
    stored = targets if hasattr(targets, "get") and hasattr(targets, "views_per_item") else None
    run = _setup(params, pixels, stored, target_dim, data_fingerprint, Path(checkpoint_dir))

    history: list[dict[str, float]] = []
    trajectory = RunHistory(run.ckpt_dir / RUN_HISTORY_FILE, enabled=run.rank == 0)
    trajectory.truncate(run.start_step)  # what a crashed run logged after its last checkpoint did not happen
    bar = tqdm(
        total=run.last_step, initial=run.start_step, desc="pretrain", unit="step", disable=not progress or run.rank != 0
    )
    report = StepReport(bar, metrics_fn if run.rank == 0 else None, params.log_every_steps, run.last_step)
    report.start(run.fingerprint, run.start_step, trajectory.read())  # a resumed run's steps, logged again
    run.engine.train()
    guard = NonFiniteGuard(params.nonfinite.max_consecutive_skips, params.nonfinite.max_rollbacks)
    step = run.start_step
    batches = run.batches(step)
    while step < run.last_step:
        tick = time.perf_counter()  # images/s counts loading the batch too
        batch = next(batches)
        assert batch.step == step, f"loader out of step: got {batch.step}, expected {step}"
        x, mask, target = step_inputs(batch, targets, run.config.img_size, run.device, run.precision)
        record = train_step(
            run.engine,
            x,
            mask,
            target,
            run.schedule(step),
            num_masked=batch.num_masked,
            step=step,
            seed=params.seed,
            epoch=step // run.steps_per_epoch,
            started=tick,
        )
        applied = not record["step_skipped"]
        if validation is not None and applied and validation.due(step + 1, run.last_step):
            record["val_loss"] = _validation_loss(run, validation)
        history.append(record)
        trajectory.append(record)
        if guard.observe(applied):  # too many non-finite steps in a row: back to the last good state
            step = _roll_back(run, guard, step)
            bar.reset(total=run.last_step)
            bar.update(step)
            trajectory.truncate(step)
            report.discard(step)
            batches = run.batches(step)
            continue
        report.step(record)
        if applied and run.checkpoint_due(step + 1):
            _save(run, step + 1)
            report.commit(step + 1)
        step += 1
    report.close()

    return PretrainResult(
        model=run.engine.module,
        steps=max(run.last_step, run.start_step),  # a checkpoint past max_steps is returned as it is, not re-trained
        steps_per_epoch=run.steps_per_epoch,
        resumed_from_step=run.start_step,
        history=history,
        run_history=trajectory.read(),
    )


def _setup(
    params: PretrainParams, pixels: object, stored: object, target_dim: int, data_fingerprint: str, checkpoint_dir: Path
) -> _Run:
    """Check the settings, build the engine over the initial student and resume it from its latest checkpoint."""
    device = resolve_device(params.device)
    precision = resolve_precision(params.precision, device)
    params = params.model_copy(update={"precision": precision.name})  # the fingerprint and engine of what runs
    num_items = len(pixels)
    steps_per_epoch = num_items // params.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {params.batch_size} exceeds the {num_items} pre-training images")
    total_steps = steps_per_epoch * params.epochs
    last_step = min(total_steps, params.max_steps or total_steps)

    fingerprint = training_fingerprint(params, num_items, target_dim, data_fingerprint)
    # One folder per training configuration: changed settings start a new run and never touch another's state.
    ckpt_dir = checkpoint_dir / fingerprint
    checkpointing.ensure_writable(ckpt_dir)

    model = initial_student(params, target_dim)
    config = model.config
    optimizer = make_optimizer(model, params)
    engine = initialize_engine(model, optimizer, params, device)
    rank, world = engine.global_rank, engine.world_size
    if world != params.world_size:
        raise RuntimeError(
            f"pretrain.world_size is {params.world_size} but this process group has {world} rank(s): multi-process "
            f"runs are started by the DeepSpeed launcher (README 'Scaling out')"
        )
    if params.compile:
        engine.compile()

    schedule = make_schedule(params, steps_per_epoch)
    plan = make_plan(params, pixels, config.img_size, config.grid_size, rank, world, stored)
    start_step = checkpointing.resume(engine, ckpt_dir, fingerprint) if params.checkpoint.resume == "auto" else 0
    return _Run(
        params=params,
        engine=engine,
        config=config,
        device=device,
        precision=precision,
        schedule=schedule,
        plan=plan,
        ckpt_dir=ckpt_dir,
        fingerprint=fingerprint,
        steps_per_epoch=steps_per_epoch,
        last_step=last_step,
        start_step=start_step,
    )


def _validation_loss(run: _Run, validation: ValidationSet) -> float:
    """The held-out fixed-mask loss of the current weights (evaluated in eval mode, then back to training)."""
    run.engine.eval()
    dtype = run.precision.input_dtype  # the engine autocasts its own forward
    loss = validation_loss(run.engine, validation, run.config.num_patches, run.device, dtype, run.rank, run.world)
    run.engine.train()
    return loss


def _roll_back(run: _Run, guard: NonFiniteGuard, step: int) -> int:
    """Restore the latest checkpoint after the guard's run of non-finite steps ending at ``step``; its step."""
    return roll_back(
        guard,
        step,
        bool(checkpointing.tags(run.ckpt_dir)),
        lambda: checkpointing.resume(run.engine, run.ckpt_dir, run.fingerprint),
        every_steps=f"pretrain.checkpoint.every_steps={run.params.checkpoint.every_steps}",
        advice="Lower pretrain.optimizer.lr or check the inputs and targets for NaN/inf",
    )


def _save(run: _Run, step: int) -> None:
    """Checkpoint the engine after ``step`` steps (keeping the newest ``keep_last``)."""
    state = {"global_step": step, "fingerprint": run.fingerprint}
    checkpointing.save(run.engine, run.ckpt_dir, step, run.params.checkpoint.keep_last, state)
