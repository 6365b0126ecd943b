"""A video fine-tune stage's recipe (EVA-01 ``video``): its clips and labels from the clip manifest, the space-time
classifier at the stage's frame count, the clip datasets, and its start weights.

Training itself is the image stages' loop (:func:`eva_pipeline.finetune.loop.run_finetuning`): the same engine,
layer-decayed AdamW, CutMix/Mixup (on clips as (B, C*T, H, W)), EMA and resumable checkpoints; only the data and
the model differ. The clip manifest is ``video_ingestion``'s (``eva_pipeline.ingest.kinetics``): one row per
(dataset, split, clip), ``label`` an index into that dataset's classes of the K722 class mapping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from eva_pipeline.config import ModelParams, VideoEvalParams, VideoFinetuneParams
from eva_pipeline.finetune.data import evenly_spaced, label_budget
from eva_pipeline.finetune.weights import stage_fields
from eva_pipeline.loader.video import VideoClipDataset, VideoViewsDataset
from eva_pipeline.models import ClassifierCheckpoint
from eva_pipeline.models.registry import create_video_classifier
from eva_pipeline.models.video import EvaVideoClassifier, load_video_start

K722 = "k722"
#: mean/std by name: ImageNet's (the official video code) or CLIP's (the image stages and the MIM teacher).
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)),
    "clip": (tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)),
}


def dataset_classes(mapping: Mapping[str, Any], dataset: str) -> list[str]:
    """The classes of ``dataset`` (``k722`` or a version) in label order, from the K722 class mapping."""
    if dataset == K722:
        return list(mapping["k722_classes"])
    versions = mapping["versions"]
    if dataset not in versions:
        raise ValueError(f"no dataset {dataset!r} in the class mapping: {[K722, *versions]} (video_ingestion.versions)")
    return list(versions[dataset]["classes"])


def head_rows(mapping: Mapping[str, Any], target: str) -> list[int]:
    """The K722 head row of each of ``target``'s classes (EVA-01's K722 -> K400/600/700 class mapping)."""
    if target not in mapping["versions"]:
        raise ValueError(f"target {target!r} is not a version of the class mapping: {sorted(mapping['versions'])}")
    return [int(i) for i in mapping["versions"][target]["k722_index"]]


def clip_rows(
    manifest: pd.DataFrame,
    dataset: str,
    split: str,
    *,
    per_class: int | None = None,
    keep: int | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """The labelled clips of ``dataset``'s ``split`` in manifest order, cut to ``per_class`` per class, then to
    ``keep`` evenly spaced clips; -> (rows, labels)."""
    chosen = manifest[(manifest["dataset"] == dataset) & (manifest["split"] == split)]
    if chosen.empty:
        found = sorted({(str(d), str(s)) for d, s in zip(manifest["dataset"], manifest["split"], strict=True)})
        raise ValueError(f"the clip manifest has no {split!r} clips of {dataset!r}; it has (dataset, split): {found}")
    labels = chosen["label"].to_numpy(dtype=np.int64)
    if (labels < 0).any():
        raise ValueError(f"{int((labels < 0).sum())} {dataset}/{split} clip(s) have no label: cannot train or score")
    index = label_budget(labels, per_class)
    index = index[evenly_spaced(len(index), keep)]
    return chosen.iloc[index].reset_index(drop=True), labels[index]


def make_video_classifier(params: VideoFinetuneParams, student: ModelParams, num_classes: int) -> EvaVideoClassifier:
    """The student's architecture as the stage's space-time classifier (its frames, size, drop path)."""
    return create_video_classifier(
        student.name,
        num_classes,
        params.num_frames,
        drop_path_rate=params.drop_path_rate,
        tubelet=params.tubelet,
        img_size=params.img_size,
        freeze_patch_embed=params.freeze_patch_embed,
        head_init_scale=params.head_init_scale,
        **stage_fields(student.overrides),
    )


def train_clips(rows: pd.DataFrame, labels: np.ndarray, params: VideoFinetuneParams) -> VideoClipDataset:
    """Training clips: TSN (or strided) sampling, multi-scale crop (+ flip, jitter, grayscale), a function of
    (seed, epoch, i)."""
    a = params.augmentation
    mean, std = NORMALISATION[a.normalize]
    return VideoClipDataset(
        rows,
        labels,
        num_frames=params.num_frames,
        img_size=params.img_size,
        train=True,
        seed=params.seed,
        mean=mean,
        std=std,
        hflip=a.hflip,
        scales=a.scales,
        color_jitter=a.color_jitter,
        grayscale=a.grayscale,
        sampling=a.sampling,
        cache_bytes=params.frame_cache_mb * 2**20,
    )


def eval_clips(rows: pd.DataFrame, labels: np.ndarray, params: VideoFinetuneParams) -> VideoClipDataset:
    """Held-out clips, the 1x1 view (segment middles, centre crop): what the stage validates on while training."""
    mean, std = NORMALISATION[params.augmentation.normalize]
    return VideoClipDataset(
        rows, labels, num_frames=params.num_frames, img_size=params.img_size, train=False, mean=mean, std=std
    )


def view_clips(
    rows: pd.DataFrame, labels: np.ndarray, checkpoint: ClassifierCheckpoint, normalize: str, params: VideoEvalParams
) -> VideoViewsDataset:
    """Every clip's ``num_clips`` x ``num_crops`` views at the checkpoint's frames and size (multi-view testing)."""
    if checkpoint.video is None:
        raise ValueError("not a video classifier checkpoint (no 'video' entry): multi-view testing needs one")
    mean, std = NORMALISATION[normalize]
    return VideoViewsDataset(
        rows,
        labels,
        num_frames=checkpoint.video["num_frames"],
        img_size=checkpoint.config.img_size,
        num_clips=params.num_clips,
        num_crops=params.num_crops,
        mean=mean,
        std=std,
    )


def start_from_image(model: EvaVideoClassifier, state: Mapping[str, torch.Tensor]) -> None:
    """Initialise from an image checkpoint's weights (MIM or classifier): kernel inflated, pos_embed per frame; a
    head of the image stage is dropped (the video classes are others)."""
    load_video_start(model, {"model": dict(state)}, reinit_head="head.weight" in state)


def start_from_k722(model: EvaVideoClassifier, checkpoint: ClassifierCheckpoint, rows: Sequence[int]) -> None:
    """Initialise from a K722 video classifier (its released weights: the EMA where kept), pos_embed resized to the
    model's frames, head rows picked by ``rows`` (:func:`head_rows`)."""
    source_frames = None if checkpoint.video is None else checkpoint.video["num_frames"]
    load_video_start(model, {"model": checkpoint.released}, class_index=list(rows), source_frames=source_frames)
