"""What the exploration notebook shows, checked against what training computed: the batch of a step is the one the
loop fed the student, the cosine maps' masked mean is minus the held-out MIM loss, the held-out views are the
validation set's, and the curves and tables hold the run's numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from eva_pipeline.evaluation import explore
from eva_pipeline.ingest.readers.idx import read_idx
from eva_pipeline.loader.heldout import validation_rows
from eva_pipeline.loader.pixels import TensorPixels
from eva_pipeline.loader.transforms import resize_uint8, to_model_input
from eva_pipeline.masking import mask_rng
from eva_pipeline.models import EvaMIM, get_config, save_official_checkpoint
from eva_pipeline.targets.extract import teacher_views
from eva_pipeline.targets.store import TargetStore
from eva_pipeline.training.loop import run_pretraining
from eva_pipeline.training.recipe import make_mask_generator
from eva_pipeline.training.validation import ValidationSet, validation_loss, validation_mask
from eva_test_support import TINY, make_params

FMNIST = Path(__file__).resolve().parents[2] / "data" / "01_raw" / "fashion_mnist" / "train-images-idx3-ubyte.gz"
D = 16
HELD_OUT, STORED = 30, 12  # a held-out split of 30 images, targets stored for 12 evenly spaced ones


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.from_numpy(read_idx(FMNIST)[:64].copy()).unsqueeze(1)


@pytest.fixture(scope="module")
def student() -> EvaMIM:
    torch.manual_seed(0)
    return EvaMIM(get_config("eva_tiny_patch4_28", **TINY, target_dim=D)).eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory, images) -> tuple[Path, torch.Tensor]:
    """A validation target store of STORED items (random targets, the on-disk format the pipeline writes)."""
    targets = torch.randn(STORED, 49, D, generator=torch.Generator().manual_seed(5))
    root = tmp_path_factory.mktemp("validation")
    TargetStore(root).compute({"t": 1}, STORED, lambda a, b: targets[a:b], lambda t: t, shard_size=5, progress=False)
    return root, targets.half().float()  # stored in fp16


# ------------------------------------------------------------------------------------------------ masks and batches
@pytest.mark.slow  # a DeepSpeed run of 5 steps: about 5 s
def test_the_batch_of_a_step_is_the_one_the_training_loop_fed_the_student(tmp_path, images) -> None:
    """Images and sample indices of every step, across an epoch boundary, against what run_pretraining consumed."""
    params = make_params(batch_size=8, max_steps=5, checkpoint={"every_steps": 100})
    train = images[:32]  # 4 steps per epoch: step 4 is epoch 1
    targets = torch.randn(32, 49, D, generator=torch.Generator().manual_seed(1))
    fed: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        fed.append((indices.clone(), x.clone()))
        return targets[indices]

    run_pretraining(params, train, recording, D, checkpoint_dir=tmp_path, progress=False)
    assert len(fed) == 5
    for step, (indices, x) in enumerate(fed):
        batch = explore.training_batch(params, TensorPixels(train), step=step)
        assert torch.equal(batch.indices, indices), step
        assert torch.equal(to_model_input(batch.images, 28), x), step
        epoch = step // 4
        generator = make_mask_generator(params, 7)
        for index, mask in zip(batch.indices.tolist(), batch.mask, strict=True):  # each its (seed, epoch, index) draw
            assert torch.equal(mask, torch.from_numpy(generator(mask_rng(params.seed, epoch, index)).reshape(-1)))
        assert 0 < int(batch.mask.sum(1).max()) <= params.masking.num_masking_patches


def test_a_batch_can_be_cut_and_a_step_outside_the_run_is_refused(images) -> None:
    params = make_params(batch_size=8)  # 2 epochs of 4 steps over 32 images
    whole = explore.training_batch(params, TensorPixels(images[:32]), step=3)
    first = explore.training_batch(params, TensorPixels(images[:32]), step=3, count=3)
    assert torch.equal(first.images, whole.images[:3]) and torch.equal(first.mask, whole.mask[:3])
    assert torch.equal(first.indices, whole.indices[:3]) and first.num_masked == whole.num_masked
    with pytest.raises(ValueError, match=r"step must be in \[0, 8\)"):
        explore.training_batch(params, TensorPixels(images[:32]), step=8)
    with pytest.raises(ValueError, match="count"):
        explore.training_batch(params, TensorPixels(images[:32]), count=0)


def test_mask_frequency_is_the_share_of_images_masking_each_patch() -> None:
    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[:, 0] = True
    masks[:2, 4] = True
    frequency = explore.mask_frequency(masks)
    assert frequency.shape == (3, 3)
    assert frequency[0, 0] == 1.0 and frequency[1, 1] == 0.5 and frequency.sum() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="square"):
        explore.mask_frequency(torch.zeros(2, 8, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ held-out cosine
def test_heldout_views_are_the_validation_sets_images_and_targets(images, store) -> None:
    root, targets = store
    split = images[:HELD_OUT]
    views = explore.heldout_views(TensorPixels(split), root, 28)
    rows = validation_rows(HELD_OUT, STORED)  # the evenly spaced rows the targets were stored for
    assert torch.equal(views.images, torch.stack([resize_uint8(split[r], 28) for r in rows]))
    assert torch.equal(views.inputs, teacher_views(TensorPixels(split[rows]), 28, 0, None, 0)(0, STORED))
    assert torch.equal(views.targets, targets)
    cut = explore.heldout_views(TensorPixels(split), root, 28, count=5)
    assert torch.equal(cut.targets, targets[:5]) and torch.equal(cut.images, views.images[:5])
    with pytest.raises(ValueError, match="re-run the teacher_targets pipeline"):
        explore.heldout_views(TensorPixels(split[: STORED - 1]), root, 28)  # fewer images than stored targets


def test_cosine_map_masked_mean_is_minus_the_heldout_loss(student, images, store) -> None:
    root, _ = store
    views = explore.heldout_views(TensorPixels(images[:HELD_OUT]), root, 28)
    maps = explore.cosine_map(student, views.inputs, views.targets)  # default: the validation mask
    assert maps.shape == (STORED, 7, 7)
    mask = validation_mask(49)
    valset = ValidationSet(
        lambda a, b: views.inputs[a:b], TargetStore(root).reader(), STORED, every_steps=1, batch_size=5
    )
    loss = validation_loss(student, valset, 49, torch.device("cpu"))
    assert float(-maps.flatten(1)[:, mask].mean()) == pytest.approx(loss, abs=1e-6)
    # each masked patch: the training forward's prediction for it; visible ones come from the same pass
    with torch.no_grad():
        predicted = student(views.inputs, mask.expand(STORED, -1))
    expected = F.cosine_similarity(predicted, views.targets[:, mask].reshape(-1, D), dim=-1)
    assert torch.allclose(maps.flatten(1)[:, mask].reshape(-1), expected, atol=1e-5)


def test_cosine_map_takes_any_mask_and_restores_the_training_mode(student, images, store) -> None:
    root, _ = store
    views = explore.heldout_views(TensorPixels(images[:HELD_OUT]), root, 28, count=4)
    nothing = torch.zeros(4, 49, dtype=torch.bool)
    everything = torch.ones(49, dtype=torch.bool)
    student.train()
    try:
        unmasked = explore.cosine_map(student, views.inputs, views.targets, nothing)
        assert student.training
    finally:
        student.eval()
    with torch.no_grad():
        predicted = student.lm_head(student.forward_features(views.inputs)[:, 1:])  # no mask token anywhere
    expected = F.cosine_similarity(predicted, views.targets, dim=-1)
    assert torch.allclose(unmasked.flatten(1), expected, atol=1e-6)
    assert not torch.allclose(explore.cosine_map(student, views.inputs, views.targets, everything), unmasked)
    with pytest.raises(ValueError, match=r"targets must be \(B, N, D\)"):
        explore.cosine_map(student, views.inputs, views.targets[:, :, :8])


def test_cosine_overview_titles_the_masked_and_visible_means(student, images, store) -> None:
    root, _ = store
    views = explore.heldout_views(TensorPixels(images[:HELD_OUT]), root, 28, count=3)
    mask = validation_mask(49)
    maps = explore.cosine_map(student, views.inputs, views.targets, mask)
    fig = explore.cosine_overview(views.images, maps, mask)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 6
    grid_mask = mask.reshape(7, 7).numpy()
    for i, ax in enumerate(panels[3:]):
        cos = maps[i].numpy()
        assert ax.get_title() == f"masked {cos[grid_mask].mean():.2f}\nvisible {cos[~grid_mask].mean():.2f}"
        np.testing.assert_array_equal(ax.get_images()[0].get_array(), cos)
    with pytest.raises(ValueError, match="one each"):
        explore.cosine_overview(views.images[:2], maps, mask)


# ------------------------------------------------------------------------------------------------ student weights
def test_load_student_reads_the_saved_fp16_checkpoint(tmp_path, student, images) -> None:
    path = save_official_checkpoint(student, tmp_path / "eva_student.pt")
    state = torch.load(path, weights_only=True)["model"]
    params = make_params()
    loaded = explore.load_student(params, state)
    assert not loaded.training and loaded.lm_head.out_features == D
    assert loaded.cls_token.dtype == torch.float32
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name].float()), name
    x = to_model_input(images[:2], 28)
    mask = validation_mask(49).expand(2, -1)
    with torch.no_grad():
        assert torch.allclose(loaded(x, mask), student(x, mask), atol=2e-2)  # fp16-rounded weights
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        explore.load_student(params, {k: v for k, v in state.items() if not k.startswith("lm_head")})


# ------------------------------------------------------------------------------------------------ curves and tables
def test_training_curves_plot_loss_heldout_loss_and_lr() -> None:
    history = pd.DataFrame(
        {
            "step": [1, 2, 3, 4],
            "loss": [0.0, -0.2, -0.3, -0.4],
            "lr": [0.0, 1e-3, 5e-4, 1e-5],
            "val_loss": [np.nan, -0.25, np.nan, -0.45],
        }
    )
    fig = explore.training_curves(history)
    loss_ax, lr_ax = fig.axes
    train, held_out = loss_ax.get_lines()
    np.testing.assert_array_equal(train.get_ydata(), history["loss"])
    np.testing.assert_array_equal(held_out.get_xdata(), [2, 4])
    np.testing.assert_array_equal(held_out.get_ydata(), [-0.25, -0.45])
    np.testing.assert_array_equal(lr_ax.get_lines()[0].get_ydata(), history["lr"])
    assert len(explore.training_curves(history.drop(columns="val_loss")).axes[0].get_lines()) == 1
    with pytest.raises(ValueError, match=r"missing \['lr'\]"):
        explore.training_curves(history.drop(columns="lr"))
    with pytest.raises(ValueError, match="empty"):
        explore.training_curves(history.iloc[:0])


def test_probe_table_rows_and_the_students_margin() -> None:
    metrics = {
        "probe_top1_pretrained": 0.83,
        "probe_top1_random": 0.78,
        "probe_top1_raw_pixels": 0.80,
        "probe_gain": 0.05,
        "probe_chance": 0.1,
    }
    table = explore.probe_table(metrics)
    assert list(table.index) == ["pretrained", "random", "raw_pixels", "chance"]
    assert table["top1"].tolist() == [0.83, 0.78, 0.80, 0.1]
    assert table["student_margin"].tolist() == pytest.approx([0.0, 0.05, 0.03, 0.73])
    with pytest.raises(ValueError, match="probe_top1_pretrained"):
        explore.probe_table({"probe_top1_random": 0.5})


def test_classification_frame_recomputes_the_reports_average_and_gap() -> None:
    metrics = {
        "target": "val",
        "sets": {
            "val": {"kind": "real", "images": 10, "scored_classes": 10, "in_average": True},
            "sketch": {"kind": "synthetic", "images": 10, "scored_classes": 10, "in_average": True},
            "extra": {"kind": "real", "images": 10, "scored_classes": 10, "in_average": False},
        },
        "runs": {
            "student": {
                "val": {"top1": 0.8, "top5": 0.99},
                "sketch": {"top1": 0.2, "top5": 0.5},
                "extra": {"top1": 0.1, "top5": 0.3},
                "average": 0.5,
                "gap": 0.3,
            },
            "random": {
                "val": {"top1": 0.4, "top5": 0.9},
                "sketch": {"top1": 0.1, "top5": 0.4},
                "extra": {"top1": 0.0, "top5": 0.2},
                "average": 0.25,
                "gap": 0.15,
            },
        },
    }
    frame = explore.classification_frame(metrics)
    assert list(frame.index) == ["student", "random"]
    assert frame.loc["student", "sketch/top5"] == 0.5
    for run in ("student", "random"):
        assert frame.loc[run, ["average", "gap"]].tolist() == pytest.approx(
            [metrics["runs"][run]["average"], metrics["runs"][run]["gap"]]
        )
    with pytest.raises(ValueError, match="runs"):
        explore.classification_frame({"target": "val", "sets": {}})


def test_video_frame_one_row_per_run_and_target() -> None:
    entry = {"classes": 4, "clips": 8, "1x1": {"top1": 0.5, "top5": 1.0}, "4x3": {"top1": 0.625, "top5": 1.0}}
    metrics = {
        "split": "validate",
        "views": {"1x1": "centre", "4x3": "mean"},
        "runs": {"student": {"v400": entry, "v600": {**entry, "clips": 6}}, "random": {"v400": entry}},
    }
    frame = explore.video_frame(metrics)
    assert list(frame.index) == [("student", "v400"), ("student", "v600"), ("random", "v400")]
    assert list(frame.columns) == ["1x1/top1", "1x1/top5", "4x3/top1", "4x3/top5", "clips"]
    assert frame.loc[("student", "v600"), "clips"] == 6 and frame.loc[("random", "v400"), "4x3/top1"] == 0.625
    with pytest.raises(ValueError, match="no run"):
        explore.video_frame({**metrics, "runs": {}})
