"""The held-out MIM loss: which images, which mask, what value, and that evaluating never changes training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eva_pipeline.ingest.readers.idx import read_idx
from eva_pipeline.loader.heldout import validation_rows
from eva_pipeline.loader.pixels import TensorPixels
from eva_pipeline.loader.transforms import to_model_input
from eva_pipeline.models import EvaMIM, get_config
from eva_pipeline.targets.extract import teacher_views
from eva_pipeline.targets.store import TargetStore
from eva_pipeline.training.loop import run_pretraining
from eva_pipeline.training.step import cached_targets
from eva_pipeline.training.validation import ValidationSet, validation_loss, validation_mask
from eva_test_support import TINY, make_params

FMNIST = Path(__file__).resolve().parents[2] / "data" / "01_raw" / "fashion_mnist" / "train-images-idx3-ubyte.gz"
D = 16


def test_rows_are_evenly_spaced_and_cover_a_class_sorted_split():
    labels = np.repeat(np.arange(100), 50)  # 5,000 rows stored class by class
    rows = validation_rows(len(labels), 200)
    assert len(rows) == len(np.unique(rows)) == 200 and rows[0] == 0 and rows[-1] < len(labels)
    assert np.bincount(labels[rows], minlength=100).tolist() == [2] * 100
    assert validation_rows(7, 1000).tolist() == list(range(7))  # asking for more than there is: all of them
    with pytest.raises(ValueError):
        validation_rows(0, 10)


def test_mask_is_every_other_token():
    mask = validation_mask(256)
    assert int(mask.sum()) == 128 and mask[0::2].all() and not mask[1::2].any()  # EVA-g: 128 of 256
    assert int(validation_mask(49).sum()) == 25


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """20 real images, whole, and random stored targets (the store format the pipeline writes)."""
    images = torch.from_numpy(read_idx(FMNIST)[:20].copy()).unsqueeze(1)
    targets = torch.randn(20, 49, D, generator=torch.Generator().manual_seed(3))
    root = tmp_path_factory.mktemp("val")
    TargetStore(root).compute({"t": 1}, 20, lambda a, b: targets[a:b], lambda t: t, shard_size=8, progress=False)
    inputs = teacher_views(TensorPixels(images), 28, 0, None, 0)
    return images, targets, ValidationSet(inputs, TargetStore(root).reader(), 20, every_steps=2, batch_size=6)


def test_loss_is_the_fixed_mask_token_mean_of_minus_cos(held_out):
    images, targets, valset = held_out
    torch.manual_seed(0)
    model = EvaMIM(get_config("eva_tiny_patch4_28", **TINY, target_dim=D)).eval()
    x = to_model_input(images, 28)
    mask = validation_mask(49).expand(20, -1)
    with torch.no_grad():
        expected = -F.cosine_similarity(model(x, mask), targets.half().float()[mask], dim=-1).mean().item()
    assert validation_loss(model, valset, 49, torch.device("cpu")) == pytest.approx(expected, abs=1e-6)
    # one rank's share of two: positions [0, 10)
    with torch.no_grad():
        first = -F.cosine_similarity(model(x[:10], mask[:10]), targets.half().float()[:10][mask[:10]], dim=-1).mean()
    assert validation_loss(model, valset, 49, torch.device("cpu"), rank=0, world_size=2) == pytest.approx(
        first.item(), abs=1e-6
    )


def test_a_set_of_another_size_than_its_targets_is_refused(held_out):
    _, _, valset = held_out
    with pytest.raises(ValueError, match="re-run the teacher_targets pipeline"):
        ValidationSet(valset.inputs, valset.targets, 19, every_steps=2)


def test_evaluating_changes_nothing_and_is_recorded_when_due(tmp_path, held_out):
    """Validation draws nothing and updates nothing: the run is bit-identical with and without it (drop path on)."""
    _images, _, valset = held_out
    train = torch.from_numpy(read_idx(FMNIST)[100:132].copy()).unsqueeze(1)
    targets = torch.randn(32, 49, D, generator=torch.Generator().manual_seed(4))
    changes = {"model": {"overrides": {"depth": 2, "drop_path_rate": 0.5}}, "max_steps": 5}
    plain = run_pretraining(
        make_params(**changes), train, cached_targets(targets), D, checkpoint_dir=tmp_path / "a", progress=False
    )
    logged = []
    validated = run_pretraining(
        make_params(**changes),
        train,
        cached_targets(targets),
        D,
        checkpoint_dir=tmp_path / "b",
        progress=False,
        validation=valset,
        metrics_fn=lambda step, metrics: logged.append((step, metrics)),
    )
    for got, want in zip(validated.model.state_dict().values(), plain.model.state_dict().values(), strict=True):
        assert torch.equal(got, want)
    assert [h["step"] for h in validated.history if "val_loss" in h] == [2.0, 4.0, 5.0]  # every 2, and the last
    assert all("val_loss" not in h for h in plain.history)
    assert [step for step, metrics in logged if "val_loss" in metrics] == [2, 4, 5]  # logged to MLflow when due
    final = validation_loss(validated.model.eval(), valset, 49, torch.device("cpu"))
    assert validated.history[-1]["val_loss"] == pytest.approx(final, abs=1e-6)
