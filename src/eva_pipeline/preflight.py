"""Checks that a run can succeed, done before anything runs or is written, and which checks a run needs.

A long job that dies after an hour because a file is missing is the worst outcome; one message that lists every
missing piece (data, teacher weights, GPU) and how to provide it is the best.

Which checks: :func:`select_checks` maps the nodes of the pipeline about to run to them, by what the nodes declare
(their tags: :data:`SOURCES`, :data:`TEACHER`, :data:`TRAINING`, :data:`FINETUNE`, :data:`CLASSIFICATION`) and the
datasets they consume, never by their names; a fine-tune node names its stage by the ``params:<block>`` it reads
(:func:`finetune_blocks`). The pre-flight hook (``eva_pipeline.hooks``) and the dry run (``eva_pipeline.dry_run``)
both use them, and :func:`run_checks` runs the selected checks. No Kedro import: a node is anything with ``tags``,
``inputs`` and ``outputs``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from eva_pipeline.config import (
    ClassificationEvalParams,
    EngineParams,
    FinetuneParams,
    IngestionParams,
    PretrainParams,
    TeacherTargetsParams,
    VideoFinetuneParams,
    VideoIngestionParams,
)
from eva_pipeline.ingest import readers as _builtin_readers  # noqa: F401  (registers the built-in source kinds)
from eva_pipeline.ingest.scan import source_kinds
from eva_pipeline.manifest import HELD_OUT_SPLITS
from eva_pipeline.masking import BlockMaskGenerator
from eva_pipeline.models import check_img_size, get_config
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


def check_world_size(params: EngineParams, name: str = "pretrain") -> list[str]:
    """On GPUs, world_size ranks run one per GPU (CPU ranks, e.g. for tests, need no check); ``name``: the block."""
    if params.world_size == 1 or params.device == "cpu" or params.distributed.hostfile is not None:
        return []
    gpus = torch.cuda.device_count()
    if gpus < params.world_size:
        return [
            f"{name}.world_size is {params.world_size} (one process per GPU) but this machine has {gpus} GPU(s); "
            f"run across nodes with the DeepSpeed launcher and a hostfile (README 'Scaling out'), or lower "
            f"{name}.world_size and keep {name}.batch_size divisible by it"
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


#: The ReaL labels as timm ships them (``timm/data/_info/``), for the message that says where to copy them from.
_TIMM_REAL_LABELS = "imagenet_real_labels.json"


def _unknown_sources(where: str, names: Sequence[str], ingestion: IngestionParams) -> list[str]:
    known = [s.name for s in ingestion.sources]
    return [
        f"{where}: '{name}' is not an ingestion source (ingestion.sources: {', '.join(known)}); add it to "
        f"conf/<env>/parameters_ingestion.yml or correct the name"
        for name in names
        if name not in known
    ]


def check_finetune(
    name: str, params: FinetuneParams, ingestion: IngestionParams, pretrain: PretrainParams
) -> list[str]:
    """One fine-tune stage (``name``: its parameter block): its sources are ingested and trained ones not held out,
    the student's patch divides its image size, its device and precision exist here, and it runs on one rank."""
    problems = _unknown_sources(f"{name}.data.sources", params.data.sources, ingestion)
    problems += _unknown_sources(f"{name}.validation.sources", params.validation.sources, ingestion)
    split = {s.name: s.split for s in ingestion.sources}
    problems += [
        f"{name}.data.sources: '{source}' is held out (ingestion split '{split[source]}'): its images score the "
        f"probe and the classification table and are never trained on; train on a 'pretrain' or 'finetune' source"
        for source in params.data.sources
        if split.get(source) in HELD_OUT_SPLITS
    ]
    try:
        check_img_size(pretrain.model.name, pretrain.model.overrides, params.img_size)
    except ValueError as exc:  # UnknownModelError included
        problems.append(f"{name}.img_size (student pretrain.model): {exc}")
    problems += check_device(params.device, params.precision, name)
    problems += check_world_size(params, name)
    return problems


def check_video_sources(params: VideoIngestionParams) -> list[str]:
    """Every Kinetics version's annotation and clip folders exist (those the demo's generator writes are skipped), and
    the generator's images do."""
    problems = []
    generated = None if params.synthetic is None else Path(params.synthetic.out_dir).resolve()
    for i, version in enumerate(params.versions):
        for label, path in (("annotations", version.annotations), ("clips", version.clips)):
            if generated is not None and Path(path).resolve().is_relative_to(generated):
                continue
            if not Path(path).exists():
                problems.append(
                    f"video_ingestion.versions[{i}] ({version.name}): {label} folder {path} does not exist; put the "
                    f"Kinetics {'annotation CSVs (train.csv, validate.csv)' if label == 'annotations' else 'clips'} "
                    f"there or point video_ingestion.versions[{i}].{label} at them "
                    "(conf/<env>/parameters_video_ingestion.yml)"
                )
    if params.synthetic is not None:
        s = params.synthetic
        for label, path in (("train_images", s.train_images), ("train_labels", s.train_labels),
                            ("test_images", s.test_images), ("test_labels", s.test_labels)):  # fmt: skip
            if not Path(path).exists():
                problems.append(f"video_ingestion.synthetic.{label}: {path} does not exist (the embedded data)")
    return problems


def check_video_finetune(name: str, params: VideoFinetuneParams, pretrain: PretrainParams) -> list[str]:
    """A video stage: the student's patch divides its image size, its device and precision exist here, and its ranks
    have their GPUs."""
    problems = []
    try:
        check_img_size(pretrain.model.name, pretrain.model.overrides, params.img_size)
    except ValueError as exc:
        problems.append(f"{name}.img_size (student pretrain.model): {exc}")
    problems += check_device(params.device, params.precision, name)
    problems += check_world_size(params, name)
    return problems


def check_classification(params: ClassificationEvalParams, ingestion: IngestionParams) -> list[str]:
    """The evaluation sets' sources (and the reference classifier's) are ingested, their label files exist. That the
    target is one of the sets, the parameter model itself checks."""
    problems = []
    for i, s in enumerate(params.sets):
        where = f"classification_eval.sets[{i}] ({s.name})"
        problems += _unknown_sources(f"{where}.sources", s.sources, ingestion)
        if s.real_labels is not None and not Path(s.real_labels).exists():
            problems.append(
                f"{where}.real_labels: {s.real_labels} does not exist; timm ships the ReaL labels: copy "
                f"{_timm_real_labels()} there (or real.json from github.com/google-research/reassessed-imagenet), "
                f"or point real_labels at the file"
            )
        if s.class_map is not None and not Path(s.class_map).exists():
            problems.append(
                f"{where}.class_map: {s.class_map} does not exist; write the JSON {{set class: [model classes]}} "
                "there (ObjectNet: from the mappings/ folder of the ObjectNet download, folder_to_objectnet_label.json "
                "and objectnet_to_imagenet_1k.json, with IN-1K wnids as the model classes; conf/eva01/README.md), or "
                "point class_map at it"
            )
    problems += _unknown_sources("classification_eval.reference_sources", params.reference_sources, ingestion)
    return problems


def _timm_real_labels() -> str:
    from importlib import resources

    return str(resources.files("timm.data") / "_info" / _TIMM_REAL_LABELS)


# ------------------------------------------------------------------------------------------------ which checks
#: Node tag: the node reads the configured image sources (their paths and kinds are checked).
SOURCES = "preflight.sources"
#: Node tag: the node trains the student (model and masking, device and precision, ranks, views; with
#: ``teacher_targets.mode: online`` also the teacher it runs in every step).
TRAINING = "preflight.training"
#: Node tag: the node runs the teacher (its weights and device are checked).
TEACHER = "preflight.teacher"
#: Node tag: the node fine-tunes the student (its stage block, named by the ``params:<block>`` it reads, is checked:
#: sources, image size on the student's patch, device and precision, ranks).
FINETUNE = "preflight.finetune"
#: Node tag: the node scores classifiers on the ``classification_eval`` sets (their sources and label files).
CLASSIFICATION = "preflight.classification"
#: Node tag: the node reads the Kinetics versions of ``video_ingestion`` (their folders are checked).
VIDEO_SOURCES = "preflight.video_sources"
#: Selected when a run reads the stored ``student_config`` without the node that writes it: ``--params pretrain.*``
#: would not reach it (the overrides are refused, naming the pipeline to add).
STORED_STUDENT_CONFIG = "stored_student_config"
#: Every check, in the order its problems are listed.
CHECKS: tuple[str, ...] = (SOURCES, VIDEO_SOURCES, TRAINING, TEACHER, FINETUNE, CLASSIFICATION, STORED_STUDENT_CONFIG)
#: The dataset that holds the resolved ``pretrain`` block (written by the student_config pipeline).
STUDENT_CONFIG_DATASET = "student_config"
#: The image fine-tune stages' blocks, checked when no nodes say which (the dry run's every check).
FINETUNE_BLOCKS: tuple[str, ...] = ("finetune_intermediate", "finetune")
#: The video fine-tune stages' blocks (the video dry run's).
VIDEO_FINETUNE_BLOCKS: tuple[str, ...] = ("finetune_video_intermediate", "finetune_video")
#: The block the :data:`CLASSIFICATION` nodes read.
CLASSIFICATION_BLOCK = "classification_eval"
_PARAMS = "params:"


def select_checks(nodes: Iterable[Any]) -> list[str]:
    """The checks the ``nodes`` about to run need, in :data:`CHECKS` order: one per tag the nodes carry, plus
    :data:`STORED_STUDENT_CONFIG` when they consume the ``student_config`` dataset without producing it. Renaming
    a node changes nothing; a pipeline slice (``--pipelines evaluation``, ``--from-nodes``) gets exactly its nodes'."""
    nodes = list(nodes)
    tags = {tag for node in nodes for tag in node.tags}
    consumed = {name for node in nodes for name in node.inputs}
    produced = {name for node in nodes for name in node.outputs}
    selected = {check for check in CHECKS if check in tags}
    if STUDENT_CONFIG_DATASET in consumed - produced:
        selected.add(STORED_STUDENT_CONFIG)
    return [check for check in CHECKS if check in selected]


def finetune_blocks(nodes: Iterable[Any]) -> list[str]:
    """The stage blocks the :data:`FINETUNE` nodes read (their ``params:<block>`` inputs), in node order: what
    :data:`FINETUNE` checks for these nodes (``--pipelines finetune`` checks ``finetune`` alone)."""
    blocks = [
        name.removeprefix(_PARAMS)
        for node in nodes
        if FINETUNE in node.tags
        for name in node.inputs
        if name.startswith(_PARAMS)
    ]
    return list(dict.fromkeys(blocks))


def run_checks(
    checks: Iterable[str],
    block: Callable[[str], Any],
    runtime_params: Mapping[str, Any] | None = None,
    finetune: Iterable[str] = FINETUNE_BLOCKS,
) -> list[str]:
    """Run ``checks``; every problem found, listed in check order. ``block(name)`` gives the validated parameter
    block ``ingestion`` / ``pretrain`` / ``teacher_targets`` / a fine-tune stage / ``classification_eval`` (called
    only for the blocks the checks need); ``runtime_params``: the run's ``--params`` overrides; ``finetune``: the
    stage blocks :data:`FINETUNE` checks (:func:`finetune_blocks` of the nodes)."""
    checks = set(checks)
    found: list[str] = []
    if SOURCES in checks:
        found += check_sources(block("ingestion"))
    if VIDEO_SOURCES in checks:
        found += check_video_sources(block("video_ingestion"))
    needs_teacher = TEACHER in checks
    if TRAINING in checks:
        pretrain, teacher = block("pretrain"), block("teacher_targets")
        found += check_model(pretrain)
        found += check_device(pretrain.device, pretrain.precision, "pretrain")
        found += check_world_size(pretrain)
        found += check_augmentation(pretrain, teacher)
        needs_teacher = needs_teacher or teacher.mode == "online"
    if needs_teacher:
        teacher = block("teacher_targets")
        found += check_teacher(teacher)
        found += check_device(teacher.device, what="teacher_targets")
    if FINETUNE in checks:
        for name in finetune:
            stage = block(name)
            if isinstance(stage, VideoFinetuneParams):
                found += check_video_finetune(name, stage, block("pretrain"))
            else:
                found += check_finetune(name, stage, block("ingestion"), block("pretrain"))
    if CLASSIFICATION in checks:
        found += check_classification(block(CLASSIFICATION_BLOCK), block("ingestion"))
    if STORED_STUDENT_CONFIG in checks:
        found += check_overrides_reach_student_config(runtime_params or {})
    return found


def check_overrides_reach_student_config(runtime_params: Mapping[str, Any]) -> list[str]:
    """``--params pretrain.*`` in a run that reads the stored student config would be silently ignored."""
    overridden = sorted(k for k in _dotted(runtime_params) if k == "pretrain" or k.startswith("pretrain."))
    if not overridden:
        return []
    return [
        f"--params {','.join(overridden)}: the pretrain block reaches this run only through the stored "
        f"{STUDENT_CONFIG_DATASET} dataset, which none of its nodes writes, so the override would be ignored; "
        f"include the student_config pipeline (e.g. kedro run --pipelines student_config,train_student --params ...)"
    ]


def _dotted(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``{"a": {"b": 1}, "c.d": 2}`` -> ``["a.b", "c.d"]``: the keys of nested runtime parameters."""
    keys = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        keys += _dotted(value, f"{name}.") if isinstance(value, Mapping) and value else [name]
    return keys


def raise_if_problems(problems: list[str]) -> None:
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise PreflightError(f"the run cannot start, {len(problems)} problem(s) found before any work:\n{listing}")
