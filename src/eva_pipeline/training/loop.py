"""The EVA pre-training loop over a DeepSpeed engine: deterministic data order and masks, per-step LR, checkpoints.

Everything a step consumes is a pure function of (seed, epoch, index): the epoch permutation, each sample's mask
and hence each batch; stochastic layers (drop path) draw from a torch seed of (seed, rank, step). A run resumed from a
checkpoint therefore continues exactly where it stopped, and ranks draw different drop-path patterns (as the public
code's ``seed + rank``).

Laid out as MAE's ``main_pretrain.py`` + ``engine_pretrain.py``: setup (``make_*``, :func:`initial_student`), one
step (:func:`train_step`, also what ``benchmarks/pretrain_step.py`` times) and :func:`run_pretraining`'s loop, which
adds validation, the non-finite rollback, checkpoints and metrics through small helpers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from eva_pipeline.config import PretrainParams
from eva_pipeline.loader.augment import RandomResizedCropFlip
from eva_pipeline.loader.batches import BatchPlan, batch_loader
from eva_pipeline.loader.order import EpochOrder
from eva_pipeline.loader.pixels import TensorPixels
from eva_pipeline.loader.transforms import to_model_input
from eva_pipeline.masking import BlockMaskGenerator
from eva_pipeline.models import EvaConfig, EvaMIM, get_config
from eva_pipeline.runtime.device import resolve_device
from eva_pipeline.training import checkpointing
from eva_pipeline.training.engine import check_precision, initialize_engine
from eva_pipeline.training.objective import mim_cosine_loss
from eva_pipeline.training.optim import AdamWConfig, apply_lr, build_adamw, param_groups
from eva_pipeline.training.schedule import WarmupCosineSchedule
from eva_pipeline.training.validation import ValidationSet, validation_loss

log = logging.getLogger(__name__)

TargetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(sample indices (B,), model-input images (B,3,H,W)) -> per-patch targets (B, N, D)."""
MetricsFn = Callable[[int, dict[str, float]], None]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_STEP_SEED_TAG = 0x5EED_D409  # tells the step seeds apart from other draws of (seed, rank, step)


@dataclass
class PretrainResult:
    """What a finished run hands back: the trained student and how training went."""

    model: EvaMIM
    steps: int
    steps_per_epoch: int
    resumed_from_step: int
    history: list[dict[str, float]] = field(default_factory=list)  # this call's steps, skipped ones included
    run_history: list[dict[str, float]] = field(default_factory=list)  # steps 1..steps of the whole run (rank 0)


def epoch_order(params: PretrainParams, num_items: int) -> EpochOrder:
    """The sample order of every epoch (a uniform permutation of all items): the same on every rank and after a
    restart."""
    return EpochOrder(num_items, params.seed)


def epoch_permutation(params: PretrainParams, epoch: int, num_items: int) -> np.ndarray:
    """The whole sample order of ``epoch`` (small data and tests: it is O(num_items))."""
    return epoch_order(params, num_items).epoch(epoch)


def make_mask_generator(params: PretrainParams, grid: int) -> BlockMaskGenerator:
    m = params.masking
    return BlockMaskGenerator(
        grid=(grid, grid),
        num_masking_patches=m.num_masking_patches,
        min_num_patches=m.min_num_patches,
        max_num_patches=m.max_num_patches,
        min_aspect=m.min_aspect,
    )


def make_augmentation(params: PretrainParams, size: int) -> RandomResizedCropFlip | None:
    a = params.augmentation
    return RandomResizedCropFlip(size, a.scale, a.ratio, a.flip_prob) if a.enabled else None


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of ``rank``'s ``step`` (0-based): what drop path draws is a function of (seed, rank, step)."""
    return int(np.random.SeedSequence([seed, rank, step, _STEP_SEED_TAG]).generate_state(1, dtype=np.uint64)[0])


def make_student(params: PretrainParams, target_dim: int) -> EvaMIM:
    """The student of ``params`` with an lm_head of ``target_dim`` (the teacher's width), initialised as EVA-01's
    ``modeling_pretrain.py`` does, from the current torch generator (seeded identically on every rank)."""
    return EvaMIM(get_config(params.model.name, **{**params.model.overrides, "target_dim": target_dim}))


def initial_student(params: PretrainParams, target_dim: int) -> EvaMIM:
    """The student exactly as training starts it (seeded by ``params.seed``): also the probe's random-init baseline."""
    torch.manual_seed(params.seed)  # the same initial weights on every rank
    return make_student(params, target_dim)


def make_optimizer(model: torch.nn.Module, params: PretrainParams) -> torch.optim.AdamW:
    """AdamW over EVA's weight-decay groups (EVA-01 ``optim_factory.py``)."""
    o = params.optimizer
    config = AdamWConfig(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    return build_adamw(param_groups(model, o.weight_decay), config)


def make_schedule(params: PretrainParams, steps_per_epoch: int) -> WarmupCosineSchedule:
    """Per-step LR: linear warmup, then half-cosine to ``min_lr`` over ``epochs`` of ``steps_per_epoch`` steps."""
    return WarmupCosineSchedule.from_epochs(
        base_value=params.optimizer.lr,
        final_value=params.optimizer.min_lr,
        epochs=params.epochs,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=params.optimizer.warmup_epochs,
    )


def make_plan(
    params: PretrainParams, pixels: object, img_size: int, grid: int, rank: int, world: int, stored: object = None
) -> BatchPlan:
    """What the loader needs to build any step's batch of ``rank``
    (see :class:`~eva_pipeline.loader.batches.BatchPlan`)."""
    return BatchPlan(
        pixels=pixels,
        order=epoch_order(params, len(pixels)),
        global_batch=params.batch_size,
        rank=rank,
        world_size=world,
        img_size=img_size,
        seed=params.seed,
        masker=make_mask_generator(params, grid),
        view_mode=_view_mode(params, stored),
        augment=make_augmentation(params, img_size),
        targets=stored,
    )


def cached_targets(targets: torch.Tensor) -> TargetFn:
    """Targets held in memory, looked up by sample index (tests and small data; stores are read by the loader)."""
    return lambda indices, images: targets[indices]


def _view_mode(params: PretrainParams, stored: object) -> str:
    if stored is not None and getattr(stored, "has_crops", False):
        return "stored"
    return "augment" if params.augmentation.enabled else "resize"


def step_inputs(
    batch: Any, targets: TargetFn | object, img_size: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A loader batch (:class:`~eva_pipeline.loader.batches.Batch`) as :func:`train_step` takes it: model input ``x`` in
    ``dtype``, ``mask`` (B, N) and the masked tokens' ``target`` (M, D), all on ``device``; ``targets`` (the online
    teacher) runs on ``x`` when the batch brought no stored targets."""
    mask = batch.mask.to(device, non_blocking=True)
    x = to_model_input(batch.images, img_size).to(device, non_blocking=True)
    # An online teacher works on the device, with no round trip; stored targets came with the batch.
    raw = batch.targets if batch.targets is not None else targets(batch.indices, x)
    target = raw.to(device, non_blocking=True)[mask]
    return x.to(dtype), mask, target


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
    """One optimisation step of ``engine`` on one rank's share of a global batch; returns the step's record.

    ``x`` (B, 3, H, W), ``mask`` (B, N) and ``target`` (the masked tokens' targets, (M, D)) are on the engine's device;
    ``num_masked`` counts the masked tokens of the whole global batch (all ranks); ``step`` is 0-based. ``started``
    (a ``time.perf_counter()`` value) is when the step's work began, e.g. before its batch was loaded: the default,
    this call, times the step alone.

    The record: ``step`` (1-based), ``loss``, ``lr``, ``grad_norm`` (before clipping), ``images_per_second`` (global
    batch), ``epoch``, ``step_skipped`` (1.0 when DeepSpeed skipped a non-finite step, else 0.0) and, under fp16,
    ``loss_scale``. The forward, backward and optimizer phases are profiler ranges ``step::forward`` etc.
    """
    tick = time.perf_counter() if started is None else started
    world = engine.world_size
    apply_lr(engine.optimizer, lr)
    torch.manual_seed(step_seed(seed, engine.global_rank, step))  # drop path: per rank, and exact on resume
    with _phase("forward"):
        # Each rank's share of the global token mean: DeepSpeed averages gradients over ranks, so the update equals
        # a single process's on the whole batch, however the masked tokens fall across ranks.
        loss = mim_cosine_loss(engine(x, mask), target, num_tokens=num_masked / world)
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
        "images_per_second": x.shape[0] * world / elapsed,  # the global batch: every rank's share is the same size
        "epoch": float(epoch),
        "step_skipped": float(not engine.was_step_applied()),
    }
    if engine.fp16_enabled():
        record["loss_scale"] = float(engine.optimizer.cur_scale)
    return record


@dataclass
class _Run:
    """What :func:`_setup` builds for the loop: the engine at its starting step and everything that drives it."""

    params: PretrainParams
    engine: Any
    config: EvaConfig
    device: torch.device
    dtype: torch.dtype
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
    ``validation.every_steps`` steps and at the last step.
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
    run.engine.train()
    guard = NonFiniteGuard(params.nonfinite.max_consecutive_skips, params.nonfinite.max_rollbacks)
    step = run.start_step
    batches = run.batches(step)
    while step < run.last_step:
        tick = time.perf_counter()  # images/s counts loading the batch too
        batch = next(batches)
        assert batch.step == step, f"loader out of step: got {batch.step}, expected {step}"
        x, mask, target = step_inputs(batch, targets, run.config.img_size, run.device, run.dtype)
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
            batches = run.batches(step)
            continue
        if run.rank == 0:
            _report(bar, metrics_fn, record, params.log_every_steps, run.last_step)
        if applied and run.checkpoint_due(step + 1):
            _save(run, step + 1)
        step += 1
    bar.close()

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
    check_precision(params.precision, device)
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
        dtype=_DTYPES[params.precision],
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
    loss = validation_loss(run.engine, validation, run.config.num_patches, run.device, run.dtype, run.rank, run.world)
    run.engine.train()
    return loss


def _roll_back(run: _Run, guard: NonFiniteGuard, step: int) -> int:
    """Restore the latest checkpoint after the guard's run of non-finite steps ending at ``step``; its step."""
    if not checkpointing.tags(run.ckpt_dir):
        raise NonFiniteTrainingError(
            f"{guard.max_consecutive_skips} consecutive non-finite steps at step {step + 1}, before the first "
            f"checkpoint (pretrain.checkpoint.every_steps={run.params.checkpoint.every_steps}): nothing to roll "
            f"back to. Lower pretrain.optimizer.lr or check the inputs and targets for NaN/inf"
        )
    restored = checkpointing.resume(run.engine, run.ckpt_dir, run.fingerprint)
    log.warning(
        "%d consecutive non-finite steps at step %d: rolled back to the checkpoint of step %d (rollback %d/%d)",
        guard.max_consecutive_skips,
        step + 1,
        restored,
        guard.rollbacks,
        guard.max_rollbacks,
    )
    return restored


def _report(
    bar: tqdm, metrics_fn: MetricsFn | None, record: dict[str, float], log_every_steps: int, last_step: int
) -> None:
    """Rank 0: advance the progress bar; hand the record to ``metrics_fn`` every ``log_every_steps`` steps, at the
    last step and whenever it carries a validation loss."""
    step = int(record["step"])
    bar.update(1)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_second']:.0f}")
    due = step % log_every_steps == 0 or step == last_step or "val_loss" in record
    if metrics_fn is not None and due:
        metrics_fn(step, {k: v for k, v in record.items() if k != "step"})  # the step is the x-axis


def _save(run: _Run, step: int) -> None:
    """Checkpoint the engine after ``step`` steps (keeping the newest ``keep_last``)."""
    state = {"global_step": step, "fingerprint": run.fingerprint}
    checkpointing.save(run.engine, run.ckpt_dir, step, run.params.checkpoint.keep_last, state)


RUN_HISTORY_FILE = "history.jsonl"


class RunHistory:
    """The per-step records of a whole run, kept next to its checkpoints (JSON lines, rank 0).

    A resumed run first drops the records after the checkpoint it resumed from (a crashed run logged steps that its
    checkpoint does not contain), then appends; so the file always describes the trajectory that led to the current
    weights, however many times the run was interrupted or rolled back, and the loss curve of a resumed run is whole.
    """

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        self._fh = None

    def truncate(self, step: int) -> None:
        """Keep the records of steps <= ``step`` (none for 0); written atomically."""
        if not self.enabled:
            return
        self.close()
        kept = [r for r in self.read() if r["step"] <= step] if step > 0 else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

    def append(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._fh is None:
            self._fh = self.path.open("a")
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def read(self) -> list[dict[str, float]]:
        if not self.enabled:
            return []
        self.close()
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut short by a crash: the rest is intact
                continue
        return out

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class NonFiniteTrainingError(RuntimeError):
    """Training kept producing non-finite losses or gradients even after rolling back; the message says what to try."""


@dataclass
class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) steps; asks for a rollback after ``max_consecutive_skips``.

    DeepSpeed already skips a step whose gradients are not finite (and lowers the fp16 loss scale); a run that keeps
    skipping is stuck, so it is rolled back to the last checkpoint, at most ``max_rollbacks`` times. (The public EVA
    code's equivalent path reloads a checkpoint it never saved.)
    """

    max_consecutive_skips: int
    max_rollbacks: int
    consecutive: int = 0
    rollbacks: int = 0

    def observe(self, applied: bool) -> bool:
        """Record one step; True when the caller must roll back now."""
        self.consecutive = 0 if applied else self.consecutive + 1
        if self.consecutive < self.max_consecutive_skips:
            return False
        if self.rollbacks >= self.max_rollbacks:
            raise NonFiniteTrainingError(
                f"{self.consecutive} consecutive non-finite steps after {self.rollbacks} rollback(s): training is "
                f"stuck. Lower pretrain.optimizer.lr, use precision bf16 instead of fp16, or check the inputs and "
                f"teacher targets for NaN/inf; the last good checkpoint is kept"
            )
        self.consecutive = 0
        self.rollbacks += 1
        return True


def _float(value: object) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def training_fingerprint(params: PretrainParams, num_items: int, target_dim: int, data_fingerprint: str = "") -> str:
    """What a checkpoint must agree with to be resumed: everything that shapes the trajectory.

    Where checkpoints go, how often, ``max_steps`` (a smoke-run cut-off) and validation do not change the trajectory.
    """
    shaping = params.model_dump(
        mode="json",
        exclude={
            "checkpoint",
            "max_steps",
            "log_every_steps",
            "mask_examples",
            "device",
            "distributed",
            "compile",
            "validation",  # evaluating draws nothing and updates nothing
        },
    )
    blob = json.dumps(
        {"params": shaping, "num_items": num_items, "target_dim": target_dim, "data": data_fingerprint}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
