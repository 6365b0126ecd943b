"""Dry run of a configured pre-training run: build every object it would build, without data, weights or a GPU.

A run of the paper's recipe (``--env eva01``) needs Merged-30M, CLIP weights and 128 GPUs; a configuration mistake
that only shows when an object is built (a foreign teacher option, a grid mismatch, a batch that does not divide)
would otherwise surface after the data is in place and the cluster is booked. The dry run builds, in seconds on a
laptop: the student on the meta device, the teacher's architecture without weights (meta device), the optimiser's
parameter groups, the LR schedule for the given number of images, the loader's plan (step 0's global batch and
masks by random access), the validation plan and the DeepSpeed config; then it lists what a real run still lacks
(the pre-flight check's problems). Kedro-free: ``eva_pipeline.cli`` feeds it the merged parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from eva_pipeline import preflight
from eva_pipeline.config import IngestionParams, PretrainParams, TeacherTargetsParams
from eva_pipeline.loader.batches import batch_masks
from eva_pipeline.teachers import create_teacher_skeleton
from eva_pipeline.training.engine import deepspeed_config
from eva_pipeline.training.recipe import make_optimizer, make_plan, make_schedule, make_student
from eva_pipeline.training.validation import validation_mask

#: Sample indices of step 0 shown in the report.
_SHOWN_INDICES = 8


class _NoPixels:
    """Stands in for the images in a dry run: the loader plan needs only their number."""

    def __init__(self, num_images: int) -> None:
        self.num_images = num_images

    def __len__(self) -> int:
        return self.num_images

    def __call__(self, indices: np.ndarray) -> list[torch.Tensor]:
        raise RuntimeError("a dry run reads no pixels")


@dataclass
class DryRunReport:
    """What the run would build and do: ``facts`` (numbers, for tests and tools), ``sections`` (for people), and
    ``missing`` (what a real run still lacks on this machine: data, weights, GPUs)."""

    facts: dict[str, Any] = field(default_factory=dict)
    sections: list[tuple[str, list[str]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def add(self, title: str, *lines: str) -> None:
        self.sections.append((title, list(lines)))

    def render(self) -> str:
        out = []
        for title, lines in self.sections:
            out.append(f"{title}:")
            out.extend(f"  {line}" for line in lines)
        if self.missing:
            out.append(
                f"A real run would stop at the pre-flight check ({len(self.missing)} problem(s) on this machine):"
            )
            out.extend(f"  - {problem}" for problem in self.missing)
        else:
            out.append("Nothing missing on this machine: the run can start.")
        return "\n".join(out)


def dry_run(
    ingestion: IngestionParams,
    teacher_targets: TeacherTargetsParams,
    pretrain: PretrainParams,
    num_images: int,
    nodes: Iterable[Any] | None = None,
) -> DryRunReport:
    """Build every object of the pre-training run for ``num_images`` pre-training images; raise on the first that
    cannot be built (the exception says which), return the report otherwise.

    ``nodes``: the nodes of the pipeline the run would run (``eva_pipeline.cli`` passes ``pretrain``'s): what this
    machine lacks is found by the pre-flight checks they need (:func:`eva_pipeline.preflight.select_checks`, the
    hook's selection); None: every check."""
    if num_images < pretrain.batch_size:
        raise ValueError(f"num_images {num_images} is smaller than one global batch ({pretrain.batch_size})")
    report = DryRunReport()
    teacher = teacher_targets.teacher
    skeleton = create_teacher_skeleton(teacher.kind, **teacher.options)
    with torch.device("meta"):
        student = make_student(pretrain, skeleton.target_dim)
    config = student.config
    grid = (config.grid_size, config.grid_size)
    input_size = skeleton.input_size(grid)  # raises when the teacher's grid cannot match the student's
    _student(report, pretrain, student)
    _teacher(report, teacher_targets, skeleton, input_size)
    _optimizer(report, pretrain, student)
    steps_per_epoch = _schedule(report, pretrain, num_images)
    _loader(report, pretrain, config, num_images, steps_per_epoch)
    _validation(report, teacher_targets, pretrain, config.num_patches)
    ds = deepspeed_config(pretrain, pretrain.world_size)
    report.facts["deepspeed"] = ds
    report.add("DeepSpeed config (per rank)", *[f"{k}: {v}" for k, v in ds.items()])
    checks = preflight.CHECKS if nodes is None else preflight.select_checks(nodes)
    blocks = {"ingestion": ingestion, "teacher_targets": teacher_targets, "pretrain": pretrain}
    report.missing = preflight.run_checks(checks, blocks.__getitem__)
    return report


def _student(report: DryRunReport, params: PretrainParams, student: torch.nn.Module) -> None:
    c = student.config
    count = sum(p.numel() for p in student.parameters())
    report.facts["student_parameters"] = count
    report.add(
        f"Student {params.model.name} (built on the meta device)",
        f"{count:,} parameters; {c.img_size} px, patch {c.patch_size} -> {c.grid_size}x{c.grid_size} patches",
        f"width {c.embed_dim}, depth {c.depth}, heads {c.num_heads}, MLP {c.mlp_hidden_dim}, "
        f"drop path {c.drop_path_rate}, attention {c.attn_impl}, lm_head -> {c.target_dim}",
    )


def _teacher(report: DryRunReport, params: TeacherTargetsParams, skeleton: Any, input_size: tuple[int, int]) -> None:
    count = sum(p.numel() for p in skeleton.parameters())
    report.facts.update(teacher_parameters=count, target_dim=skeleton.target_dim)
    options = ", ".join(f"{k}={v}" for k, v in params.teacher.options.items())
    report.add(
        f"Teacher {params.teacher.kind} (architecture only, no weights)",
        f"{options}",
        f"{count:,} parameters; input {input_size[0]}x{input_size[1]}, {skeleton.target_dim}-d target per patch",
        f"mode {params.mode}: "
        + (
            "run in every training step"
            if params.mode == "online"
            else f"targets stored once ({max(params.views_per_image, 1)} view(s) per image)"
        ),
    )


def _optimizer(report: DryRunReport, params: PretrainParams, student: torch.nn.Module) -> None:
    optimizer = make_optimizer(student, params)  # on meta parameters: no state is allocated before a step
    decayed = sum(p.numel() for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"])
    total = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    report.facts.update(decayed_parameters=decayed, not_decayed_parameters=total - decayed)
    o = params.optimizer
    report.add(
        "Optimiser",
        f"AdamW lr {o.lr:g} (min {o.min_lr:g}), betas {tuple(o.betas)}, eps {o.eps:g}, "
        f"weight decay {o.weight_decay:g}, clip {o.clip_grad}",
        f"{len(optimizer.param_groups)} groups: {decayed:,} parameters decayed, {total - decayed:,} not "
        "(1-D, biases, pos_embed, cls_token; mask_token is decayed)",
    )


def _schedule(report: DryRunReport, params: PretrainParams, num_images: int) -> int:
    steps_per_epoch = num_images // params.batch_size
    schedule = make_schedule(params, steps_per_epoch)
    last = min(schedule.total_steps, params.max_steps or schedule.total_steps)
    report.facts.update(
        num_images=num_images,
        steps_per_epoch=steps_per_epoch,
        total_steps=schedule.total_steps,
        warmup_steps=schedule.warmup_steps,
        last_step=last,
    )
    peak = schedule(schedule.warmup_steps)
    report.add(
        "Schedule",
        f"{num_images:,} images / global batch {params.batch_size} = {steps_per_epoch:,} steps per epoch "
        f"x {params.epochs} epochs = {schedule.total_steps:,} steps"
        + (f" (stops at {last:,})" if last < schedule.total_steps else ""),
        f"LR: 0 -> {peak:g} over {schedule.warmup_steps:,} warmup steps, "
        f"cosine to {schedule(schedule.total_steps - 1):g}",
    )
    return steps_per_epoch


def _loader(report: DryRunReport, params: PretrainParams, config: Any, num_images: int, steps_per_epoch: int) -> None:
    plan = make_plan(params, _NoPixels(num_images), config.img_size, config.grid_size, 0, params.world_size)
    first = plan.order.indices(0, 0, params.batch_size)
    masks = batch_masks(plan.masker, params.seed, 0, first)
    masked = masks.sum(dim=1).float()
    report.facts.update(micro_batch=plan.micro, view_mode=plan.view_mode, mean_masked=float(masked.mean()))
    report.add(
        "Loader",
        f"{params.world_size} rank(s) x {plan.micro} images per step, {params.loader.num_workers} worker(s) per rank; "
        f"views: {plan.view_mode}; every epoch a uniform permutation of the {num_images:,} images",
        f"step 0 (built by random access): samples {first[:_SHOWN_INDICES].tolist()} ...",
        f"block masks on {config.grid_size}x{config.grid_size}: {float(masked.mean()):.2f} of "
        f"{config.num_patches} patches masked on average (target {params.masking.num_masking_patches})",
        f"{steps_per_epoch:,} steps per epoch; resume and rollback rebuild any step's batch exactly",
    )


def _validation(report: DryRunReport, targets: TeacherTargetsParams, params: PretrainParams, num_patches: int) -> None:
    v = targets.validation
    if v.num_images == 0:
        report.add("Validation", "off (teacher_targets.validation.num_images: 0)")
        return
    tokens = int(validation_mask(num_patches).sum())
    report.facts["validation_masked_tokens"] = tokens
    report.add(
        "Validation (held-out MIM loss, pretrain/val_loss)",
        f"up to {v.num_images:,} evenly spaced '{v.split}' images, fixed mask of every other token ({tokens} of "
        f"{num_patches}), every {params.validation.every_steps:,} steps and after the last",
    )
