"""Dry run of a configured pre-training run: build every object it would build, without data, weights or a GPU.

A run of the paper's recipe (``--env eva01``) needs Merged-30M, CLIP weights and 128 GPUs; a configuration mistake
that only shows when an object is built (a foreign teacher option, a grid mismatch, a batch that does not divide)
would otherwise surface after the data is in place and the cluster is booked. The dry run builds, in seconds on a
laptop: the student on the meta device, the teacher's architecture without weights (meta device), the optimiser's
parameter groups, the LR schedule for the given number of images, the loader's plan (step 0's global batch and
masks by random access), the validation plan and the DeepSpeed config; then it lists what a real run still lacks
(the pre-flight check's problems). Kedro-free: ``eva_pipeline.cli`` feeds it the merged parameters.

The image fine-tune stages the same way (:func:`dry_run_finetune`): each stage's classifier at full size on the meta
device (EVA-g/14 with the 21,841-class head at 224 px; at 336 px with 1,000 classes), its layer-decay groups, the
schedule for the stage's image count, the mixing and loss, the EMA decay, the pos_embed grid change from its start
weights, the train/eval transforms, the DeepSpeed config and the fine-tune nodes' pre-flight problems.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from eva_pipeline import preflight
from eva_pipeline.config import (
    ClassificationEvalParams,
    FinetuneParams,
    IngestionParams,
    PretrainParams,
    TargetFinetuneParams,
    TargetVideoFinetuneParams,
    TeacherTargetsParams,
    VideoEvalParams,
    VideoFinetuneParams,
    VideoIngestionParams,
)
from eva_pipeline.finetune import eval_transform, train_transform
from eva_pipeline.finetune import recipe as finetune_recipe
from eva_pipeline.finetune.data import ClassNames, label_budget, stage_classes, stage_labels
from eva_pipeline.finetune.video import make_video_classifier
from eva_pipeline.loader.batches import batch_masks
from eva_pipeline.models import get_config
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
    hook's selection); None: every check of pre-training."""
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
    stages = (preflight.FINETUNE, preflight.CLASSIFICATION, preflight.VIDEO_SOURCES)  # other dry runs' checks
    checks = [c for c in preflight.CHECKS if c not in stages] if nodes is None else preflight.select_checks(nodes)
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


# ------------------------------------------------------------------------------------------------ fine-tuning
#: The stage whose classifier the target stage's ``intermediate`` run starts from.
INTERMEDIATE_STAGE = "finetune_intermediate"
#: EVA-01's data of each stage, ``(images, classes)``, when neither the command's options nor a manifest give them:
#: ImageNet-21K (fall11 release) and the ImageNet-1K training set.
EVA01_STAGE_DATA: dict[str, tuple[int, int]] = {
    "finetune_intermediate": (14_197_122, 21_841),
    "finetune": (1_281_167, 1_000),
}


@dataclass(frozen=True)
class StageData:
    """The images (after the label budget) and classes a fine-tune stage trains on; ``origin`` says whence."""

    images: int
    classes: int
    origin: str


def stage_data(rows: pd.DataFrame, class_names: ClassNames, params: FinetuneParams) -> StageData:
    """A stage's counts from the manifest's ``source``/``label`` columns and ingestion's class names, as its node
    selects the images (the stage's classes by name, ``per_class`` of each)."""
    classes = stage_classes(class_names, params.data.sources)
    rows = rows[rows["source"].isin(params.data.sources)]
    labels = stage_labels(rows, class_names, classes)
    return StageData(len(label_budget(labels, params.data.per_class)), len(classes), "manifest")


def dry_run_finetune(
    ingestion: IngestionParams,
    pretrain: PretrainParams,
    stages: Mapping[str, FinetuneParams],
    data: Mapping[str, StageData],
    classification: ClassificationEvalParams | None = None,
    nodes: Iterable[Any] | None = None,
) -> DryRunReport:
    """Build every object of the fine-tune ``stages`` (``{block: params}``, in order) for the images and classes
    in ``data``; raise on the first that cannot be built, return the report otherwise.

    ``nodes``: the fine-tune (and scoring) nodes a run would run, whose pre-flight checks list what this machine
    lacks (:func:`eva_pipeline.preflight.select_checks` and ``finetune_blocks``, the hook's selection); None: the
    fine-tune checks of every stage given, and the classification checks when ``classification`` is given."""
    report = DryRunReport()
    student = get_config(pretrain.model.name, **pretrain.model.overrides)
    for name, params in stages.items():
        starts: dict[str, int | None] = {"student": student.grid_size}
        if isinstance(params, TargetFinetuneParams):
            intermediate = stages.get(INTERMEDIATE_STAGE)
            grids = {
                "intermediate": None if intermediate is None else intermediate.img_size // student.patch_size,
                "student": student.grid_size,
                "random": None,
            }
            starts = {run: grids[run] for run in params.runs}
        _stage(report, name, params, pretrain, data[name], starts)
    if classification is not None:
        _classification(report, classification)
    if nodes is None:
        checks = [preflight.FINETUNE] + ([preflight.CLASSIFICATION] if classification is not None else [])
        finetune = list(stages)
    else:
        nodes = list(nodes)
        checks = preflight.select_checks(nodes)
        if classification is None:
            checks = [c for c in checks if c != preflight.CLASSIFICATION]
        finetune = [block for block in preflight.finetune_blocks(nodes) if block in stages]
    blocks = {"ingestion": ingestion, "pretrain": pretrain, **stages, preflight.CLASSIFICATION_BLOCK: classification}
    report.missing = preflight.run_checks(checks, blocks.__getitem__, finetune=finetune)
    return report


_START = {
    "student": "the pre-trained student (eva_student; fresh fc_norm and head)",
    "intermediate": f"{INTERMEDIATE_STAGE}'s classifier (eva_intermediate, its EMA when kept)",
    "random": "random init (no start weights)",
}


def _stage(
    report: DryRunReport,
    name: str,
    params: FinetuneParams,
    pretrain: PretrainParams,
    data: StageData,
    starts: Mapping[str, int | None],
) -> None:
    with torch.device("meta"):
        model = finetune_recipe.make_classifier(params, pretrain.model, data.classes)
        model.set_grad_checkpointing(params.grad_checkpointing)
        optimizer = finetune_recipe.make_optimizer(model, params)  # meta parameters: no state before a step
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    groups = optimizer.param_groups
    scales = sorted({g["lr_scale"] for g in groups})
    decayed = sum(p.numel() for g in groups if g["weight_decay"] > 0 for p in g["params"])
    steps = finetune_recipe.steps_per_epoch(params, data.images)
    schedule = finetune_recipe.make_schedule(params, steps)
    last = min(schedule.total_steps, params.max_steps or schedule.total_steps)
    mixer, loss = finetune_recipe.make_mixing(params, data.classes)
    decay = finetune_recipe.ema_decay(params, schedule.total_steps)
    a = params.augmentation
    train_transform(params.img_size, a.scale, auto_augment=a.auto_augment, hflip=a.hflip, re_prob=a.re_prob)
    eval_transform(params.img_size, params.crop_pct)
    ds = deepspeed_config(params, params.world_size)
    report.facts[name] = {
        "classifier_parameters": total,
        "trained_parameters": trained,
        "num_classes": data.classes,
        "num_images": data.images,
        "grid": c.grid_size,
        "start_grids": dict(starts),
        "param_groups": len(groups),
        "layer_scales": (scales[0], scales[-1]),
        "num_layer_scales": len(scales),
        "decayed_parameters": decayed,
        "steps_per_epoch": steps,
        "total_steps": schedule.total_steps,
        "warmup_steps": schedule.warmup_steps,
        "last_step": last,
        "mixing": None if mixer is None else type(mixer).__name__,
        "loss": type(loss).__name__,
        "ema_decay": decay,
        "deepspeed": ds,
    }
    g = c.grid_size
    report.add(
        f"{name}: classifier {pretrain.model.name} (built on the meta device)",
        f"{total:,} parameters, {trained:,} trained (patch embedding "
        f"{'frozen' if params.freeze_patch_embed else 'trained'}); {c.img_size} px, patch {c.patch_size} -> {g}x{g} "
        f"patches; {data.classes:,} classes",
        f"drop path {params.drop_path_rate}, activation checkpointing {'on' if params.grad_checkpointing else 'off'}, "
        f"attention {c.attn_impl}; mean-pooled patch tokens -> fc_norm -> head",
        *[_start_line(run, grid, g, params, len(starts) > 1) for run, grid in starts.items()],
    )
    report.add(
        f"{name}: data and augmentation",
        f"{data.images:,} images of {data.classes:,} classes ({data.origin}) from {', '.join(params.data.sources)}"
        + (f"; label budget {params.data.per_class} per class" if params.data.per_class else ""),
        f"train: RandomResizedCrop {params.img_size} scale {tuple(a.scale)} bicubic, flip {a.hflip}, RandAugment "
        f"{a.auto_augment}, random erasing {a.re_prob}; eval: resize {round(params.img_size / params.crop_pct)}, "
        f"centre crop {params.img_size} (both built)",
    )
    o = params.optimizer
    embeddings = "cls_token, pos_embed" + ("" if params.freeze_patch_embed else ", patch embedding")
    report.add(
        f"{name}: optimiser",
        f"AdamW lr {o.lr:g} (warmup from {o.warmup_lr:g}, min {o.min_lr:g}), betas {tuple(o.betas)}, eps {o.eps:g}, "
        f"weight decay {o.weight_decay:g}, clip {o.clip_grad}",
        f"layer decay {o.layer_decay}: {len(scales)} layer scales in {len(groups)} groups, LR x {scales[0]:.4g} "
        f"({embeddings}) .. x {scales[-1]:g} (fc_norm, head); {decayed:,} parameters "
        f"decayed, {trained - decayed:,} not (1-D, biases, pos_embed, cls_token), {total - trained:,} frozen",
    )
    report.add(
        f"{name}: schedule",
        f"{data.images:,} images / global batch {params.batch_size} = {steps:,} steps per epoch x {params.epochs} "
        f"epochs = {schedule.total_steps:,} steps" + (f" (stops at {last:,})" if last < schedule.total_steps else ""),
        f"LR: {schedule(0):g} -> {schedule(schedule.warmup_steps):g} over {schedule.warmup_steps:,} warmup steps, "
        f"cosine to {schedule.final_value:g}",
    )
    report.add(f"{name}: loss, EMA, validation", *_loss_lines(params, mixer, loss, decay, schedule.total_steps))
    report.add(f"{name}: DeepSpeed config (per rank)", *[f"{k}: {v}" for k, v in ds.items()])


def _start_line(run: str, grid: int | None, stage_grid: int, params: FinetuneParams, several: bool) -> str:
    """Where a run's weights come from and what happens to pos_embed and the head."""
    label = f"run {run}" if several else "start"
    if grid is None and run == "random":
        return f"{label}: {_START[run]}"
    if grid is None:
        return f"{label}: {_START[run]} (that stage is not configured here)"
    change = "as is" if grid == stage_grid else "resampled bicubically"
    head = ""
    if run == "intermediate":
        head = "; head rows taken by class name" if params.head == "by_name" else "; head re-initialised"
    return f"{label}: {_START[run]}: pos_embed {grid}x{grid} -> {stage_grid}x{stage_grid} {change}{head}"


def _loss_lines(params: FinetuneParams, mixer: Any, loss: Any, decay: float | None, total_steps: int) -> list[str]:
    m, lines = params.mixing, []
    if mixer is None:
        smoothing = f"label smoothing {m.label_smoothing}" if m.label_smoothing else "no label smoothing"
        lines.append(f"no CutMix/Mixup, {smoothing}: {type(loss).__name__}")
    else:
        lines.append(
            f"CutMix {m.cutmix_alpha:g} / Mixup {m.mixup_alpha:g} per batch (image i with B-1-i), targets smoothed by "
            f"{m.label_smoothing}: {type(loss).__name__}"
        )
    if decay is None:
        lines.append("EMA: none")
    else:
        window = round(1 / (1 - decay)) if decay < 1 else total_steps
        lines.append(
            f"EMA decay {decay:g} (averages ~{window:,} of the run's {total_steps:,} steps), fp32, after every "
            "applied step; the handed-on weights are the EMA"
        )
    v = params.validation
    if v.sources:
        lines.append(
            f"validation: up to {v.num_images:,} evenly spaced images of {', '.join(v.sources)}, top-1 (and the "
            f"EMA's) every {v.every_steps:,} steps and after the last"
        )
    else:
        lines.append("validation: none during training")
    return lines


def _classification(report: DryRunReport, params: ClassificationEvalParams) -> None:
    lines = [
        f"target {params.target}; {len(params.sets)} sets, "
        f"{'every image' if params.max_images is None else f'up to {params.max_images:,} images'} of each, "
        f"{'EMA weights where kept' if params.use_ema else 'trained weights'}, batch {params.batch_size}"
    ]
    for s in params.sets:
        flags = [
            *(["ReaL labels " + str(s.real_labels)] if s.real_labels else []),
            *(["scored over its own classes"] if s.score_over_set_classes else []),
            *(["class map " + str(s.class_map)] if s.class_map else []),
            *(["not in the robustness average"] if not s.in_average else []),
            *([f"rendition {s.rendition}"] if s.rendition != "none" else []),
            *(["natural-adversarial selection"] if s.natural_adversarial else []),
        ]
        lines.append(f"{s.name} ({s.kind}): {', '.join(s.sources)}" + (f"; {'; '.join(flags)}" if flags else ""))
    report.facts["classification_sets"] = [s.name for s in params.sets]
    report.add("Classification table (classification_eval)", *lines)


# ------------------------------------------------------------------------------------------------ video stages
#: EVA-01's video data when neither the options nor a clip manifest give it, ``(training clips, classes)``: the
#: Kinetics-722 union (0.63M clips) and the K400/K600/K700 training sets.
EVA01_VIDEO_DATA: dict[str, tuple[int, int]] = {
    "k722": (630_000, 722),
    "k400": (240_436, 400),
    "k600": (392_622, 600),
    "k700": (545_317, 700),
}


def dry_run_video(
    pretrain: PretrainParams,
    stages: Mapping[str, VideoFinetuneParams],
    data: Mapping[str, StageData],
    evaluation: VideoEvalParams | None = None,
    ingestion: VideoIngestionParams | None = None,
) -> DryRunReport:
    """Build the space-time classifier of each video stage at full size on the meta device (inflated Conv3d patch
    embedding, T x N tokens), its layer-decayed optimiser, schedule and mixing for the clips and classes of ``data``
    (``{dataset: StageData}``: ``data.dataset`` of the K722 stage, each ``targets`` version of the target stage);
    raise on the first object that cannot be built, return the report otherwise. What this machine lacks for them
    (and for ``ingestion``'s Kinetics folders) is listed by the pre-flight checks."""
    report = DryRunReport()
    for name, params in stages.items():
        datasets = params.targets if isinstance(params, TargetVideoFinetuneParams) else [params.data.dataset]
        for dataset in datasets:
            counts = data[dataset]
            epochs = params.epochs_per_target.get(dataset, params.epochs) if isinstance(
                params, TargetVideoFinetuneParams) else params.epochs  # fmt: skip
            stage = params.model_copy(update={"epochs": epochs})
            with torch.device("meta"):
                model = make_video_classifier(stage, pretrain.model, counts.classes)
                model.set_grad_checkpointing(stage.grad_checkpointing)
                optimizer = finetune_recipe.make_optimizer(model, stage)
            steps = finetune_recipe.steps_per_epoch(stage, counts.images)
            schedule = finetune_recipe.make_schedule(stage, steps)
            mixer, loss = finetune_recipe.make_mixing(stage, counts.classes)
            c = model.config
            total = sum(p.numel() for p in model.parameters())
            tokens = model.temporal_size * model.num_patches_per_frame
            scales = sorted({g["lr_scale"] for g in optimizer.param_groups})
            key = f"{name}/{dataset}"
            report.facts[key] = {
                "classifier_parameters": total,
                "num_classes": counts.classes,
                "num_clips": counts.images,
                "tokens": tokens,
                "patch_embed_shape": tuple(model.patch_embed.proj.weight.shape),
                "steps_per_epoch": steps,
                "total_steps": schedule.total_steps,
                "layer_scales": (scales[0], scales[-1]),
                "mixing": None if mixer is None else type(mixer).__name__,
                "loss": type(loss).__name__,
                "deepspeed": deepspeed_config(stage, stage.world_size),
            }
            m, o = stage.mixing, stage.optimizer
            report.add(
                f"{key}: space-time classifier {pretrain.model.name} (built on the meta device)",
                f"{total:,} parameters; {stage.num_frames} frames x {c.img_size} px, tubelet {stage.tubelet}, patch "
                f"{c.patch_size}: {tokens:,} tokens + cls in one joint attention ({c.attn_impl}); Conv3d kernel "
                f"{tuple(model.patch_embed.proj.weight.shape)} ({'frozen' if stage.freeze_patch_embed else 'trained'})",
                f"{counts.images:,} clips of {counts.classes:,} classes ({counts.origin}); {steps:,} steps per epoch x "
                f"{epochs} epochs = {schedule.total_steps:,} steps of global batch {stage.batch_size}",
                f"AdamW lr {o.lr:g} (min {o.min_lr:g}), layer decay {o.layer_decay}: LR x {scales[0]:.4g} .. x "
                f"{scales[-1]:g}; drop path {stage.drop_path_rate}; "
                + ("no mixing" if mixer is None else f"Mixup {m.mixup_alpha:g} / CutMix {m.cutmix_alpha:g} on clips")
                + f", label smoothing {m.label_smoothing}: {type(loss).__name__}",
            )
    if evaluation is not None:
        report.add(
            "video_eval",
            f"{evaluation.num_clips} temporal clips x {evaluation.num_crops} spatial crops per clip "
            f"({evaluation.num_clips * evaluation.num_crops} views, per-view softmax averaged) against the 1x1 view; "
            f"{'EMA weights where kept' if evaluation.use_ema else 'trained weights'}",
        )
    checks = [preflight.FINETUNE] + ([preflight.VIDEO_SOURCES] if ingestion is not None else [])
    blocks = {"pretrain": pretrain, "video_ingestion": ingestion, **stages}
    report.missing = preflight.run_checks(checks, blocks.__getitem__, finetune=list(stages))
    return report
