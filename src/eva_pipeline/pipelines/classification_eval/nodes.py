"""The classification table: every fine-tuned run scored on every evaluation set (``eva_pipeline.evaluation``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pandas as pd
import torch
from matplotlib.figure import Figure

from eva_pipeline.config import ClassificationEvalParams, TargetFinetuneParams
from eva_pipeline.evaluation.pixel_baseline import fit_pixel_baseline, pixel_logits, set_pixels
from eva_pipeline.evaluation.plots import eval_sets_bar_chart
from eva_pipeline.evaluation.sets import (
    EvalSet,
    SetRows,
    label_set,
    natural_adversarial_reference,
    score_set,
    select_set_rows,
    set_logits,
)
from eva_pipeline.evaluation.table import classification_json, classification_table, table_markdown
from eva_pipeline.finetune import eval_transform
from eva_pipeline.finetune.data import ClassNames
from eva_pipeline.loader.pixels import load_images
from eva_pipeline.manifest import Manifest
from eva_pipeline.models import ClassifierCheckpoint
from eva_pipeline.pipelines.common import source_rows
from eva_pipeline.pipelines.finetune_common import stage_data
from eva_pipeline.runtime.device import resolve_device

#: What the ``finetuned_models`` folder loads: ``{run: loader}`` (a partitioned dataset) or ``{run: checkpoint}``.
Runs = Mapping[str, Callable[[], ClassifierCheckpoint] | ClassifierCheckpoint]


#: The run name of the raw-pixel baseline's row.
RAW_PIXELS = "raw_pixels"


def _raw_pixel_scores(
    manifest: Manifest | pd.DataFrame,
    class_names: ClassNames,
    selected: Mapping[str, SetRows],
    finetune: TargetFinetuneParams,
    seed: int,
) -> dict[str, dict[str, float]]:
    """The sceptic's row: a logistic regression on the raw pixels of the target stage's training images (its label
    budget), scored on every set as the fine-tuned models are."""
    classes, (rows, labels), _ = stage_data(manifest, class_names, finetune)
    classifier = fit_pixel_baseline(load_images(rows).numpy(), labels, seed)
    scores = {}
    for name, set_rows in selected.items():
        eval_set = label_set(set_rows, class_names, classes)
        scores[name] = score_set(pixel_logits(classifier, set_pixels(eval_set), len(classes)), eval_set)
    return scores


def _ordered(models: Runs, finetune: TargetFinetuneParams) -> list[str]:
    """The runs in ``finetune.runs`` order (the released model first), then any other file in the folder."""
    return [r for r in finetune.runs if r in models] + sorted(r for r in models if r not in finetune.runs)


def evaluate_classifiers(
    manifest: Manifest | pd.DataFrame,
    class_names: ClassNames,
    finetuned_models: Runs,
    params: ClassificationEvalParams,
    finetune: TargetFinetuneParams,
) -> tuple[dict, str, Figure, dict[str, dict[str, float]]]:
    """Score each run (its EMA weights with ``params.use_ema``, the released ones) on every set through the
    evaluation transform at the run's own image size (``finetune.crop_pct``), with ``params.raw_pixels`` also a
    ``raw_pixels`` row (a logistic regression on the target stage's training pixels); returns the JSON report, the
    markdown table, the bar plot and the MLflow metrics (``classification_eval/<run>/<set>/top1`` ...)."""
    if not finetuned_models:
        raise ValueError("no fine-tuned model to evaluate: run the finetune pipeline first")
    sources = list(dict.fromkeys([s for eval_set in params.sets for s in eval_set.sources] + params.reference_sources))
    rows = source_rows(manifest, sources)
    selected = {}
    for set_params in params.sets:
        reference = None
        if set_params.natural_adversarial:
            reference = natural_adversarial_reference(set_params, rows, params.reference_sources, class_names)
        selected[set_params.name] = select_set_rows(
            set_params,
            rows,
            class_names,
            default_max_images=params.max_images,
            reference=reference,
            seed=params.seed,
        )
    device = resolve_device(params.device)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    labelled: dict[str, EvalSet] = {}
    for run in _ordered(finetuned_models, finetune):
        loaded = finetuned_models[run]
        checkpoint = loaded() if callable(loaded) else loaded
        model = checkpoint.classifier(use_ema=params.use_ema).to(device)
        transform = eval_transform(checkpoint.config.img_size, finetune.crop_pct)
        scores[run] = {}
        for name, set_rows in selected.items():
            eval_set = label_set(set_rows, class_names, checkpoint.classes)
            labelled.setdefault(name, eval_set)
            logits = set_logits(model, eval_set, transform, params.batch_size, device)
            scores[run][name] = score_set(logits, eval_set)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if params.raw_pixels:
        scores[RAW_PIXELS] = _raw_pixel_scores(manifest, class_names, selected, finetune, params.seed)
    sets = [labelled[s.name] for s in params.sets]
    table = classification_table(scores, sets, params.target)
    report = classification_json(scores, sets, params.target)
    figure = eval_sets_bar_chart(
        {run: {name: s["top1"] for name, s in by_set.items()} for run, by_set in scores.items()},
        f"Fine-tuned top-1 per evaluation set (target: {params.target})",
        synthetic=[s.name for s in sets if s.kind == "synthetic"],
        average=table["average"].to_dict(),
    )
    metrics = {
        f"{run}/{name}/{metric}": {"value": float(entry[name][metric]), "step": 0}
        for run, entry in report["runs"].items()
        for name in selected
        for metric in ("top1", "top5")
    }
    metrics.update(
        {f"{run}/{key}": {"value": float(entry[key]), "step": 0} for run, entry in report["runs"].items()
         for key in ("average", "gap")}
    )  # fmt: skip
    return report, table_markdown(table, sets, params.target), figure, metrics
