"""Scores of a video classifier as EVA-01 reports them on Kinetics: 4 temporal clips x 3 spatial crops per video,
each view's softmax summed (``video/main.py``, ``validate``: ``tot_similarity += softmax(view)``), top-1/top-5; and
the 1x1 view from the same forward pass, so the gain of multi-view testing is measured, not assumed.

For the demo, whose classes come in mirror pairs ("moving left" / "moving right"), :func:`per_class_accuracy`,
:func:`mirror_pair_report` (does the model tell a motion from its mirror, i.e. use temporal and spatial order?),
:func:`factor_accuracy` (top-1 on the item and on the motion apart)
and :func:`per_class_accuracy_plot`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from tqdm import tqdm

from eva_pipeline.evaluation.classification import topk_accuracy
from eva_pipeline.evaluation.plots import DEFAULT_STYLE, PlotStyle, readable_name
from eva_pipeline.loader.video import BadClip, VideoViewsDataset

log = logging.getLogger(__name__)

_GROUP_FILL = 0.8  # of a class's row height shared by the runs' bars


def _collate_views(
    items: list[tuple[Tensor, Tensor] | BadClip],
) -> tuple[Tensor | None, Tensor, list[BadClip]]:
    """Good items stacked ((B, V, C, T, H, W), (B,)); bad clips passed on to the main process, which records them
    (a worker's own record is lost with the worker)."""
    good = [item for item in items if not isinstance(item, BadClip)]
    bad = [item for item in items if isinstance(item, BadClip)]
    if not good:
        return None, torch.empty(0, dtype=torch.int64), bad
    return torch.stack([v for v, _ in good]), torch.stack([y for _, y in good]), bad


def distinct_views(views: Tensor) -> tuple[Tensor, Tensor]:
    """``views`` (B, V, ...) -> ``(distinct, inverse)``: indices into ``views.flatten(0, 1)`` of the views to run
    and, for each of the B*V views, the position in ``distinct`` of the identical view that stands for it.

    The 3 spatial crops of a clip whose frames are square after the short-side resize are the same pixels (the
    demo's clips; Kinetics' landscape clips have distinct crops): the model runs once per distinct view, a third of
    the work there, with the same per-view softmax (compared exactly, per clip)."""
    batch, num = views.shape[:2]
    distinct: list[int] = []
    inverse = torch.empty(batch * num, dtype=torch.int64)
    for b in range(batch):
        kept: list[int] = []  # view indices of this clip that stand for themselves
        for v in range(num):
            same = next((k for k in kept if torch.equal(views[b, v], views[b, k])), None)
            if same is None:
                kept.append(v)
                inverse[b * num + v] = len(distinct)
                distinct.append(b * num + v)
            else:
                inverse[b * num + v] = inverse[b * num + same]
    return torch.tensor(distinct, dtype=torch.int64), inverse


def multiview_probs(
    model: torch.nn.Module,
    dataset: VideoViewsDataset,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    *,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(probs, labels, view1)`` of every clip of ``dataset`` that decodes, in dataset order, on the CPU:
    ``probs`` (N, K) the mean over the V views of each view's softmax (the official sum, divided by V), ``view1``
    (N, K) the softmax of the 1x1 view (:attr:`VideoViewsDataset.middle_view`) taken from the same forward pass,
    ``labels`` (N,) int64.

    ``batch_size`` clips (``batch_size * V`` views) per forward, views reshaped to (B*V, C, T, H, W) and cast to
    ``dtype`` (default: the model's first floating parameter's); the model runs in eval mode under
    ``torch.inference_mode`` (its mode is restored after). Clips that do not decode are skipped and end up in
    ``dataset.bad_clips`` (also from workers); N says how many were scored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("the dataset has no clips: nothing to score")
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate_views
    )
    middle, num_views = dataset.middle_view, dataset.num_views
    summed: list[Tensor] = []
    single: list[Tensor] = []
    targets: list[Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(dataset), unit="clip", desc="views", disable=not progress) as bar:
            for views, labels, bad in loader:
                for clip in bad:
                    if clip not in dataset.bad_clips:
                        dataset.bad_clips.append(clip)
                bar.update(len(labels) + len(bad))
                if views is None:
                    continue
                count = views.shape[0]
                distinct, inverse = distinct_views(views)
                logits = model(views.flatten(0, 1)[distinct].to(device=device, dtype=dtype))
                if logits.ndim != 2 or logits.shape[0] != len(distinct):
                    raise ValueError(
                        f"the model returned {tuple(logits.shape)} for {len(distinct)} distinct views of {count} "
                        "clips; expected (views, classes)"
                    )
                logits = logits[inverse.to(logits.device)]
                if logits.shape[0] != count * num_views:
                    raise ValueError(
                        f"the model returned {tuple(logits.shape)} for {count} clips x {num_views} views; "
                        "expected (clips x views, classes)"
                    )
                probs = logits.float().softmax(dim=-1).view(count, num_views, -1).cpu()
                summed.append(probs.sum(dim=1) / num_views)
                single.append(probs[:, middle])
                targets.append(labels)
    finally:
        model.train(was_training)
    if not summed:
        raise ValueError(f"none of the {len(dataset)} clips decodes (e.g. {dataset.bad_clips[:1]}): nothing scored")
    if dataset.bad_clips:
        log.warning(
            "%d of %d clips do not decode and were not scored, e.g. %s",
            len(dataset.bad_clips),
            len(dataset),
            dataset.bad_clips[0].path,
        )
    return torch.cat(summed), torch.cat(targets), torch.cat(single)


def _as_tensors(probs: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    p = torch.as_tensor(probs).float()
    y = torch.as_tensor(labels).to(torch.int64).reshape(-1)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"expected probs (N, classes) for {y.shape[0]} labels, got {tuple(p.shape)}")
    if y.numel() == 0:
        raise ValueError("no clips to score (N = 0)")
    if int(y.min()) < 0 or int(y.max()) >= p.shape[1]:
        raise ValueError(f"labels must lie in 0..{p.shape[1] - 1}, got {int(y.min())}..{int(y.max())}")
    return p, y


def video_scores(
    probs: Tensor | np.ndarray, labels: Tensor | np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """``{"top1": ..., "top5": ..., "clips": N}``: top-k accuracy (fractions) over the N scored clips (``ks`` must
    not exceed the number of classes)."""
    p, y = _as_tensors(probs, labels)
    scores: dict[str, float] = {f"top{k}": v for k, v in topk_accuracy(p, y, ks).items()}
    scores["clips"] = int(y.numel())
    return scores


def _check_names(class_names: Sequence[str], num_classes: int) -> list[str]:
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    if len(set(names)) != len(names):
        raise ValueError("class names repeat")
    return names


def per_class_accuracy(
    probs: Tensor | np.ndarray, labels: Tensor | np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """One row per class, in label order: ``label``, ``class``, ``clips`` (how many have that label),
    ``correct`` (top-1), ``accuracy`` (NaN for a class without clips) and ``confused_with``, the class its clips
    are most often wrongly predicted as (empty when none is wrong; ties go to the lower label)."""
    p, y = _as_tensors(probs, labels)
    names = _check_names(class_names, p.shape[1])
    k = len(names)
    predicted = p.argmax(dim=1).numpy()
    truth = y.numpy()
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    clips = confusion.sum(axis=1)
    correct = np.diag(confusion).copy()
    wrong = confusion - np.diag(correct)
    confused = [names[int(row.argmax())] if row.any() else "" for row in wrong]
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(clips > 0, correct / np.maximum(clips, 1), np.nan)
    return pd.DataFrame(
        {
            "label": np.arange(k),
            "class": names,
            "clips": clips,
            "correct": correct,
            "accuracy": accuracy,
            "confused_with": confused,
        }
    )


def mirror_pair_report(
    probs: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    class_names: Sequence[str],
    mirror: Callable[[str], str | None],
) -> dict[str, float]:
    """Does the model tell a motion from its mirror image? ``mirror(name)`` is the class a clip of ``name`` becomes
    when flipped or reversed ("moving left" -> "moving right"), or None.

    Returns ``mirrored_clips`` / ``mirrored_top1`` (clips whose class has a mirror), ``unmirrored_clips`` /
    ``unmirrored_top1`` (the others), ``mirror_rate`` (fraction of mirrored clips predicted as their mirror class:
    near ``mirrored_top1`` for a model blind to order, near 0 for one that uses it) and ``mirror_share_of_errors``
    (of the mirrored clips' errors, the fraction that are the mirror). A fraction over no clips is NaN.
    """
    p, y = _as_tensors(probs, labels)
    names = _check_names(class_names, p.shape[1])
    position = {name: i for i, name in enumerate(names)}
    partner = np.full(len(names), -1, dtype=np.int64)
    for i, name in enumerate(names):
        other = mirror(name)
        if other is None:
            continue
        if other not in position or other == name:
            raise ValueError(f"mirror({name!r}) = {other!r} is not another class; known: {names}")
        partner[i] = position[other]
    predicted = p.argmax(dim=1).numpy()
    truth = y.numpy()
    mirrored = partner[truth] >= 0
    hit = predicted == truth
    to_mirror = mirrored & (predicted == partner[truth])
    errors = int((mirrored & ~hit).sum())

    def fraction(numerator: int, denominator: int) -> float:
        return numerator / denominator if denominator else math.nan

    count = int(mirrored.sum())
    return {
        "mirrored_classes": int((partner >= 0).sum()),
        "mirrored_clips": count,
        "mirrored_top1": fraction(int((hit & mirrored).sum()), count),
        "unmirrored_clips": int((~mirrored).sum()),
        "unmirrored_top1": fraction(int((hit & ~mirrored).sum()), int((~mirrored).sum())),
        "mirror_rate": fraction(int(to_mirror.sum()), count),
        "mirror_share_of_errors": fraction(int(to_mirror.sum()), errors),
    }


def factor_accuracy(
    probs: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    class_names: Sequence[str],
    factors: Callable[[str], Mapping[str, str] | None],
) -> dict[str, float]:
    """Top-1 on each factor of a composite label: ``factors(name)`` splits a class into named parts (the demo's
    ``{"group": "tops", "motion": "left"}``), and a clip counts as right on a part when its predicted class has the
    true class's value there. Separates what a model gets from appearance from what it gets from time. Every class
    must split into the same parts."""
    p, y = _as_tensors(probs, labels)
    names = _check_names(class_names, p.shape[1])
    split = [factors(name) for name in names]
    keys = {tuple(sorted(parts)) if parts is not None else None for parts in split}
    if len(keys) != 1 or None in keys:
        unknown = [name for name, parts in zip(names, split, strict=True) if parts is None]
        raise ValueError(f"every class must split into the same parts; unknown: {unknown}, part names: {keys - {None}}")
    (parts,) = keys
    predicted, truth = p.argmax(dim=1).tolist(), y.tolist()
    return {
        part: sum(split[a][part] == split[b][part] for a, b in zip(predicted, truth, strict=True)) / len(truth)
        for part in parts
    }


def per_class_accuracy_plot(
    table: pd.DataFrame | Mapping[str, pd.DataFrame],
    title: str = "Per-class top-1",
    *,
    style: PlotStyle = DEFAULT_STYLE,
) -> Figure:
    """Horizontal bars of per-class accuracy (:func:`per_class_accuracy` tables), classes top to bottom in label
    order, one bar per class and run, one colour per run (legend when several). ``table``: one run's table, or
    run name -> table (every table with the same classes in the same order). A class without clips has no bar
    length and the label "no clips"."""
    runs = {"accuracy": table} if isinstance(table, pd.DataFrame) else dict(table)
    if not runs:
        raise ValueError("no tables: nothing to plot")
    first = next(iter(runs.values()))
    for name, frame in runs.items():
        missing = {"class", "accuracy"} - set(frame.columns)
        if missing:
            raise ValueError(f"table {name!r} lacks column(s) {sorted(missing)}: use per_class_accuracy")
        if list(frame["class"]) != list(first["class"]):
            raise ValueError(f"table {name!r} has other classes (or another order) than the first table")
    classes = [str(c) for c in first["class"]]
    if not classes:
        raise ValueError("the tables have no classes")
    count = len(runs)
    height = style.bar_base_height + style.bar_row_height * len(classes) * (1 + 0.4 * (count - 1))
    fig = Figure(figsize=(style.width, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positions = np.arange(len(classes), dtype=np.float64)
    bar = _GROUP_FILL / count
    for r, (run, frame) in enumerate(runs.items()):
        values = frame["accuracy"].to_numpy(dtype=np.float64)
        offsets = positions - _GROUP_FILL / 2 + (r + 0.5) * bar
        color = style.bar_color if count == 1 else f"C{r}"
        bars = ax.barh(offsets, np.nan_to_num(values, nan=0.0), bar, color=color, label=readable_name(run))
        labels = ["no clips" if np.isnan(v) else style.value_format.format(v) for v in values]
        ax.bar_label(bars, labels=labels, padding=style.value_pad, fontsize="small")
    ax.set_yticks(positions, labels=classes)
    ax.invert_yaxis()
    ax.set_xlim(0.0, style.axis_headroom)
    ax.set_xlabel("top-1 accuracy")
    ax.set_title(title)
    ax.grid(axis="x", alpha=style.grid_alpha)
    if count > 1:
        fig.legend(loc="outside lower right", frameon=False)
    return fig


def pixel_features(clips: Tensor) -> np.ndarray:
    """(N, C, T, H, W) clips -> (N, T*H*W) float64: the first channel of every frame (the demo's clips are grey;
    on colour clips it is a fixed linear view of the pixels, enough for a sceptic's baseline)."""
    return clips[:, 0].reshape(len(clips), -1).double().numpy()


def multiview_pixel_probs(
    logits_fn: Callable[[np.ndarray], Tensor], dataset: VideoViewsDataset
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`multiview_probs` for a linear model on pixels: ``logits_fn`` (N, D) features -> (N, K) logits, applied
    to every view of every clip that decodes; -> (probs averaged over the views, labels, the 1x1 view's probs)."""
    probs, view1, labels = [], [], []
    for index in range(len(dataset)):
        item = dataset[index]
        if isinstance(item, BadClip):
            continue
        views, label = item
        softmax = logits_fn(pixel_features(views)).float().softmax(dim=1)
        probs.append(softmax.mean(dim=0))
        view1.append(softmax[dataset.middle_view])
        labels.append(int(label))
    if not labels:
        raise ValueError("no clip of the dataset decodes: nothing to score")
    return torch.stack(probs), torch.tensor(labels, dtype=torch.int64), torch.stack(view1)
