"""Looking into a finished pre-training run: the batch and block masks the student saw at a step, how close its
predictions come to the teacher's targets patch by patch on held-out images, its loss and LR curves, and the result
tables as frames.

``notebooks/explore_run.ipynb`` is built on these functions, so its cells stay a line or two and the work is
tested here. Everything is rebuilt from the run's own artefacts with the code that made them (the loader's batch plan,
the held-out set of the validation loss), never re-implemented: what is shown is what training used. No Kedro here:
the notebook loads the artefacts through the catalog and passes them in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from eva_pipeline.config import PretrainParams
from eva_pipeline.evaluation.plots import DEFAULT_STYLE, PlotStyle, mask_overlay
from eva_pipeline.evaluation.table import classification_table
from eva_pipeline.loader.batches import Batch, PretrainBatches
from eva_pipeline.loader.heldout import SubsetPixels, validation_rows
from eva_pipeline.loader.pixels import ManifestPixels
from eva_pipeline.loader.rows import ParquetRows
from eva_pipeline.loader.transforms import resize_uint8, stack_images, to_model_input
from eva_pipeline.manifest import Manifest
from eva_pipeline.models import EvaConfig, EvaMIM, get_config, load_official_checkpoint
from eva_pipeline.targets.store import TargetStore
from eva_pipeline.training.recipe import make_plan
from eva_pipeline.training.validation import validation_mask

#: Columns a pre-training history (``pretrain_history``) needs for :func:`training_curves`.
HISTORY_COLUMNS: tuple[str, ...] = ("step", "loss", "lr")
_PROBE_PREFIX = "probe_top1_"


def _architecture(params: PretrainParams, target_dim: int | None = None) -> EvaConfig:
    """The student's architecture as the run built it (``target_dim``: the teacher's width, which sizes lm_head)."""
    overrides = dict(params.model.overrides)
    if target_dim is not None:
        overrides["target_dim"] = target_dim
    return get_config(params.model.name, **overrides)


def split_pixels(manifest: Manifest, split: str) -> ManifestPixels:
    """The images of one split of the manifest, by position (what the loader and the validation set read)."""
    rows = ParquetRows(manifest.path, split)
    if len(rows) == 0:
        raise ValueError(f"the manifest {manifest.path} has no '{split}' images; check the ingestion sources in conf/")
    return ManifestPixels(rows)


def load_student(params: PretrainParams, state: Mapping[str, Tensor]) -> EvaMIM:
    """The pre-trained student (``eva_student``'s state dict) in fp32, eval mode; the architecture from the run's
    resolved config (``student_config``), the lm_head width from the weights."""
    if "lm_head.weight" not in state:
        raise ValueError("not an EVA pre-training checkpoint: no lm_head.weight (load the eva_student dataset)")
    model = EvaMIM(_architecture(params, int(state["lm_head.weight"].shape[0])), initialise=False)
    load_official_checkpoint(model, state)  # strict: every key, every shape
    return model.float().eval()


def training_batch(
    params: PretrainParams, pixels: Any, step: int = 0, targets: Any = None, count: int | None = None
) -> Batch:
    """The global batch of training step ``step`` (0-based) exactly as the loader built it: sample indices, the
    images as the student saw them (uint8, after any crop), their block masks and, given the stored ``targets``
    reader (``teacher_targets.reader()``), the teacher's targets; ``count`` keeps its first images.

    Every draw is a function of (seed, epoch, index) (:mod:`eva_pipeline.loader.batches`), so this is the very batch
    of the run, whatever restarts it had. It builds the whole global batch (``params.batch_size`` images) first.
    """
    config = _architecture(params)
    plan = make_plan(params, pixels, config.img_size, config.grid_size, rank=0, world=1, stored=targets)
    last = plan.steps_per_epoch * params.epochs
    if not 0 <= step < last:
        raise ValueError(f"step must be in [0, {last}) for {params.epochs} epochs of {plan.steps_per_epoch} steps")
    batch = PretrainBatches(plan, step, step + 1).batch(step)
    if count is None:
        return batch
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    keep = slice(0, count)
    targets_kept = None if batch.targets is None else batch.targets[keep]
    return Batch(batch.step, batch.indices[keep], batch.images[keep], batch.mask[keep], batch.num_masked, targets_kept)


@dataclass(frozen=True)
class HeldOutViews:
    """Held-out images of the validation loss with their stored teacher targets, by position."""

    images: Tensor  # (B, C, S, S) uint8: to look at
    inputs: Tensor  # (B, 3, S, S) float32: the model input (CLIP-normalised), as the teacher and student see them
    targets: Tensor  # (B, N, D) float32: the teacher's targets


def heldout_views(pixels: Any, store: Any, img_size: int, count: int | None = None) -> HeldOutViews:
    """The first ``count`` (default: all) images of the held-out validation set and their targets.

    ``pixels``: the held-out split (:func:`split_pixels` of ``teacher_targets.validation["split"]``); ``store``: the
    validation target store (``teacher_targets.validation_root``). The images are the evenly spaced rows the
    teacher_targets stage stored targets for (:func:`~eva_pipeline.loader.heldout.validation_rows`), each resized
    whole, so position ``i`` here is position ``i`` of the held-out MIM loss.
    """
    reader = TargetStore(store).reader()
    subset = SubsetPixels(pixels, validation_rows(len(pixels), reader.num_items))
    if len(subset) != reader.num_items:
        raise ValueError(
            f"the validation targets cover {reader.num_items} images, the split has {len(subset)} of them: "
            "re-run the teacher_targets pipeline"
        )
    n = reader.num_items if count is None else min(count, reader.num_items)
    if n < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    positions = np.arange(n)
    images = stack_images([resize_uint8(im, img_size) for im in subset(positions)])
    targets = reader.get(positions)[0].float()
    return HeldOutViews(images, to_model_input(images, img_size), targets)


@torch.no_grad()
def cosine_map(student: EvaMIM, images: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B, g, g): the cosine similarity between the student's prediction for each patch and the teacher's target for
    it, the student seeing ``images`` (model input) with ``mask`` (bool (B, N) or (N,); default: the held-out loss's
    fixed mask, every other token).

    Masked patches are what the loss trains (their mean is minus the held-out MIM loss); visible ones show how much
    of the teacher's feature the student reproduces from the patch itself. The student is evaluated in eval mode.
    """
    batch, num_patches = images.shape[0], student.num_patches
    if mask is None:
        mask = validation_mask(num_patches)
    if mask.ndim == 1:
        mask = mask.expand(batch, -1)
    expected = (batch, num_patches, student.lm_head.out_features)
    if tuple(targets.shape) != expected:
        raise ValueError(f"targets must be (B, N, D) = {expected} for this student, got {tuple(targets.shape)}")
    was_training = student.training
    student.eval()
    try:
        tokens = student.forward_features(images.to(student.cls_token.dtype), mask)[:, 1:]
        predictions = student.lm_head(tokens)
    finally:
        student.train(was_training)
    similarity = F.cosine_similarity(predictions.float(), targets.to(predictions.device).float(), dim=-1)
    grid = student.config.grid_size
    return similarity.reshape(batch, grid, grid).cpu()


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def cosine_overview(
    images: Tensor, maps: Tensor, masks: Tensor, max_images: int = 8, *, style: PlotStyle = DEFAULT_STYLE
) -> Figure:
    """Each image with its masked patches shaded (top row) above its cosine map (bottom row, -1 to 1, masked
    patches dotted), titled with the mean cosine of the masked and of the visible patches."""
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, g, g), got shape {tuple(maps.shape)}")
    grid = maps.shape[-1]
    masks = masks.reshape(-1, grid, grid) if masks.ndim < 3 else masks
    if masks.shape[0] == 1 and maps.shape[0] > 1:
        masks = masks.expand(maps.shape[0], -1, -1)
    if not images.shape[0] == maps.shape[0] == masks.shape[0]:
        raise ValueError(f"{images.shape[0]} images, {maps.shape[0]} maps and {masks.shape[0]} masks: one each")
    count = min(max_images, maps.shape[0])
    if count < 1:
        raise ValueError("nothing to plot: no image")
    pictures = images[:count].float().div(255.0).permute(0, 2, 3, 1).numpy()
    size = pictures.shape[1]
    extent = (-0.5, size - 0.5, size - 0.5, -0.5)
    fig = _new_figure(style.panel_size * count, style.panel_size * 2.2)
    axes = fig.subplots(2, count, squeeze=False)
    shown = None
    for i in range(count):
        mask = masks[i].numpy().astype(bool)
        top, bottom = axes[0, i], axes[1, i]
        picture = pictures[i]
        top.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0.0, vmax=1.0)
        top.imshow(mask_overlay(mask, style), interpolation="nearest", extent=extent)
        shown = bottom.imshow(maps[i].numpy(), cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
        rows, cols = np.nonzero(mask)
        bottom.scatter(cols, rows, s=4, c="black", marker=".")
        cos = maps[i].numpy()
        masked = f"{cos[mask].mean():.2f}" if mask.any() else "-"
        visible = f"{cos[~mask].mean():.2f}" if (~mask).any() else "-"
        bottom.set_title(f"masked {masked}\nvisible {visible}", fontsize="small")
        for ax in (top, bottom):
            ax.set_axis_off()
    fig.colorbar(shown, ax=axes[1, :].tolist(), shrink=0.8, label="cos(student, teacher)")
    return fig


def training_curves(history: pd.DataFrame, *, style: PlotStyle = DEFAULT_STYLE) -> Figure:
    """The run's training loss per step with its held-out loss where evaluated (``val_loss``), and the learning
    rate per step, one above the other on a shared step axis (``pretrain_history``)."""
    missing = [c for c in HISTORY_COLUMNS if c not in history.columns]
    if missing:
        raise ValueError(f"the history needs columns {list(HISTORY_COLUMNS)}; missing {missing} (pretrain_history)")
    if history.empty:
        raise ValueError("the history is empty: no step was recorded (a run resumed from a finished checkpoint)")
    fig = _new_figure(style.width, style.curve_height * 1.6)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    loss_ax.plot(history["step"], history["loss"], color=style.curve_color, label="training batches")
    if "val_loss" in history.columns:
        held_out = history.dropna(subset=["val_loss"])
        if not held_out.empty:
            loss_ax.plot(held_out["step"], held_out["val_loss"], marker="o", color="C1", label="held-out (fixed mask)")
    loss_ax.set_ylabel("loss (-cos)")
    loss_ax.set_title("EVA pre-training")
    loss_ax.legend()
    lr_ax.plot(history["step"], history["lr"], color="C2")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    for ax in (loss_ax, lr_ax):
        ax.grid(alpha=style.grid_alpha)
    return fig


def probe_table(metrics: Mapping[str, float]) -> pd.DataFrame:
    """``probe_metrics`` as a table: one row per encoder (``probe_top1_<encoder>``, in file order) with its top-1
    and the pre-trained student's margin over it; chance as the last row when recorded."""
    top1 = {key.removeprefix(_PROBE_PREFIX): float(v) for key, v in metrics.items() if key.startswith(_PROBE_PREFIX)}
    if "pretrained" not in top1:
        raise ValueError(f"not a probe_metrics mapping: no {_PROBE_PREFIX}pretrained among {sorted(metrics)}")
    if "probe_chance" in metrics:
        top1["chance"] = float(metrics["probe_chance"])
    frame = pd.DataFrame({"top1": top1}).rename_axis("features")
    frame["student_margin"] = top1["pretrained"] - frame["top1"]
    return frame


def classification_frame(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """``classification_metrics`` as the classification table: one row per run, each set's top-1 and top-5
    (``<set>/top1``), the robustness average and the gap, recomputed from the scores
    (:func:`~eva_pipeline.evaluation.table.classification_table`)."""
    try:
        target, sets, runs = metrics["target"], metrics["sets"], metrics["runs"]
    except KeyError as exc:
        raise ValueError(f"not a classification_metrics mapping: no {exc} key") from None
    like = [SimpleNamespace(name=name, kind=s["kind"], in_average=s["in_average"]) for name, s in sets.items()]
    scores = {run: {k: v for k, v in by_set.items() if isinstance(v, Mapping)} for run, by_set in runs.items()}
    return classification_table(scores, like, target)


def video_frame(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """``video_metrics`` as a table: one row per (run, target version), top-1 and top-5 of each view
    (``<view>/top1``) and the number of clips scored."""
    try:
        views, runs = list(metrics["views"]), metrics["runs"]
    except KeyError as exc:
        raise ValueError(f"not a video_metrics mapping: no {exc} key") from None
    records, index = [], []
    for run, by_target in runs.items():
        for target, entry in by_target.items():
            record = {f"{view}/{m}": float(entry[view][m]) for view in views for m in ("top1", "top5")}
            record["clips"] = int(entry["clips"])
            records.append(record)
            index.append((run, target))
    if not records:
        raise ValueError("video_metrics holds no run")
    return pd.DataFrame(records, index=pd.MultiIndex.from_tuples(index, names=["run", "target"]))


def mask_frequency(masks: Tensor) -> Tensor:
    """(g, g): the share of images in which each patch is masked (block masking should cover the grid evenly)."""
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool (B, N), got {masks.dtype} {tuple(masks.shape)}")
    grid = math.isqrt(masks.shape[1])
    if grid * grid != masks.shape[1]:
        raise ValueError(f"{masks.shape[1]} patches is not a square grid")
    return masks.float().mean(0).reshape(grid, grid)
