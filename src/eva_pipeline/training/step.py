"""One pre-training step (MAE's ``engine_pretrain.py``): a loader batch to the step's inputs, then forward, backward
and optimiser step on a DeepSpeed engine, returning the step's record.

:func:`train_step` is what :func:`~eva_pipeline.training.loop.run_pretraining` runs and what
``benchmarks/pretrain_step.py`` times; its phases are profiler ranges ``step::forward`` etc.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from eva_pipeline.loader.transforms import to_model_input
from eva_pipeline.training.objective import mim_cosine_loss
from eva_pipeline.training.optim import apply_lr
from eva_pipeline.training.precision import Precision
from eva_pipeline.training.recipe import step_seed

TargetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(sample indices (B,), model-input images (B,3,H,W)) -> per-patch targets (B, N, D)."""


def cached_targets(targets: torch.Tensor) -> TargetFn:
    """Targets held in memory, looked up by sample index (tests and small data; stores are read by the loader)."""
    return lambda indices, images: targets[indices]


def step_inputs(
    batch: Any, targets: TargetFn | object, img_size: int, device: torch.device, precision: Precision
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A loader batch (:class:`~eva_pipeline.loader.batches.Batch`) as :func:`train_step` takes it: model input ``x`` in
    the engine's input dtype, ``mask`` (B, N) and the masked tokens' ``target`` (M, D), all on ``device``; ``targets``
    (the online teacher) runs on ``x`` when the batch brought no stored targets, under the run's autocast (bf16 on
    CPU), as the engine runs the student."""
    mask = batch.mask.to(device, non_blocking=True)
    x = to_model_input(batch.images, img_size).to(device, non_blocking=True)
    # An online teacher works on the device, with no round trip; stored targets came with the batch.
    if batch.targets is not None:
        raw = batch.targets
    else:
        with precision.autocast():
            raw = targets(batch.indices, x)
    target = raw.to(device, non_blocking=True)[mask]
    return x.to(precision.input_dtype), mask, target


STEP_PHASE_PREFIX = "step::"


def _phase(name: str) -> torch.profiler.record_function:
    """A profiler range (``step::<name>``) around one phase of the step; costs nothing when not profiling."""
    return torch.profiler.record_function(STEP_PHASE_PREFIX + name)


def train_step(
    engine: Any,
    x: torch.Tensor,
    mask: torch.Tensor,
    target: torch.Tensor,
    lr: float,
    *,
    num_masked: int,
    step: int,
    seed: int,
    epoch: int = 0,
    started: float | None = None,
) -> dict[str, float]:
    """One MIM optimisation step of ``engine`` on one rank's share of a global batch; returns the step's record.

    ``x`` (B, 3, H, W), ``mask`` (B, N) and ``target`` (the masked tokens' targets, (M, D)) are on the engine's device;
    ``num_masked`` counts the masked tokens of the whole global batch (all ranks); the rest is
    :func:`optimizer_step`'s.
    """
    world = engine.world_size
    # Each rank's share of the global token mean: DeepSpeed averages gradients over ranks, so the update equals
    # a single process's on the whole batch, however the masked tokens fall across ranks.
    return optimizer_step(
        engine,
        lambda: mim_cosine_loss(engine(x, mask), target, num_tokens=num_masked / world),
        lr,
        images=x.shape[0],
        step=step,
        seed=seed,
        epoch=epoch,
        started=started,
    )


def optimizer_step(
    engine: Any,
    loss_fn: Callable[[], torch.Tensor],
    lr: float,
    *,
    images: int,
    step: int,
    seed: int,
    epoch: int = 0,
    started: float | None = None,
) -> dict[str, float]:
    """Forward (``loss_fn``, which runs the engine), backward and optimiser step; returns the step's record.

    Shared by pre-training and fine-tuning. ``images``: this rank's batch size; ``step`` is 0-based. ``started`` (a
    ``time.perf_counter()`` value) is when the step's work began, e.g. before its batch was loaded: the default, this
    call, times the step alone. Drop path draws from the torch seed of (seed, rank, step), so a resumed run repeats it.

    The record: ``step`` (1-based), ``loss``, ``lr``, ``grad_norm`` (before clipping), ``images_per_second`` (global
    batch), ``epoch``, ``step_skipped`` (1.0 when DeepSpeed skipped a non-finite step, else 0.0) and, under fp16,
    ``loss_scale``. The forward, backward and optimizer phases are profiler ranges ``step::forward`` etc.
    """
    tick = time.perf_counter() if started is None else started
    world = engine.world_size
    apply_lr(engine.optimizer, lr)
    torch.manual_seed(step_seed(seed, engine.global_rank, step))  # drop path: per rank, and exact on resume
    with _phase("forward"):
        loss = loss_fn()
    with _phase("backward"):
        engine.backward(loss)
    with _phase("optimizer"):
        engine.step()
    elapsed = time.perf_counter() - tick
    record = {
        "step": float(step + 1),
        "loss": loss.item(),
        "lr": lr,
        "grad_norm": _float(engine.get_global_grad_norm()),
        "images_per_second": images * world / elapsed,  # the global batch: every rank's share is the same size
        "epoch": float(epoch),
        "step_skipped": float(not engine.was_step_applied()),
    }
    if engine.fp16_enabled():
        record["loss_scale"] = float(engine.optimizer.cur_scale)
    return record


def _float(value: object) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if isinstance(value, torch.Tensor) else value)
