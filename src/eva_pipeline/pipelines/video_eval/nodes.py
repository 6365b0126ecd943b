"""Video evaluation: each target model on its version's held-out clips, the single centre view of the middle clip
(1x1) against EVA's multi-view test (4 uniform temporal clips x 3 spatial crops, per-view softmax averaged)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure

from eva_pipeline.config import TargetVideoFinetuneParams, VideoEvalParams
from eva_pipeline.evaluation.pixel_baseline import fit_linear, linear_logits
from eva_pipeline.evaluation.video import (
    factor_accuracy,
    mirror_pair_report,
    multiview_pixel_probs,
    multiview_probs,
    per_class_accuracy,
    per_class_accuracy_plot,
    pixel_features,
    video_scores,
)
from eva_pipeline.finetune.video import NORMALISATION, clip_rows, dataset_classes, view_clips
from eva_pipeline.ingest.moving_fashion_mnist import class_parts, mirror_class
from eva_pipeline.loader.video import VideoClipDataset, VideoViewsDataset
from eva_pipeline.models import ClassifierCheckpoint
from eva_pipeline.pipelines.finetune_video.nodes import target_run_name
from eva_pipeline.runtime.device import resolve_device

Models = Mapping[str, Callable[[], ClassifierCheckpoint] | ClassifierCheckpoint]
#: The run name of the raw-pixel baseline's rows.
RAW_PIXELS = "raw_pixels"


def _view_names(params: VideoEvalParams) -> tuple[str, str]:
    return "1x1", f"{params.num_clips}x{params.num_crops}"


def _markdown(report: dict[str, Any], params: VideoEvalParams, mirrors: bool) -> str:
    one, many = _view_names(params)
    head = ["run", "target", "classes", "clips", f"{one} top-1", f"{many} top-1", f"{many} top-5", "chance"]
    if mirrors:
        head += ["group top-1", "motion top-1", "mirror rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, targets in report["runs"].items():
        for target, entry in targets.items():
            cells = [run, target, str(entry["classes"]), str(entry["clips"])]
            cells += [f"{100 * entry[one]['top1']:.1f}", f"{100 * entry[many]['top1']:.1f}"]
            cells += [f"{100 * entry[many]['top5']:.1f}", f"{100 / entry['classes']:.1f}"]
            if mirrors:
                parts, m = entry["factors"], entry["mirror"]
                cells += [
                    f"{100 * parts['group']:.1f}",
                    f"{100 * parts['motion']:.1f}",
                    f"{100 * m['mirror_rate']:.1f}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    note = f"Top-1/top-5 in %, {many} views: the per-view softmax averaged; chance: 1 / classes."
    if mirrors:
        note += (
            " Group / motion top-1 (4x3 views): the predicted class has the right item group (chance 1/3) / the right"
            " motion (chance 1/8): appearance and time apart. Mirror rate: the share of clips whose class has a mirror"
            " (left/right, up/down, clockwise/anticlockwise, zoom in/out) predicted as that mirror (a model blind to"
            " temporal order confuses them)."
        )
    return "\n".join(lines) + "\n\n" + note + "\n"


def _raw_pixel_probs(
    manifest: pd.DataFrame,
    target: str,
    num_classes: int,
    rows: pd.DataFrame,
    labels: Any,
    params: VideoEvalParams,
    finetune: TargetVideoFinetuneParams,
) -> tuple[Any, Any, Any]:
    """The sceptic's row: a logistic regression on the raw pixels of ``target``'s training clips (their 1x1 view at
    the target models' frames and size), scored on the same views as the models."""
    mean, std = NORMALISATION[finetune.augmentation.normalize]
    size = {"num_frames": finetune.num_frames, "img_size": finetune.img_size, "mean": mean, "std": std}
    train_rows, train_labels = clip_rows(manifest, target, "train")
    train = VideoClipDataset(train_rows, train_labels, train=False, **size)
    features = pixel_features(torch.stack([train[i][0] for i in range(len(train))]))
    classifier = fit_linear(features, train_labels)
    views = VideoViewsDataset(rows, labels, num_clips=params.num_clips, num_crops=params.num_crops, **size)
    return multiview_pixel_probs(lambda x: linear_logits(classifier, x, num_classes), views)


def _entry(probs: Any, kept: Any, view1: Any, classes: list[str], bad: list, target: str, mirrors: bool, views: tuple):
    """One (run, target) cell of the report: clips scored, the two views' top-1/top-5, the mirror and factor
    reports."""
    one, many = views
    entry = {
        "classes": len(classes),
        "clips": len(kept),
        "bad_clips": [list(b) for b in bad],
        one: video_scores(view1, kept),
        many: video_scores(probs, kept),
    }
    if mirrors:
        entry["mirror"] = mirror_pair_report(probs, kept, classes, lambda c, v=target: mirror_class(c, v))
        entry["factors"] = factor_accuracy(probs, kept, classes, class_parts)
    return entry


def evaluate_video(
    video_manifest: pd.DataFrame,
    class_mapping: dict[str, Any],
    finetuned_video_models: Models,
    params: VideoEvalParams,
    finetune: TargetVideoFinetuneParams,
) -> tuple[dict, str, dict[str, Figure], dict[str, dict[str, float]]]:
    """Score every ``<run>_<target>`` model of ``finetune`` on ``params.split`` clips of its target (its EMA weights
    with ``params.use_ema``) -> the JSON report (``runs`` -> run -> target -> view -> ``top1``, ``top5``), a
    markdown table, one per-class accuracy figure per target (runs side by side) and the MLflow metrics."""
    device = resolve_device(params.device)
    one, many = _view_names(params)
    report: dict[str, Any] = {"split": params.split, "views": {one: "centre crop of the middle clip", many: "mean"}}
    report["runs"] = runs = {}
    tables: dict[str, dict[str, pd.DataFrame]] = {}
    for run in finetune.runs:
        for target in finetune.targets:
            name = target_run_name(run, target)
            if name not in finetuned_video_models:
                raise ValueError(f"no model {name!r} in finetuned_video_models: run the finetune_video pipeline first")
            loaded = finetuned_video_models[name]
            checkpoint: ClassifierCheckpoint = loaded() if callable(loaded) else loaded
            classes = dataset_classes(class_mapping, target)
            if checkpoint.classes != classes:
                raise ValueError(f"model {name!r} has other classes than {target} in the class mapping: retrain it")
            rows, labels = clip_rows(video_manifest, target, params.split, keep=params.max_clips)
            views = view_clips(rows, labels, checkpoint, finetune.augmentation.normalize, params)
            model = checkpoint.classifier(use_ema=params.use_ema).to(device)
            probs, kept, view1 = multiview_probs(model, views, params.batch_size, device, progress=True)
            del model
            entry = _entry(probs, kept, view1, classes, views.bad_clips, target, params.mirror_pairs, (one, many))
            runs.setdefault(run, {})[target] = entry
            tables.setdefault(target, {})[run] = per_class_accuracy(probs, kept, classes)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if params.raw_pixels:
        for target in finetune.targets:
            classes = dataset_classes(class_mapping, target)
            rows, labels = clip_rows(video_manifest, target, params.split, keep=params.max_clips)
            probs, kept, view1 = _raw_pixel_probs(video_manifest, target, len(classes), rows, labels, params, finetune)
            entry = _entry(probs, kept, view1, classes, [], target, params.mirror_pairs, (one, many))
            runs.setdefault(RAW_PIXELS, {})[target] = entry
            tables[target][RAW_PIXELS] = per_class_accuracy(probs, kept, classes)
    figures = {
        f"per_class_{target}.png": per_class_accuracy_plot(by_run, f"{target}: per-class top-1 ({many} views)")
        for target, by_run in tables.items()
    }
    metrics = {
        f"{run}/{target}/{view}/{metric}": {"value": float(entry[view][metric]), "step": 0}
        for run, targets in runs.items()
        for target, entry in targets.items()
        for view in (one, many)
        for metric in ("top1", "top5")
    }
    if params.mirror_pairs:
        metrics.update(
            {f"{run}/{target}/mirror_rate": {"value": float(entry["mirror"]["mirror_rate"]), "step": 0}
             for run, targets in runs.items() for target, entry in targets.items()
             if not math.isnan(entry["mirror"]["mirror_rate"])}
        )  # fmt: skip
        metrics.update(
            {f"{run}/{target}/{part}_top1": {"value": float(value), "step": 0}
             for run, targets in runs.items() for target, entry in targets.items()
             for part, value in entry["factors"].items() if not math.isnan(value)}
        )  # fmt: skip
    return report, _markdown(report, params, params.mirror_pairs), figures, metrics
