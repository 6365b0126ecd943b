"""The fine-tune stages and the classification table on the tiny config, run after the pre-training stages:
what they write, what it contains, and the bad inputs the nodes refuse before writing anything."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from eva_pipeline.config import TargetFinetuneParams
from eva_pipeline.finetune import HeadMappingError, decay_for_run
from eva_pipeline.models import ClassifierCheckpoint, load_classifier_checkpoint
from eva_pipeline.pipelines.finetune.nodes import finetune_target
from png_checks import assert_drawn

# every test reads the chain of stages up to classification_eval: `make test-fast` skips them
pytestmark = pytest.mark.slow

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


@pytest.fixture(scope="module")
def evaluated(workspace) -> object:
    workspace.run("classification_eval")
    return workspace


def test_intermediate_model_covers_both_label_spaces_by_name(evaluated) -> None:
    checkpoint = load_classifier_checkpoint(evaluated.path("eva_intermediate"))
    assert checkpoint.classes == FASHION + ANIMALS
    assert checkpoint.config.img_size == 28 and checkpoint.model_ema is None  # the 21K stage keeps no EMA
    summary = json.loads(evaluated.path("intermediate_summary").read_text())
    assert summary["classes"] == 20 and summary["images"] == 80  # 4 per class
    history = pd.read_csv(evaluated.path("intermediate_history"))
    assert set(history["run"]) == {"intermediate"} and len(history) == summary["steps"] == 5


def test_one_run_per_start_each_with_model_and_ema_at_the_target_size(evaluated) -> None:
    folder = evaluated.path("finetuned_models")
    assert sorted(p.name for p in folder.iterdir()) == ["intermediate.pt", "random.pt", "student.pt"]
    raw = torch.load(folder / "intermediate.pt", map_location="cpu", weights_only=True)
    assert {"model", "model_ema"} <= set(raw)  # EVA-01's fine-tune format
    checkpoints = {p.stem: load_classifier_checkpoint(p) for p in folder.iterdir()}
    size = evaluated.params["finetune"]["img_size"]
    assert size != 28  # the stage changes resolution, so pos_embed is resampled
    for checkpoint in checkpoints.values():
        assert checkpoint.classes == FASHION
        assert checkpoint.config.img_size == size
        grid = size // checkpoint.config.patch_size
        assert checkpoint.model["pos_embed"].shape == (1, 1 + grid * grid, checkpoint.config.embed_dim)
        assert checkpoint.model_ema is not None
    # the three starts differ, and the EMA is not the trained weights
    blocks = [c.model["blocks.0.attn.qkv.weight"] for c in checkpoints.values()]
    assert not torch.equal(blocks[0], blocks[1]) and not torch.equal(blocks[1], blocks[2])
    history = pd.read_csv(evaluated.path("finetune_history"))
    assert list(dict.fromkeys(history["run"])) == ["intermediate", "student", "random"]
    assert history.groupby("run")["step"].max().tolist() == [5, 5, 5]  # the same budget
    summary = json.loads(evaluated.path("finetune_summary").read_text())
    ema = evaluated.params["finetune"]["ema"]
    for run in ("intermediate", "student", "random"):
        assert 0.0 <= summary["runs"][run]["final_val_top1_ema"] <= 1.0
        # 5 steps: the run-scaled window is under one step, so the decay is 0 and the EMA is the last weights
        assert summary["runs"][run]["ema_decay"] == pytest.approx(decay_for_run(5, ema["run_fraction"], ema["decay"]))


def test_the_table_scores_every_run_on_every_set(evaluated, pl) -> None:
    report = json.loads(evaluated.path("classification_metrics").read_text())
    sets = ["val", "fresh", "sketch", "inverted", "natural_adversarial"]
    assert report["target"] == "val" and list(report["sets"]) == sets
    assert report["sets"]["sketch"]["kind"] == "synthetic" and report["sets"]["fresh"]["kind"] == "real"
    assert report["sets"]["natural_adversarial"]["scored_classes"] == 4
    assert report["sets"]["val"]["scored_classes"] == 10 and report["sets"]["val"]["images"] == 20
    assert list(report["runs"]) == ["intermediate", "student", "random", "raw_pixels"]  # the baselines last
    for entry in report["runs"].values():
        top1 = [entry[s]["top1"] for s in sets]
        for s in sets:
            assert 0.0 <= entry[s]["top1"] <= entry[s]["top5"] <= 1.0
        assert entry["average"] == pytest.approx(sum(top1) / len(top1))
        assert entry["gap"] == pytest.approx(entry["val"]["top1"] - entry["average"])
    table = evaluated.path("classification_table").read_text()
    assert "synthetic" in table and "intermediate" in table and "random" in table
    assert_drawn(evaluated.path("classification_plot"))


def _node_inputs(workspace):
    catalog = workspace.catalog
    return {
        "manifest": catalog.load("manifest"),
        "class_names": catalog.load("class_names"),
        "eva_student": catalog.load("eva_student"),
        "student": catalog.load("student_config"),
    }


def test_target_classes_missing_from_the_intermediate_head_are_named_and_nothing_is_written(
    evaluated, tmp_path
) -> None:
    inputs = _node_inputs(evaluated)
    intermediate = load_classifier_checkpoint(evaluated.path("eva_intermediate"))
    renamed = [name if name != "Sandal" else "sandals" for name in intermediate.classes]
    stranger = ClassifierCheckpoint(intermediate.model, renamed, intermediate.config)
    params = TargetFinetuneParams.model_validate(
        {**evaluated.params["finetune"], "runs": ["intermediate"], "head": "by_name"}
    )
    with pytest.raises(HeadMappingError, match="'Sandal'"):
        finetune_target(**inputs, eva_intermediate=stranger, checkpoints=tmp_path / "ckpt", params=params)
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
    # the documented way out: a fresh head instead of rows by name
    reinit = TargetFinetuneParams.model_validate({**params.model_dump(), "head": "reinit", "max_steps": 1})
    models, *_ = finetune_target(**inputs, eva_intermediate=stranger, checkpoints=tmp_path / "ckpt", params=reinit)
    assert models["intermediate"].classes == FASHION


def test_an_image_size_the_patch_does_not_divide_is_refused_before_anything_is_written(evaluated, tmp_path) -> None:
    inputs = _node_inputs(evaluated)
    params = TargetFinetuneParams.model_validate({**evaluated.params["finetune"], "runs": ["random"], "img_size": 30})
    with pytest.raises(ValueError, match="img_size 30 is not divisible by the patch size 4"):
        finetune_target(**inputs, eva_intermediate=None, checkpoints=tmp_path / "ckpt", params=params)
    assert not (tmp_path / "ckpt").exists()
