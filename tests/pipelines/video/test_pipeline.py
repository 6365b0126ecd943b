"""The video stages on the tiny config, after the pre-training stages: the generated Moving Fashion-MNIST clips, the
Kinetics-722 merge, the K722 and target fine-tunes and the multi-view table; what they write and what it contains."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from eva_pipeline.ingest.moving_fashion_mnist import ALIASES, VERSIONS
from eva_pipeline.models import load_classifier_checkpoint
from png_checks import assert_drawn

pytestmark = pytest.mark.slow  # the chain of stages up to video_eval

RUNS, TARGETS = ("student", "random"), ("v400", "v600", "v700")


@pytest.fixture(scope="module")
def evaluated(workspace) -> object:
    workspace.run("video_eval")
    return workspace


def test_ingestion_merges_the_versions_into_k722_without_leakage(evaluated) -> None:
    manifest = pd.read_parquet(evaluated.path("video_manifest"))
    mapping = json.loads(evaluated.path("k722_class_mapping").read_text())
    report = json.loads(evaluated.path("video_ingestion_report").read_text())
    assert set(manifest["dataset"]) == {"k722", *TARGETS}
    assert mapping["k722_classes"] == sorted(VERSIONS["v700"])  # the union after the alias is the largest version
    for old, new in ALIASES.items():
        assert old in mapping["versions"]["v400"]["classes"] and old not in mapping["k722_classes"]
        assert new in mapping["k722_classes"]
    for version in TARGETS:  # each version's classes index the K722 head by name, the alias resolved
        entry = mapping["versions"][version]
        names = [mapping["k722_classes"][i] for i in entry["k722_index"]]
        assert names == [ALIASES.get(c, c) for c in entry["classes"]]
    k722 = manifest[manifest["dataset"] == "k722"]
    held_out = set(manifest.loc[manifest["split"] != "train", "youtube_id"])
    assert not set(k722.loc[k722["split"] == "train", "youtube_id"]) & held_out  # no training clip is held out
    assert report["k722"]["train"]["leakage_removed"] > 0  # the generator leaks on purpose; the merge removes them
    assert k722["clip_id"].is_unique and (manifest["num_frames"] == 8).all()
    assert json.loads(evaluated.path("synthetic_video_summary").read_text())["generated"] is True


def test_one_k722_model_per_start_and_one_target_model_per_start_and_version(evaluated) -> None:
    folder = evaluated.path("video_intermediate_models")
    assert sorted(p.stem for p in folder.iterdir()) == sorted(RUNS)
    k722 = {p.stem: load_classifier_checkpoint(p) for p in folder.iterdir()}
    assert all(c.video == {"num_frames": 4, "tubelet": 2} and len(c.classes) == 24 for c in k722.values())
    folder = evaluated.path("finetuned_video_models")
    assert sorted(p.stem for p in folder.iterdir()) == sorted(f"{r}_{t}" for r in RUNS for t in TARGETS)
    for path in folder.iterdir():
        checkpoint = load_classifier_checkpoint(path)
        target = path.stem.split("_")[1]
        assert checkpoint.video == {"num_frames": 8, "tubelet": 2}
        assert len(checkpoint.classes) == len(VERSIONS[target])
        grid = 12 // checkpoint.config.patch_size
        assert checkpoint.model["pos_embed"].shape[1] == 1 + 4 * grid * grid  # 2 -> 4 tubelets, resized over time
    student, random = (torch.load(folder / f"{r}_v400.pt", weights_only=True)["model"] for r in RUNS)
    assert not torch.equal(student["blocks.0.mlp.fc1.weight"], random["blocks.0.mlp.fc1.weight"])
    history = pd.read_csv(evaluated.path("finetune_video_history"))
    assert list(dict.fromkeys(history["run"])) == [f"{r}_{t}" for r in RUNS for t in TARGETS]


def test_the_video_table_scores_every_run_and_version_in_1x1_and_4x3_views(evaluated) -> None:
    report = json.loads(evaluated.path("video_metrics").read_text())
    views = ("1x1", "2x3")  # the tiny config tests 2 temporal clips x 3 crops
    assert set(report["views"]) == set(views)
    assert list(report["runs"]) == [*RUNS, "raw_pixels"]  # the sceptic's row last
    for run in report["runs"]:
        assert list(report["runs"][run]) == list(TARGETS)
        for target in TARGETS:
            entry = report["runs"][run][target]
            assert entry["clips"] == 6 and entry["bad_clips"] == []
            for view in views:
                assert 0.0 <= entry[view]["top1"] <= entry[view]["top5"] <= 1.0
            assert entry["mirror"]["mirrored_clips"] + entry["mirror"]["unmirrored_clips"] == entry["clips"]
            # right on the class means right on both parts: each part's top-1 is at least the class top-1
            assert set(entry["factors"]) == {"group", "motion"}
            assert min(entry["factors"].values()) >= entry[views[1]]["top1"] - 1e-6
    table = evaluated.path("video_table").read_text()
    assert table.count("\n| student |") == 3 and table.count("\n| raw_pixels |") == 3 and "mirror rate" in table
    assert "| group top-1 | motion top-1 |" in table
    for target in TARGETS:
        assert_drawn(evaluated.path("video_per_class_plots") / f"per_class_{target}.png")
