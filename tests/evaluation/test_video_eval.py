"""Video scores (eva_pipeline.evaluation.video): 4x3 softmax averaging vs the 1x1 view, per-class accuracy, the
mirror-pair report and its figure, on hand-computed examples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from video_fakes import FakeDecode, clip_rows, synthetic_frames, unnormalise

from eva_pipeline.evaluation.video import (
    distinct_views,
    factor_accuracy,
    mirror_pair_report,
    multiview_pixel_probs,
    multiview_probs,
    per_class_accuracy,
    per_class_accuracy_plot,
    pixel_features,
    video_scores,
)
from eva_pipeline.loader.video import BadClip, VideoViewsDataset, spatial_crops, uniform_view_indices
from png_checks import assert_drawn

SIZE, T, CLIPS, CROPS = 16, 4, 4, 3
MIDDLE = 7  # clip 4 // 2 = 2, centre crop 1: 2 * 3 + 1
# logits of every view but the middle one, and of the middle one, by video % 3 (= its label). By hand:
# video 0: eleven views say 0, the middle one 1 -> 4x3 right, 1x1 wrong;
# video 1: eleven views say 1 (strongly), the middle one 0 -> 4x3 right, 1x1 wrong;
# video 2: eleven views lean to 1, the middle one says 2 -> 4x3 wrong (0.50 on class 1, 0.19 on 2), 1x1 right.
USUAL = {0: [2.0, 0.0, 0.0], 1: [0.0, 3.0, 0.0], 2: [0.0, 0.5, -1.0]}
MIDDLE_VIEW = {0: [0.0, 5.0, 0.0], 1: [4.0, 0.0, 0.0], 2: [0.0, 0.0, 4.0]}


class ViewReader(torch.nn.Module):
    """Logits from what a view shows: its video (channel 1), its temporal clip (first frame, channel 0) and its
    crop (mean of the left-to-right ramp, channel 2): ``MIDDLE_VIEW`` for clip 2's centre crop, else ``USUAL``."""

    def __init__(self, num_frames: dict[int, int]) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.first_frames = {v: uniform_view_indices(n, T, CLIPS)[:, 0].tolist() for v, n in num_frames.items()}
        ramps = unnormalise(spatial_crops(synthetic_frames(0, [0]), SIZE, CROPS))[:, 2].mean(dim=(1, 2, 3))
        self.ramps = ramps.tolist()
        self.seen: list[tuple[int, int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 5 and x.shape[1:] == (3, T, SIZE, SIZE)
        pixels = unnormalise(x)
        rows = []
        for view in pixels:
            video = round(view[1].mean().item() / 10)
            clip = self.first_frames[video].index(round(view[0, 0].mean().item()))
            ramp = view[2].mean().item()
            crop = min(range(CROPS), key=lambda s: abs(self.ramps[s] - ramp))
            self.seen.append((video, clip, crop))
            middle = (clip, crop) == (CLIPS // 2, CROPS // 2)
            rows.append((MIDDLE_VIEW if middle else USUAL)[video % 3])
        return torch.tensor(rows, dtype=x.dtype) * self.scale


def views_dataset(n: int = 3, bad: frozenset[str] = frozenset()) -> VideoViewsDataset:
    return VideoViewsDataset(
        clip_rows(n), num_frames=T, img_size=SIZE, num_clips=CLIPS, num_crops=CROPS, decode=FakeDecode(bad=bad)
    )


def expected_probs(video: int) -> torch.Tensor:
    usual = torch.tensor(USUAL[video % 3]).softmax(0)
    middle = torch.tensor(MIDDLE_VIEW[video % 3]).softmax(0)
    return (11 * usual + middle) / 12


def test_multiview_averages_softmax_and_picks_the_1x1_view() -> None:
    dataset = views_dataset()
    model = ViewReader({v: 40 + v for v in range(3)})
    model.train()
    probs, labels, view1 = multiview_probs(model, dataset, batch_size=2, device="cpu")
    assert model.training  # mode restored
    assert sorted(model.seen) == sorted((v, c, s) for v in range(3) for c in range(CLIPS) for s in range(CROPS))
    assert labels.tolist() == [0, 1, 2]
    assert torch.allclose(probs, torch.stack([expected_probs(v) for v in range(3)]), atol=1e-6)
    assert torch.allclose(view1, torch.stack([torch.tensor(MIDDLE_VIEW[v]).softmax(0) for v in range(3)]), atol=1e-6)
    assert probs.argmax(1).tolist() == [0, 1, 1]
    assert view1.argmax(1).tolist() == [1, 0, 2]
    assert video_scores(probs, labels, ks=(1, 2)) == {
        "top1": pytest.approx(2 / 3),
        "top2": pytest.approx(2 / 3),
        "clips": 3,
    }
    assert video_scores(view1, labels, ks=(1,)) == {"top1": pytest.approx(1 / 3), "clips": 3}
    assert dataset.bad_clips == []


class CountingLinear(torch.nn.Module):
    """A linear map of the mean pixel per channel and frame; counts the views it is given."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3 * T, 3)
        self.views = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.views += x.shape[0]
        return self.fc(x.mean(dim=(3, 4)).flatten(1))


def test_identical_crops_of_square_frames_run_once_with_the_same_scores() -> None:
    """Square frames: the 3 crops are the same pixels, so the model runs on 4 views per clip, not 12, and the
    scores equal those of every view run (landscape frames, above, run all 12)."""
    square = VideoViewsDataset(
        clip_rows(3), num_frames=T, img_size=SIZE, num_clips=CLIPS, num_crops=CROPS,
        decode=FakeDecode(height=SIZE, width=SIZE),
    )  # fmt: skip
    model = CountingLinear()
    probs, labels, view1 = multiview_probs(model, square, batch_size=2, device="cpu")
    assert model.views == 3 * CLIPS
    with torch.no_grad():
        every = torch.stack([model(square[i][0]).softmax(-1) for i in range(3)])  # (3, 12, K): all views
    assert torch.allclose(probs, every.mean(dim=1), atol=1e-6)
    assert torch.allclose(view1, every[:, MIDDLE], atol=1e-6)
    assert labels.tolist() == [0, 1, 2]


def test_distinct_views_by_hand() -> None:
    a, b = torch.zeros(2, 2), torch.ones(2, 2)
    views = torch.stack([torch.stack([a, b, a, b, b]), torch.stack([b, b, b, a, a])])  # (2 clips, 5 views, 2, 2)
    distinct, inverse = distinct_views(views)
    assert distinct.tolist() == [0, 1, 5, 8]
    assert inverse.tolist() == [0, 1, 0, 1, 1, 2, 2, 2, 3, 3]
    assert torch.equal(views.flatten(0, 1)[distinct][inverse], views.flatten(0, 1))


def test_multiview_skips_bad_clips_and_records_them_from_workers() -> None:
    dataset = views_dataset(4, bad=frozenset({"v1.mp4"}))
    model = ViewReader({v: 40 + v for v in range(4)})
    probs, labels, view1 = multiview_probs(model, dataset, batch_size=1, device="cpu", num_workers=2)
    assert labels.tolist() == [0, 2, 0]  # videos 0, 2 and 3; video 1 does not decode
    assert torch.allclose(probs, torch.stack([expected_probs(v) for v in (0, 2, 3)]), atol=1e-6)
    assert view1.shape == (3, 3)
    # recorded in the main process although a worker met it
    assert dataset.bad_clips == [BadClip("clips/v1.mp4", "moov atom not found in v1.mp4")]
    assert video_scores(probs, labels, ks=(1,))["clips"] == 3
    with pytest.raises(ValueError, match="none of the 2 clips decodes"):
        multiview_probs(model, views_dataset(2, bad=frozenset({"v0.mp4", "v1.mp4"})), batch_size=2, device="cpu")


def test_video_scores_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="labels"):
        video_scores(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="k must be"):
        video_scores(torch.zeros(2, 3), torch.tensor([0, 1]), ks=(1, 5))
    with pytest.raises(ValueError, match="N = 0"):
        video_scores(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))


NAMES = ["moving left", "moving right", "still", "spinning"]
LABELS = torch.tensor([0, 0, 1, 1, 2, 1])
PREDICTED = torch.tensor([0, 1, 1, 1, 0, 2])


def one_hot_probs(predicted: torch.Tensor, classes: int = len(NAMES)) -> torch.Tensor:
    return torch.nn.functional.one_hot(predicted, classes).float() * 0.7 + 0.3 / classes


def mirror_of(name: str) -> str | None:
    return {"moving left": "moving right", "moving right": "moving left"}.get(name)


def test_per_class_accuracy_by_hand() -> None:
    table = per_class_accuracy(one_hot_probs(PREDICTED), LABELS, NAMES)
    assert list(table["class"]) == NAMES
    assert table["clips"].tolist() == [2, 3, 1, 0]
    assert table["correct"].tolist() == [1, 2, 0, 0]
    assert table["accuracy"].iloc[:3].tolist() == pytest.approx([0.5, 2 / 3, 0.0])
    assert math.isnan(table["accuracy"].iloc[3])
    assert table["confused_with"].tolist() == ["moving right", "still", "moving left", ""]
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        per_class_accuracy(one_hot_probs(PREDICTED), LABELS, NAMES[:3])


def test_mirror_pair_report_by_hand() -> None:
    report = mirror_pair_report(one_hot_probs(PREDICTED), LABELS, NAMES, mirror_of)
    # mirrored clips: labels 0, 0, 1, 1, 1 -> predicted 0, 1, 1, 1, 2: 3 right, 1 mirror, 1 other error
    assert report == {
        "mirrored_classes": 2,
        "mirrored_clips": 5,
        "mirrored_top1": pytest.approx(0.6),
        "unmirrored_clips": 1,
        "unmirrored_top1": pytest.approx(0.0),
        "mirror_rate": pytest.approx(0.2),
        "mirror_share_of_errors": pytest.approx(0.5),
    }
    # a model that always picks the mirror
    swapped = torch.tensor([1, 1, 0, 0, 2, 0])
    blind = mirror_pair_report(one_hot_probs(swapped), LABELS, NAMES, mirror_of)
    assert blind["mirrored_top1"] == 0.0 and blind["mirror_rate"] == 1.0 and blind["unmirrored_top1"] == 1.0
    assert math.isnan(mirror_pair_report(one_hot_probs(PREDICTED), LABELS, NAMES, lambda _: None)["mirror_rate"])
    with pytest.raises(ValueError, match="is not another class"):
        mirror_pair_report(one_hot_probs(PREDICTED), LABELS, NAMES, lambda n: "moving up")


def test_per_class_plot_one_bar_per_class_and_run(tmp_path: Path) -> None:
    table = per_class_accuracy(one_hot_probs(PREDICTED), LABELS, NAMES)
    fig = per_class_accuracy_plot(table, "Demo")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert len(ax.patches) == len(NAMES)
    assert [p.get_width() for p in ax.patches] == pytest.approx([0.5, 2 / 3, 0.0, 0.0])
    assert [t.get_text() for t in ax.get_yticklabels()] == NAMES
    assert "no clips" in {t.get_text() for t in ax.texts}
    out = tmp_path / "per_class.png"
    fig.savefig(out)
    assert_drawn(out)
    other = per_class_accuracy(one_hot_probs(LABELS), LABELS, NAMES)
    two = per_class_accuracy_plot({"4x3": table, "1x1": other})
    (ax,) = two.axes
    assert len(ax.patches) == 2 * len(NAMES)
    assert len({p.get_facecolor() for p in ax.patches}) == 2
    assert [t.get_text() for t in two.legends[0].get_texts()] == ["4x3", "1x1"]
    with pytest.raises(ValueError, match="other classes"):
        per_class_accuracy_plot({"a": table, "b": table.iloc[::-1]})
    with pytest.raises(ValueError, match="lacks column"):
        per_class_accuracy_plot(pd.DataFrame({"class": ["a"]}))
    assert np.isfinite([p.get_width() for p in ax.patches]).all()


def test_the_pixel_baseline_scores_every_view_and_skips_bad_clips() -> None:
    """A linear model on pixels through the same views: per-view softmax averaged, the 1x1 view picked, a clip that
    does not decode skipped. The logits read the first channel's mean (the frame indices of the view)."""
    dataset = views_dataset(4, bad=frozenset({"v2.mp4"}))
    weights = torch.tensor([[1.0], [-1.0], [0.5]])

    def logits(features: np.ndarray) -> torch.Tensor:
        assert features.shape[1] == T * SIZE * SIZE  # one channel of every frame
        return torch.from_numpy(features.mean(axis=1, keepdims=True)).float() @ weights.T

    probs, labels, view1 = multiview_pixel_probs(logits, dataset)
    assert labels.tolist() == [0, 1, 0]  # videos 0, 1, 3
    for row, video in enumerate((0, 1, 3)):
        views, _ = dataset[video]
        softmax = logits(pixel_features(views)).softmax(dim=1)
        assert torch.allclose(probs[row], softmax.mean(dim=0)) and torch.allclose(view1[row], softmax[MIDDLE])
        assert not torch.allclose(softmax[0], softmax[MIDDLE])  # the views differ: the average is not one view


def test_factor_accuracy_by_hand() -> None:
    """Right on a part when the predicted class shares it with the true one."""
    names = ["tops left", "tops right", "shoes left", "shoes right"]

    def parts(name: str) -> dict[str, str] | None:
        group, motion = name.split()
        return {"group": group, "motion": motion}

    labels = torch.tensor([0, 0, 1, 2, 3])
    predicted = torch.tensor([0, 1, 3, 0, 0])  # right, group only, motion only, motion only, neither
    report = factor_accuracy(one_hot_probs(predicted, 4), labels, names, parts)
    assert report == {"group": pytest.approx(2 / 5), "motion": pytest.approx(3 / 5)}
    with pytest.raises(ValueError, match="unknown: \\['still'\\]"):
        factor_accuracy(
            one_hot_probs(predicted, 5), labels, [*names, "still"], lambda n: None if n == "still" else parts(n)
        )
