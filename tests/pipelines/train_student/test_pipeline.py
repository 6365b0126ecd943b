"""The train_student pipeline alone: official-format weights, per-step history, summary, figures, run config."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from eva_pipeline.models import EvaMIM, get_config, load_official_checkpoint
from eva_pipeline.pipelines.common import split_source
from eva_pipeline.training.recipe import initial_student
from eva_pipeline.training.validation import open_validation_set, validation_loss
from png_checks import assert_drawn

TARGET_DIM = 112


def test_weights_are_an_official_fp16_checkpoint(workspace, pl):
    workspace.run("train_student")
    checkpoint = torch.load(workspace.path("eva_student"), map_location="cpu", weights_only=True)

    assert set(checkpoint) == {"model"}
    state = checkpoint["model"]
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert state["lm_head.weight"].shape[0] == TARGET_DIM
    model = EvaMIM(get_config("eva_tiny_patch4_28", target_dim=TARGET_DIM))
    load_official_checkpoint(model, state)  # every key present, every shape right
    # the weights moved away from the seeded initialisation
    torch.manual_seed(workspace.params["pretrain"]["seed"])
    init = EvaMIM(get_config("eva_tiny_patch4_28", target_dim=TARGET_DIM)).state_dict()
    assert any(not torch.allclose(init[k].half(), state[k]) for k in state if state[k].is_floating_point())


def test_history_has_one_row_per_step(workspace, pl):
    workspace.run("train_student")
    history = pd.read_csv(workspace.path("pretrain_history"))

    assert len(history) == pl.STEPS
    assert history["step"].tolist() == list(range(1, pl.STEPS + 1))
    assert {"loss", "lr", "grad_norm", "images_per_second", "epoch"} <= set(history.columns)
    assert np.isfinite(history[["loss", "lr", "grad_norm", "images_per_second"]].to_numpy()).all()
    assert history["lr"].iloc[0] < history["lr"].iloc[-1]  # warmup


def test_logged_held_out_loss_is_the_saved_students(workspace, pl):
    """The history's last ``val_loss`` is the held-out loss of the very weights the stage saved, recomputed here from
    the checkpoint, the held-out images and their stored targets; the untrained student scores another loss."""
    workspace.run("train_student")
    logged = pd.read_csv(workspace.path("pretrain_history"))["val_loss"].dropna()
    assert len(logged) >= 1 and logged.index[-1] == pl.STEPS - 1  # evaluated after the last step
    params = workspace.catalog.load("student_config")
    targets = workspace.catalog.load("teacher_targets")
    rows = split_source(workspace.catalog.load("manifest"), targets.validation["split"])
    config = get_config(params.model.name, **{**params.model.overrides, "target_dim": TARGET_DIM})
    valset = open_validation_set(rows, str(targets.validation_root), config.img_size, every_steps=1, batch_size=16)

    def held_out_loss(model: EvaMIM) -> float:
        return validation_loss(model.eval(), valset, config.num_patches, torch.device("cpu"))

    saved = EvaMIM(config)
    load_official_checkpoint(saved, torch.load(workspace.path("eva_student"), map_location="cpu", weights_only=True))
    assert held_out_loss(saved) == pytest.approx(logged.iloc[-1], abs=2e-3)  # fp16 weights on disk
    untrained = held_out_loss(initial_student(params, TARGET_DIM))
    assert abs(untrained - logged.iloc[-1]) > 1e-2


def test_summary_and_figures(workspace, pl):
    workspace.run("train_student")
    summary = json.loads(workspace.path("pretrain_summary").read_text())

    assert set(summary) == {"steps", "final_loss", "images_per_second", "final_val_loss"}
    assert summary["steps"] == pl.STEPS
    assert math.isfinite(summary["final_loss"]) and summary["images_per_second"] > 0
    assert math.isfinite(summary["final_val_loss"])
    for figure in ("pretrain_loss_plot", "mask_examples_plot"):
        assert_drawn(workspace.path(figure))
    resolved = yaml.safe_load(workspace.path("student_config").read_text())  # what this stage trained with
    assert resolved["pretrain"]["batch_size"] == pl.BATCH
    assert resolved["pretrain"]["augmentation"] == {  # defaults filled in
        "enabled": False,
        "scale": [0.2, 1.0],
        "ratio": [0.75, 4 / 3],
        "flip_prob": 0.5,
    }
    assert "dir" not in resolved["pretrain"]["checkpoint"]  # where checkpoints go is the catalog's


def test_resumable_state_goes_to_the_configured_checkpoint_folder(workspace):
    workspace.run("train_student")
    folder = workspace.path("pretrain_checkpoints")
    assert folder.is_relative_to(workspace.root) and any(p.is_file() for p in folder.rglob("*"))


def test_rerun_over_a_finished_run_keeps_the_whole_history(workspace, pl):
    """`dvc repro` after `kedro run`: the stage re-runs, resumes at the last step and trains nothing; its history,
    summary and loss plot still describe the whole run (they are not emptied, nor does the plot fail)."""
    import pandas as pd

    workspace.run("train_student")
    before = pd.read_csv(workspace.path("pretrain_history"))
    workspace.run_again("train_student")
    after = pd.read_csv(workspace.path("pretrain_history"))
    assert list(after["step"]) == list(range(1, pl.STEPS + 1))
    pd.testing.assert_series_equal(after["loss"], before["loss"])
    assert workspace.path("pretrain_loss_plot").stat().st_size > 0


def test_mask_picture_shows_the_first_training_views(workspace):
    """The logged mask picture is the loader's own first batch: with augmentation, the augmented crops training
    starts on (epoch-0 order, views and masks), not the raw images."""
    import numpy as np
    import pandas as pd

    from eva_pipeline.config import PretrainParams
    from eva_pipeline.loader.batches import BatchPlan, PretrainBatches
    from eva_pipeline.loader.pixels import ManifestPixels
    from eva_pipeline.loader.rows import FrameRows
    from eva_pipeline.pipelines.train_student.nodes import draw_mask_examples
    from eva_pipeline.training.recipe import epoch_order, make_augmentation, make_mask_generator

    workspace.run("ingestion")
    manifest = pd.read_parquet(workspace.path("manifest"))
    params = PretrainParams.model_validate(
        {**workspace.params["pretrain"], "augmentation": {"enabled": True}, "mask_examples": 3}
    )
    figure = draw_mask_examples(manifest, params)
    rows = FrameRows(manifest[manifest["split"] == "pretrain"])
    plan = BatchPlan(
        pixels=ManifestPixels(rows),
        order=epoch_order(params, len(rows)),
        global_batch=params.batch_size,
        rank=0,
        world_size=1,
        img_size=28,
        seed=params.seed,
        masker=make_mask_generator(params, 7),
        view_mode="augment",
        augment=make_augmentation(params, 28),
    )
    first = PretrainBatches(plan, 0, 1).batch(0)  # the real first training batch (batch 32)
    panels = [ax for ax in figure.axes if ax.get_images()][:3]
    assert len(panels) == 3
    for k, ax in enumerate(panels):
        shown = np.asarray(ax.get_images()[0].get_array(), dtype=np.float64) * 255  # drawn as floats in 0..1
        want = first.images[k].permute(1, 2, 0).numpy().squeeze().astype(np.float64)
        np.testing.assert_allclose(shown.squeeze(), want, atol=0.5)


def test_val_loss_is_the_fixed_mask_loss_of_the_held_out_images(workspace, pl):
    """The logged held-out loss is recomputed here from its definition: the final student on the validation images
    (whole images, as stored with their targets), every other token masked, token mean of -cos."""
    import torch.nn.functional as F

    from eva_pipeline.loader.heldout import validation_rows
    from eva_pipeline.loader.pixels import load_images
    from eva_pipeline.loader.transforms import resize_uint8, to_model_input
    from eva_pipeline.manifest import select_split
    from eva_pipeline.targets.store import TargetStore

    workspace.run("train_student")
    history = pd.read_csv(workspace.path("pretrain_history"))
    logged = history["val_loss"].dropna()
    assert list(logged.index) == [pl.STEPS - 1]  # every_steps (39) > STEPS: evaluated after the last step only

    targets = workspace.catalog.load("teacher_targets")
    probe = select_split(pd.read_parquet(workspace.path("manifest")), "probe")
    images = load_images(probe.iloc[validation_rows(len(probe), targets.validation["num_images"])])
    x = to_model_input(torch.stack([resize_uint8(im, 28) for im in images]), 28)
    model = EvaMIM(get_config("eva_tiny_patch4_28", target_dim=TARGET_DIM)).eval()
    load_official_checkpoint(model, workspace.path("eva_student"))
    mask = torch.zeros(len(x), 49, dtype=torch.bool)
    mask[:, ::2] = True
    with torch.no_grad():
        pred = model(x, mask)
    target = TargetStore(targets.validation_root).load().float()[mask]
    expected = -F.cosine_similarity(pred, target, dim=-1).mean().item()
    assert logged.iloc[0] == pytest.approx(expected, abs=2e-3)  # the saved weights are fp16
