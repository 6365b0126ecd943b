"""Figures for the demo's report: probe accuracies, evaluation-set accuracies per run, what block-wise masking hides,
training curves.

Every function builds a ``matplotlib.figure.Figure`` with its own Agg canvas and never touches ``pyplot``: no
global figure registry, no GUI backend, nothing that leaks between Kedro nodes or needs ``plt.close``. Saving is
the caller's (or a Kedro ``MatplotlibWriter``'s) business.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import PercentFormatter
from torch import Tensor

_UINT8_MAX = 255.0
_RANGE_TOLERANCE = 1e-3  # float images may overshoot [0, 1] by rounding after resize/normalise round trips
_GRAY_CHANNELS = 1
_RGB_CHANNELS = 3


@dataclass(frozen=True)
class PlotStyle:
    """Sizes and colours shared by the figures (inches, matplotlib colour specs)."""

    width: float = 7.0
    bar_row_height: float = 0.6
    bar_base_height: float = 1.2
    bar_color: str = "#4C72B0"
    chance_color: str = "#C44E52"
    value_format: str = "{:.1%}"
    value_pad: float = 3.0
    axis_headroom: float = 1.15  # room right of the longest bar for its value label
    panel_size: float = 2.2
    mask_columns: int = 4
    mask_color: tuple[float, float, float] = (1.0, 0.0, 0.0)
    mask_alpha: float = 0.45
    curve_height: float = 3.5
    curve_color: str = "#4C72B0"
    grid_alpha: float = 0.3
    group_height: float = 4.0
    group_width: float = 0.8  # of the unit spacing between set groups, shared by the runs' bars
    group_bar_width: float = 0.3  # inches of figure width per bar (the figure grows with runs x sets)
    group_label_size: str = "x-small"
    group_headroom: float = 1.3  # room above the tallest bar for its vertical value label
    synthetic_hatch: str = "///"


DEFAULT_STYLE = PlotStyle()


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def readable_name(key: str) -> str:
    """``"student_random_init"`` -> ``"Student random init"``; a key that already has spaces is kept as written."""
    if any(ch.isspace() for ch in key):
        return key
    text = " ".join(key.replace("_", " ").split())
    return text[:1].upper() + text[1:]


def probe_bar_chart(
    results: Mapping[str, float],
    title: str,
    *,
    num_classes: int | None = None,
    chance: float | None = None,
    style: PlotStyle = DEFAULT_STYLE,
) -> Figure:
    """Horizontal bars of top-1 accuracy per encoder (in ``results`` order, top to bottom), values printed.

    A dashed line marks chance, the floor a useless encoder would reach: 1 / ``num_classes``, or ``chance`` as
    given (one of the two). Keys without spaces are made readable (:func:`readable_name`).
    """
    if not results:
        raise ValueError("results is empty: nothing to plot")
    values = np.asarray(list(results.values()), dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"results hold non-finite accuracies: {dict(results)}")
    chance_label = ""
    if num_classes is not None and chance is not None:
        raise ValueError("give either num_classes or chance, not both")
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        chance, chance_label = 1.0 / num_classes, f"chance (1/{num_classes})"
    elif chance is not None:
        if not 0.0 <= chance <= 1.0:
            raise ValueError(f"chance must be in [0, 1], got {chance}")
        chance_label = "chance (" + style.value_format.format(chance) + ")"

    fig = _new_figure(style.width, style.bar_base_height + style.bar_row_height * len(results))
    ax = fig.add_subplot()
    positions = np.arange(len(results))
    bars = ax.barh(positions, values, color=style.bar_color)
    ax.bar_label(bars, labels=[style.value_format.format(v) for v in values], padding=style.value_pad)
    ax.set_yticks(positions, labels=[readable_name(k) for k in results])
    ax.invert_yaxis()
    ax.set_xlim(0.0, max(1.0, float(values.max())) * style.axis_headroom)
    ax.set_xlabel("top-1 accuracy (linear probe)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=style.grid_alpha)
    if chance is not None:
        ax.axvline(chance, color=style.chance_color, linestyle="--", label=chance_label)
        fig.legend(loc="outside lower right", frameon=False)  # outside: never covers a bar or its label
    return fig


def _images_hwc(images: Tensor | np.ndarray) -> np.ndarray:
    """(N, C, H, W) uint8 or float in [0, 1] -> float (N, H, W, C) in [0, 1]."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim != 4 or array.shape[1] not in (_GRAY_CHANNELS, _RGB_CHANNELS):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got shape {array.shape}")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / _UINT8_MAX
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < -_RANGE_TOLERANCE or array.max() > 1 + _RANGE_TOLERANCE):
            raise ValueError(
                f"float images must lie in [0, 1] (got [{array.min():.3g}, {array.max():.3g}]); "
                "undo the normalisation before plotting"
            )
        array = np.clip(array.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"images must be uint8 or float, got dtype {array.dtype}")
    return array.transpose(0, 2, 3, 1)


def mask_overlay(mask: np.ndarray, style: PlotStyle = DEFAULT_STYLE) -> np.ndarray:
    """A (gh, gw, 4) RGBA float array, one pixel per patch: ``mask_color`` at ``mask_alpha`` where masked, else clear.

    :func:`mask_overview` stretches it over the image (``extent``, nearest neighbour), so each cell covers exactly
    its patch whatever the image resolution: the mask grid belongs to the model input, the picture may be smaller.
    """
    overlay = np.zeros((*mask.shape, 4), dtype=np.float32)
    overlay[mask, :3] = style.mask_color
    overlay[mask, 3] = style.mask_alpha
    return overlay


def mask_overview(
    images: Tensor | np.ndarray,
    masks: np.ndarray | Tensor,
    max_images: int = 8,
    *,
    style: PlotStyle = DEFAULT_STYLE,
) -> Figure:
    """A grid of the first ``max_images`` images, each with its masked patches shaded (see :func:`mask_overlay`).

    Shows what block-wise masking hides from the student on the actual data. Each panel has two images: the
    picture, then the patch-resolution RGBA overlay (``ax.get_images()[-1]``) stretched over the same extent,
    titled with the masked count. The (gh, gw) grid is laid over the whole image, whatever its pixel size.
    """
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    pictures = _images_hwc(images)
    masks = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, gh, gw), got shape {masks.shape}")
    if masks.dtype != np.bool_:
        raise ValueError(f"masks must be boolean, got dtype {masks.dtype}")
    if masks.shape[0] != pictures.shape[0]:
        raise ValueError(f"length mismatch: {pictures.shape[0]} images vs {masks.shape[0]} masks")
    count = min(max_images, pictures.shape[0])
    if count == 0:
        raise ValueError("images is empty (N = 0)")

    columns = min(count, style.mask_columns)
    rows = math.ceil(count / columns)
    fig = _new_figure(style.panel_size * columns, style.panel_size * rows)
    height, width = pictures.shape[1:3]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # imshow's own extent for an (H, W) array
    for i in range(count):
        ax = fig.add_subplot(rows, columns, i + 1)
        picture = pictures[i]
        if picture.shape[-1] == _GRAY_CHANNELS:
            ax.imshow(picture[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(picture, interpolation="nearest")
        ax.imshow(mask_overlay(masks[i], style), interpolation="nearest", extent=extent)
        ax.set_title(f"{int(masks[i].sum())}/{masks[i].size} masked", fontsize="small")
        ax.set_axis_off()
    return fig


def loss_curve(
    steps: Sequence[float] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    title: str,
    *,
    ylabel: str = "loss",
    log_y: bool = False,
    style: PlotStyle = DEFAULT_STYLE,
    label: str | None = None,
    extra: dict[str, tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]] | None = None,
) -> Figure:
    """A line of ``values`` against ``steps`` (a training or validation curve); ``log_y`` for losses spanning decades.

    ``extra``: more curves on the same axes, ``{label: (steps, values)}`` (e.g. the held-out loss, drawn with markers
    since it is evaluated every few hundred steps); with any, a legend names each line (``label`` the first).
    """
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"steps and values must be 1-D, got shapes {x.shape} and {y.shape}")
    if x.shape != y.shape:
        raise ValueError(f"length mismatch: {x.shape[0]} steps vs {y.shape[0]} values")
    if x.size == 0:
        raise ValueError("steps and values are empty: nothing to plot")
    if log_y and not np.all(y[np.isfinite(y)] > 0):
        raise ValueError("log_y needs strictly positive values")
    fig = _new_figure(style.width, style.curve_height)
    ax = fig.add_subplot()
    ax.plot(x, y, color=style.curve_color, label=label)
    for k, (name, (extra_x, extra_y)) in enumerate((extra or {}).items()):
        color = f"C{k + 1}"  # matplotlib's cycle after the first colour: each extra curve stands apart
        ax.plot(
            np.asarray(extra_x, dtype=np.float64),
            np.asarray(extra_y, dtype=np.float64),
            marker="o",
            label=name,
            color=color,
        )
    if extra:
        ax.legend()
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=style.grid_alpha)
    return fig


def eval_sets_bar_chart(
    top1: Mapping[str, Mapping[str, float]],
    title: str,
    *,
    synthetic: Collection[str] = (),
    average: Mapping[str, float] | None = None,
    style: PlotStyle = DEFAULT_STYLE,
) -> Figure:
    """Grouped bars of top-1 accuracy: the evaluation sets on the x axis (in the first run's order), one bar per run
    in each group (colours, legend), values printed on the bars.

    Sets in ``synthetic`` (computed renditions, not real images) are hatched, so a reader does not weigh them like
    real ones. ``average`` (run -> the robustness average) is its own group at the right, past a dashed line.
    """
    if not top1:
        raise ValueError("top1 is empty: nothing to plot")
    runs = list(top1)
    sets = list(top1[runs[0]])
    if not sets or any(list(top1[r]) != sets for r in runs):
        raise ValueError(f"every run needs the same sets in the same order, got {[list(v) for v in top1.values()]}")
    if average is not None and sorted(average) != sorted(runs):
        raise ValueError(f"average needs one value per run: runs {runs}, average for {list(average)}")
    if unknown := sorted(set(synthetic) - set(sets)):
        raise ValueError(f"synthetic names sets that are not plotted: {unknown}")
    if average is not None and "average" in sets:
        raise ValueError("a set named 'average' would be confused with the average group")
    groups = sets + (["average"] if average is not None else [])
    values = np.asarray(
        [[top1[r][s] for s in sets] + ([average[r]] if average is not None else []) for r in runs], dtype=np.float64
    )
    if not np.all(np.isfinite(values)):
        raise ValueError(f"top1 holds non-finite accuracies: {dict(top1)}")

    positions = np.arange(len(groups), dtype=np.float64)
    if average is not None:
        positions[-1] += 0.5  # the average stands apart from the sets it averages
    width = style.group_width / len(runs)
    fig = _new_figure(max(style.width, style.group_bar_width * values.size + 2.0), style.group_height)
    ax = fig.add_subplot()
    for r, run in enumerate(runs):
        offsets = positions - style.group_width / 2 + (r + 0.5) * width
        bars = ax.bar(offsets, values[r], width, color=f"C{r}", label=readable_name(run))
        for bar, group in zip(bars, groups, strict=True):
            if group in synthetic:
                bar.set_hatch(style.synthetic_hatch)
        ax.bar_label(
            bars,
            labels=[style.value_format.format(v) for v in values[r]],
            padding=style.value_pad,
            rotation=90,
            fontsize=style.group_label_size,
        )
    if average is not None:
        ax.axvline((positions[-2] + positions[-1]) / 2, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(positions, labels=groups, rotation=30, ha="right", rotation_mode="anchor")
    top = max(1.0, float(values.max()))
    ax.set_ylim(0.0, top * style.group_headroom)
    ax.set_yticks(np.linspace(0.0, top, 6))  # no tick above the largest possible accuracy
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    ax.grid(axis="y", alpha=style.grid_alpha)
    handles, labels = ax.get_legend_handles_labels()
    if synthetic:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch=style.synthetic_hatch))
        labels.append("synthetic set")
    fig.legend(handles, labels, loc="outside right upper", frameon=False)
    return fig
