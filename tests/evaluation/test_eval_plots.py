"""Figures: right number of artists, PNGs that show them, and mask shading on exactly the masked patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from eva_pipeline.evaluation import (
    DEFAULT_STYLE,
    eval_sets_bar_chart,
    loss_curve,
    mask_overview,
    probe_bar_chart,
    readable_name,
)
from png_checks import assert_drawn, assert_png_of

RESULTS = {"student_pretrained": 0.81, "student_random_init": 0.42, "teacher": 0.88}


def test_probe_bar_chart(tmp_path: Path) -> None:
    fig = probe_bar_chart(RESULTS, "Linear probe", num_classes=10)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert len(ax.patches) == len(RESULTS)
    assert [p.get_width() for p in ax.patches] == pytest.approx(list(RESULTS.values()))
    assert [t.get_text() for t in ax.get_yticklabels()] == [readable_name(k) for k in RESULTS]
    assert {t.get_text() for t in ax.texts} == {"81.0%", "42.0%", "88.0%"}
    chance = [line for line in ax.get_lines() if isinstance(line, Line2D)]
    assert len(chance) == 1 and chance[0].get_xdata()[0] == pytest.approx(0.1)
    out = tmp_path / "probe.png"
    fig.savefig(out)
    assert_drawn(out)


def test_probe_bar_chart_without_chance_and_bad_input() -> None:
    ax = probe_bar_chart({"a": 0.5}, "t").axes[0]
    assert not ax.get_lines()
    given = probe_bar_chart({"a": 0.5}, "t", chance=0.25).axes[0]
    assert given.get_lines()[0].get_xdata()[0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="not both"):
        probe_bar_chart({"a": 0.5}, "t", chance=0.25, num_classes=4)
    with pytest.raises(ValueError, match="empty"):
        probe_bar_chart({}, "t")
    with pytest.raises(ValueError, match="non-finite"):
        probe_bar_chart({"a": float("nan")}, "t")


def test_readable_name() -> None:
    assert readable_name("student_random_init") == "Student random init"
    assert readable_name("teacher_clip-b16") == "Teacher clip-b16"
    assert readable_name("EVA student (pre-trained)") == "EVA student (pre-trained)"


TOP1 = {
    "intermediate": {"in1k": 0.90, "fresh": 0.80, "sketch": 0.40},
    "student": {"in1k": 0.85, "fresh": 0.75, "sketch": 0.35},
    "random": {"in1k": 0.60, "fresh": 0.55, "sketch": 0.20},
}
AVERAGE = {"intermediate": 0.70, "student": 0.65, "random": 0.45}


def test_eval_sets_bar_chart_groups_runs_per_set_hatches_synthetic_sets(tmp_path: Path) -> None:
    fig = eval_sets_bar_chart(TOP1, "Classification", synthetic={"sketch"}, average=AVERAGE)
    (ax,) = fig.axes
    assert len(ax.patches) == 3 * 4  # runs x (sets + the average)
    heights = [p.get_height() for p in ax.patches]  # run by run, group by group
    assert heights == pytest.approx([v for run in TOP1 for v in [*TOP1[run].values(), AVERAGE[run]]])
    hatched = [bool(p.get_hatch()) for p in ax.patches]
    assert hatched == [False, False, True, False] * 3
    assert [t.get_text() for t in ax.get_xticklabels()] == ["in1k", "fresh", "sketch", "average"]
    assert len({p.get_facecolor() for p in ax.patches}) == 3  # one colour per run
    assert {t.get_text() for t in ax.texts} >= {"90.0%", "45.0%", "20.0%"}
    assert len(ax.texts) == 12
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["Intermediate", "Student", "Random", "synthetic set"]
    assert len(ax.get_lines()) == 1  # the dashed line before the average
    out = tmp_path / "eval_sets.png"
    fig.savefig(out)
    assert_drawn(out)


def test_eval_sets_bar_chart_without_average_and_bad_input() -> None:
    ax = eval_sets_bar_chart({"only": {"a": 0.5}}, "t").axes[0]
    assert len(ax.patches) == 1 and not ax.get_lines() and not ax.patches[0].get_hatch()
    with pytest.raises(ValueError, match="empty"):
        eval_sets_bar_chart({}, "t")
    with pytest.raises(ValueError, match="same sets"):
        eval_sets_bar_chart({"x": {"a": 0.5}, "y": {"b": 0.5}}, "t")
    with pytest.raises(ValueError, match="one value per run"):
        eval_sets_bar_chart({"x": {"a": 0.5}}, "t", average={"y": 0.5})
    with pytest.raises(ValueError, match="not plotted"):
        eval_sets_bar_chart({"x": {"a": 0.5}}, "t", synthetic={"b"})
    with pytest.raises(ValueError, match="non-finite"):
        eval_sets_bar_chart({"x": {"a": float("nan")}}, "t")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_mask_overview_shades_exactly_masked_patches(tmp_path: Path, dtype: torch.dtype) -> None:
    n, grid, patch = 10, (4, 5), 7
    height, width = grid[0] * patch, grid[1] * patch
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, height, width), generator=gen, dtype=torch.uint8)
    if dtype.is_floating_point:
        images = images.to(dtype) / 255
    masks = np.random.default_rng(0).random((n, *grid)) < 0.4
    fig = mask_overview(images, masks, max_images=6)
    assert len(fig.axes) == 6
    for i, ax in enumerate(fig.axes):
        picture, overlay_artist = ax.get_images()
        expected = images[i].permute(1, 2, 0).float().numpy() / (255 if dtype == torch.uint8 else 1)
        np.testing.assert_allclose(picture.get_array(), expected, atol=1e-6)
        overlay = np.asarray(overlay_artist.get_array())
        assert overlay.shape == (*grid, 4)
        shaded = overlay[..., 3] > 0
        np.testing.assert_array_equal(shaded, masks[i])
        np.testing.assert_allclose(overlay[shaded, :3], np.broadcast_to(DEFAULT_STYLE.mask_color, (shaded.sum(), 3)))
        # the patch grid is stretched over exactly the picture: cell (r, c) covers pixels r*patch.., c*patch..
        assert overlay_artist.get_extent() == pytest.approx(picture.get_extent())
        assert picture.get_extent() == pytest.approx((-0.5, width - 0.5, height - 0.5, -0.5))
        assert ax.get_title() == f"{masks[i].sum()}/{masks[i].size} masked"
    out = tmp_path / "masks.png"
    fig.savefig(out)
    assert_drawn(out)


def test_mask_overview_grayscale_any_resolution_and_bad_input() -> None:
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)  # raw Fashion-MNIST vs a 16x16 model grid
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[:, :4, 8:] = True
    fig = mask_overview(images, masks)
    assert len(fig.axes) == 3
    assert np.asarray(fig.axes[0].get_images()[-1].get_array())[..., 3].astype(bool).sum() == 32
    with pytest.raises(ValueError, match="length mismatch"):
        mask_overview(images, masks[:2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_overview(images.float() / 127.5 - 1, masks)
    with pytest.raises(ValueError, match="boolean"):
        mask_overview(images, masks.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N, 1 or 3, H, W\)"):
        mask_overview(images[:, :, :, :, None], masks)


def test_loss_curve(tmp_path: Path) -> None:
    steps = np.arange(50)
    values = np.exp(-steps / 10) + 0.1
    fig = loss_curve(steps, values, "train loss", log_y=True)
    (ax,) = fig.axes
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), values)
    assert ax.get_yscale() == "log"
    out = tmp_path / "loss.png"
    fig.savefig(out)
    assert_drawn(out)
    with pytest.raises(ValueError, match="length mismatch"):
        loss_curve(steps, values[:-1], "t")
    with pytest.raises(ValueError, match="empty"):
        loss_curve([], [], "t")


def test_figures_do_not_touch_pyplot() -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    probe_bar_chart(RESULTS, "t")
    loss_curve([0, 1], [1.0, 0.5], "t")
    assert plt.get_fignums() == before


def test_png_checks_refuse_blank_and_different_figures(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Figure().savefig(blank)
    with pytest.raises(AssertionError, match="colour"):
        assert_drawn(blank)
    drawn = tmp_path / "drawn.png"
    loss_curve(np.arange(5), np.arange(5.0), "t").savefig(drawn)
    assert_png_of(drawn, loss_curve(np.arange(5), np.arange(5.0), "t"))
    with pytest.raises(AssertionError, match="not the figure"):
        assert_png_of(drawn, loss_curve(np.arange(5), np.arange(5.0)[::-1], "t"))
