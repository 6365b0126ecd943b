"""Checks that a run can succeed, done before anything runs or is written (Kedro-free).

A long job that dies after an hour because a file is missing is the worst outcome; one message that lists every
missing piece (data, teacher weights, GPU) and how to provide it is the best.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eva_pipeline.config import IngestionParams, PretrainParams, TeacherTargetsParams
from eva_pipeline.ingest import readers as _builtin_readers  # noqa: F401  (registers the built-in source kinds)
from eva_pipeline.ingest.scan import source_kinds
from eva_pipeline.masking import BlockMaskGenerator
from eva_pipeline.models import get_config
from eva_pipeline.teachers import TeacherWeightsUnavailable, check_teacher_weights


class PreflightError(RuntimeError):
    """The run cannot succeed; the message lists each problem and what to do about it."""


def check_sources(params: IngestionParams) -> list[str]:
    problems = []
    available = source_kinds()
    for i, source in enumerate(params.sources):
        where = f"ingestion.sources[{i}] ({source.name})"
        if source.kind not in available:
            problems.append(
                f"{where}: source kind '{source.kind}' has no reader in this version (available: "
                f"{', '.join(available)}); convert the data to an available kind or add a reader with "
                f"eva_pipeline.ingest.scan.register_source_kind"
            )
        for label, path in (("images", source.images), ("labels", source.labels)):
            if path is not None and not Path(path).exists():
                problems.append(
                    f"{where}: {label} path {path} does not exist; download/unpack the data set there or point "
                    f"ingestion.sources[{i}].{label} at it (conf/<env>/parameters_ingestion.yml)"
                )
    return problems


def check_teacher(params: TeacherTargetsParams) -> list[str]:
    try:
        check_teacher_weights(params.teacher.kind, **params.teacher.options)
    except TeacherWeightsUnavailable as exc:
        return [f"teacher_targets.teacher ({params.teacher.kind}): {exc}"]
    return []


def check_device(device: str, precision: str = "fp32", what: str = "pretrain") -> list[str]:
    has_cuda = torch.cuda.is_available()
    problems = []
    if device == "cuda" and not has_cuda:
        problems.append(
            f"{what}.device is 'cuda' but no CUDA GPU is visible to torch on this machine; run on a GPU machine "
            f"(see README 'Scaling out') or set {what}.device: cpu"
        )
    if precision == "fp16" and not has_cuda:
        problems.append(
            f"{what}.precision 'fp16' needs a CUDA GPU (DeepSpeed does not support fp16 on CPU); use a GPU machine "
            f"or set {what}.precision: fp32"
        )
    return problems


def check_world_size(params: PretrainParams) -> list[str]:
    """On GPUs, world_size ranks run one per GPU (CPU ranks, e.g. for tests, need no check)."""
    if params.world_size == 1 or params.device == "cpu" or params.distributed.hostfile is not None:
        return []
    gpus = torch.cuda.device_count()
    if gpus < params.world_size:
        return [
            f"pretrain.world_size is {params.world_size} (one process per GPU) but this machine has {gpus} GPU(s); "
            f"run across nodes with the DeepSpeed launcher and a hostfile (README 'Scaling out'), or lower "
            f"pretrain.world_size and keep pretrain.batch_size divisible by it"
        ]
    return []


def check_model(params: PretrainParams) -> list[str]:
    """The named model with its overrides, and the masking on that model's patch grid."""
    try:
        config = get_config(params.model.name, **params.model.overrides)
    except (KeyError, TypeError, ValueError) as exc:
        return [f"pretrain.model: {exc}"]
    m = params.masking
    try:
        BlockMaskGenerator(
            grid=(config.grid_size, config.grid_size),
            num_masking_patches=m.num_masking_patches,
            min_num_patches=m.min_num_patches,
            max_num_patches=m.max_num_patches,
            min_aspect=m.min_aspect,
        )
    except ValueError as exc:
        return [f"pretrain.masking (model {params.model.name}, {config.grid_size}x{config.grid_size} patches): {exc}"]
    return []


def check_augmentation(pretrain: PretrainParams, teacher: TeacherTargetsParams) -> list[str]:
    """Student and teacher must see the same view: stored targets of augmented training need stored crops."""
    if teacher.mode != "cached":
        return []
    if pretrain.augmentation.enabled and teacher.views_per_image == 0:
        return [
            "pretrain.augmentation.enabled with teacher_targets.mode: cached needs teacher_targets.views_per_image "
            ">= 1 (targets stored per augmented view, with its crop), or teacher_targets.mode: online"
        ]
    if not pretrain.augmentation.enabled and teacher.views_per_image > 0:
        return [
            f"teacher_targets.views_per_image is {teacher.views_per_image} but pretrain.augmentation.enabled is "
            "false: enable the augmentation the views are drawn with, or set views_per_image: 0"
        ]
    return []


def raise_if_problems(problems: list[str]) -> None:
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise PreflightError(f"the run cannot start, {len(problems)} problem(s) found before any work:\n{listing}")
