"""The dry run builds every object of a configured run without data, weights or GPU (eva01: the paper's recipe).

Library level on the merged eva01 parameters (exact numbers of the EVA-01 recipe: pre-training and both image
fine-tunes), and the ``kedro dry-run`` command in the real project folder: it must exit 0, print the plan and write
nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from eva_pipeline.config import (
    ClassificationEvalParams,
    FinetuneParams,
    IngestionParams,
    PretrainParams,
    TargetFinetuneParams,
    TeacherTargetsParams,
)
from eva_pipeline.dry_run import EVA01_STAGE_DATA, StageData, dry_run, dry_run_finetune, stage_data
from eva_pipeline.finetune.ema import decay_for_run
from eva_pipeline.settings import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS

ROOT = Path(__file__).resolve().parents[2]
MERGED_30M = 29_663_232  # 7242 full batches of 4096 (EVA-01's steps per epoch on Merged-30M)


def _blocks(env: str, **pretrain_changes) -> tuple:
    raw = CONFIG_LOADER_CLASS(conf_source=str(ROOT / "conf"), env=env, **CONFIG_LOADER_ARGS)["parameters"]
    return (
        IngestionParams.model_validate(raw["ingestion"]),
        TeacherTargetsParams.model_validate(raw["teacher_targets"]),
        PretrainParams.model_validate({**raw["pretrain"], **pretrain_changes}),
    )


@pytest.fixture(scope="module")
def eva01_report():
    return dry_run(*_blocks("eva01"), num_images=MERGED_30M)


def test_eva01_dry_run_builds_the_paper_models(eva01_report):
    facts = eva01_report.facts
    assert facts["student_parameters"] == 1_012_229_632  # EVA-g/14 MIM model, as the official EVA-01 code builds it
    assert facts["teacher_parameters"] == 303_966_208  # CLIP ViT-L/14 image tower, architecture only
    assert facts["target_dim"] == 768


def test_eva01_dry_run_builds_groups_schedule_loader_and_deepspeed(eva01_report):
    facts = eva01_report.facts
    # weight decay on everything but 1-D tensors, biases, pos_embed and cls_token (mask_token decayed)
    assert facts["decayed_parameters"] + facts["not_decayed_parameters"] == 1_012_229_632
    depth, width = 40, 1408
    # per block: norm1/norm2 weight+bias, q/v bias, proj/fc2 bias (width each), fc1 bias (6144); then final norm,
    # patch_embed bias and lm_head bias
    one_d = depth * (8 * width + 6144) + 3 * width + 768
    assert facts["not_decayed_parameters"] == one_d + 257 * width + width  # + pos_embed + cls_token
    assert (facts["steps_per_epoch"], facts["total_steps"], facts["warmup_steps"]) == (7242, 1_086_300, 14_484)
    assert facts["micro_batch"] == 32 and facts["view_mode"] == "augment"
    assert 104.0 < facts["mean_masked"] <= 105  # BEiT's block-wise masking on 16x16 with 105 targeted
    assert facts["validation_masked_tokens"] == 128
    ds = facts["deepspeed"]
    assert ds["train_batch_size"] == 4096 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 500_000_000}
    assert ds["fp16"]["enabled"] and ds["fp16"]["initial_scale_power"] == 16 and ds["gradient_clipping"] == 3.0


def test_eva01_dry_run_lists_what_a_real_run_lacks_here(eva01_report):
    text = eva01_report.render()
    assert "1,012,229,632 parameters" in text and "7,242 steps per epoch" in text
    assert "data/01_raw/imagenet21k/train does not exist" in text
    assert "'ViT-L-14' / 'openai' are not on this machine" in text
    if not torch.cuda.is_available():
        assert "pretrain.device is 'cuda' but no CUDA GPU is visible" in text


def test_dry_run_fails_on_an_object_that_cannot_be_built():
    """A student grid the teacher cannot match (336 px -> 24x24 vs CLIP-L's 16x16) is found by building."""
    ingestion, targets, pretrain = _blocks("eva01")
    overrides = {**pretrain.model.overrides, "img_size": 336}
    bad = pretrain.model_copy(update={"model": pretrain.model.model_copy(update={"overrides": overrides})})
    with pytest.raises(ValueError, match="teacher grid"):
        dry_run(ingestion, targets, bad, num_images=MERGED_30M)


def test_demo_dry_run_builds_the_embedded_default():
    report = dry_run(*_blocks("base"), num_images=10_000)
    assert report.facts["steps_per_epoch"] == 10_000 // 128 and report.facts["target_dim"] == 112


@pytest.mark.slow
def test_eva01_dry_run_command_prints_the_plan_and_writes_nothing(pl):
    kedro = ROOT / ".venv" / "bin" / "kedro"
    command = [str(kedro)] if kedro.exists() else [sys.executable, "-m", "kedro"]
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "1000"}
    data_before = pl.file_listing(ROOT / "data")
    result = subprocess.run(
        [*command, "dry-run", "--env", "eva01", "--num-images", str(MERGED_30M)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Dry run of `kedro run --pipelines pretrain` (environment: eva01)" in output
    assert "Student eva_giant_patch14_224" in output and "1,012,229,632 parameters" in output
    assert "1,086,300 steps" in output and "A real run would stop at the pre-flight check" in output
    assert "Dry run of `kedro run --pipelines finetune_intermediate,finetune` (environment: eva01)" in output
    assert "1,041,920,081 parameters" in output and "1,013,005,672 parameters" in output
    assert "pos_embed 16x16 -> 24x24 resampled bicubically" in output
    assert pl.file_listing(ROOT / "data") == data_before


def test_dry_run_command_without_a_manifest_asks_for_the_image_count(tmp_path, pl):
    from click.testing import CliRunner

    from eva_pipeline.cli import cli

    with pl.project_context(tmp_path / "project"):
        result = CliRunner().invoke(cli, ["dry-run", "--env", "test"])
    assert result.exit_code != 0
    assert "pass --num-images N" in result.output


# ------------------------------------------------------------------------------------------------ fine-tuning
def _finetune_blocks(env: str, runtime_params: dict | None = None) -> tuple:
    loader = CONFIG_LOADER_CLASS(
        conf_source=str(ROOT / "conf"), env=env, runtime_params=runtime_params or {}, **CONFIG_LOADER_ARGS
    )
    raw = loader["parameters"]
    stages = {
        "finetune_intermediate": FinetuneParams.model_validate(raw["finetune_intermediate"]),
        "finetune": TargetFinetuneParams.model_validate(raw["finetune"]),
    }
    table = raw.get("classification_eval")
    return (
        IngestionParams.model_validate(raw["ingestion"]),
        PretrainParams.model_validate(raw["pretrain"]),
        stages,
        None if table is None else ClassificationEvalParams.model_validate(table),
    )


EVA01_DATA = {name: StageData(*counts, "EVA-01") for name, counts in EVA01_STAGE_DATA.items()}


@pytest.fixture(scope="module")
def eva01_finetune():
    ingestion, pretrain, stages, table = _finetune_blocks("eva01")
    return dry_run_finetune(ingestion, pretrain, stages, EVA01_DATA, table)


def test_eva01_finetune_builds_the_paper_classifiers(eva01_finetune):
    intermediate, target = eva01_finetune.facts["finetune_intermediate"], eva01_finetune.facts["finetune"]
    # EVA-g/14 classifiers as the official EVA-01 code builds them: the IN-21K head at 224, the IN-1K head at 336
    assert intermediate["classifier_parameters"] == 1_041_920_081 and intermediate["num_classes"] == 21_841
    assert target["classifier_parameters"] == 1_013_005_672 and target["num_classes"] == 1_000
    patch_embed = 1408 * 3 * 14 * 14 + 1408  # frozen in every EVA fine-tune
    assert target["trained_parameters"] == 1_013_005_672 - patch_embed
    assert (intermediate["grid"], intermediate["start_grids"]) == (16, {"student": 16})
    assert (target["grid"], target["start_grids"]) == (24, {"intermediate": 16})  # pos_embed 16x16 -> 24x24


def test_eva01_finetune_builds_groups_schedules_losses_ema_and_deepspeed(eva01_finetune):
    intermediate, target = eva01_finetune.facts["finetune_intermediate"], eva01_finetune.facts["finetune"]
    # layer ids 0..41 (embeddings, 40 blocks, head): scales lrd^41 .. 1, each layer decayed and not
    assert intermediate["num_layer_scales"] == target["num_layer_scales"] == 42
    assert intermediate["param_groups"] == target["param_groups"] == 83  # layer 0 (cls, pos_embed) is all no-decay
    assert intermediate["layer_scales"] == pytest.approx((0.85**41, 1.0))
    assert target["layer_scales"] == pytest.approx((0.95**41, 1.0))
    # 14,197,122 // 4096 and 1,281,167 // 512 full batches per epoch; 15 and 2 warmup epochs
    assert (intermediate["steps_per_epoch"], intermediate["total_steps"], intermediate["warmup_steps"]) == (
        3466,
        207_960,
        51_990,
    )
    assert (target["steps_per_epoch"], target["total_steps"], target["warmup_steps"]) == (2502, 25_020, 5004)
    assert (intermediate["mixing"], intermediate["loss"]) == ("EvenBatchMixup", "SoftTargetCrossEntropy")
    assert (target["mixing"], target["loss"]) == (None, "LabelSmoothingCrossEntropy")
    assert intermediate["ema_decay"] is None and target["ema_decay"] == 0.9999
    assert intermediate["deepspeed"]["train_micro_batch_size_per_gpu"] == 64  # 4096 over 64 GPUs, as the README
    assert target["deepspeed"]["train_micro_batch_size_per_gpu"] == 16  # 512 over 32 GPUs
    assert target["deepspeed"]["fp16"]["enabled"] and "gradient_clipping" not in target["deepspeed"]


def test_eva01_finetune_report_says_what_a_real_run_lacks(eva01_finetune):
    text = eva01_finetune.render()
    assert "21,841 classes" in text and "pos_embed 16x16 -> 24x24 resampled bicubically" in text
    assert "LR: 1e-06 -> 0.0001 over 51,990 warmup steps, cosine to 1e-06" in text
    assert "finetune_intermediate.world_size is 64 (one process per GPU) but this machine has 0 GPU(s)" in text
    assert "finetune.world_size is 32" in text
    assert eva01_finetune.facts["classification_sets"][0] == "imagenet"
    assert "objectnet (real): objectnet; class map data/01_raw/objectnet/class_map.json" in text


def test_eva01_560_px_variant_by_params_override():
    ingestion, pretrain, stages, table = _finetune_blocks("eva01", {"finetune": {"img_size": 560, "epochs": 15}})
    report = dry_run_finetune(ingestion, pretrain, {"finetune": stages["finetune"]}, EVA01_DATA, table)
    target = report.facts["finetune"]
    assert target["classifier_parameters"] == 1_014_447_464  # the spec's fine-tune model at 560
    assert (target["grid"], target["total_steps"]) == (40, 2502 * 15)
    assert target["start_grids"] == {"intermediate": None}  # that stage is not in this dry run
    assert "run intermediate" not in report.render() and "(that stage is not configured here)" in report.render()


def test_demo_finetune_dry_run_builds_the_tiny_stages():
    ingestion, pretrain, stages, _ = _finetune_blocks("base")
    data = {"finetune_intermediate": StageData(6000, 20, "test"), "finetune": StageData(1000, 10, "test")}
    report = dry_run_finetune(ingestion, pretrain, stages, data)
    intermediate, target = report.facts["finetune_intermediate"], report.facts["finetune"]
    assert (intermediate["grid"], intermediate["num_classes"], intermediate["steps_per_epoch"]) == (7, 20, 93)
    grid = stages["finetune"].img_size // 4
    assert grid != 7 and target["grid"] == grid  # the target stage changes resolution
    assert target["start_grids"] == {"intermediate": 7, "student": 7, "random": None}
    assert target["num_layer_scales"] == 6  # embeddings, 4 blocks, head
    total = (1000 // stages["finetune"].batch_size) * stages["finetune"].epochs
    assert target["ema_decay"] == pytest.approx(decay_for_run(total, 0.1, 0.9999))  # run_fraction 0.1
    text = report.render()
    assert "run random: random init (no start weights)" in text
    assert (
        f"run student: the pre-trained student (eva_student; fresh fc_norm and head): pos_embed 7x7 -> {grid}x{grid}"
        in text
    )


def test_a_stage_batch_larger_than_its_images_cannot_be_built():
    ingestion, pretrain, stages, _ = _finetune_blocks("base")
    data = {"finetune_intermediate": StageData(10, 20, "test"), "finetune": StageData(1000, 10, "test")}
    with pytest.raises(ValueError, match="batch_size 64 exceeds the 10 fine-tuning images"):
        dry_run_finetune(ingestion, pretrain, stages, data)


def test_stage_counts_from_the_manifest_apply_class_names_and_the_label_budget():
    rows = pd.DataFrame(
        {
            "source": ["a"] * 5 + ["b"] * 4 + ["c"] * 3,
            "label": pd.array([0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 1, 2], dtype="Int64"),
        }
    )
    class_names = {"a": ["cat", "dog"], "b": ["dog", "owl"], "c": ["x", "y", "z"]}
    _, _, stages, _ = _finetune_blocks("base")
    stage = FinetuneParams.model_validate(
        stages["finetune_intermediate"].model_dump() | {"data": {"sources": ["a", "b"]}}
    )
    assert stage_data(rows, class_names, stage) == StageData(9, 3, "manifest")  # cat, dog (shared by name), owl
    budget = FinetuneParams.model_validate(stage.model_dump() | {"data": {"sources": ["a", "b"], "per_class": 2}})
    assert stage_data(rows, class_names, budget) == StageData(6, 3, "manifest")  # 2 cats, 2 dogs, 2 owls


def _invoke(*args: str):
    from click.testing import CliRunner

    from eva_pipeline.cli import cli

    return CliRunner().invoke(cli, ["dry-run", "--env", "test", "--num-images", "1000", *args])


def test_dry_run_command_builds_the_fine_tune_stages_for_given_counts(tmp_path, pl):
    options = ["--finetune-images", "finetune_intermediate=6000", "--finetune-classes", "finetune_intermediate=20"]
    with pl.project_context(tmp_path / "project"):
        result = _invoke(*options, "--finetune-images", "finetune=1000", "--finetune-classes", "finetune=10")
    assert result.exit_code == 0, result.output
    assert "Dry run of `kedro run --pipelines finetune_intermediate,finetune` (environment: test)" in result.output
    assert "6,000 images of 20 classes (--finetune-images, --finetune-classes) from" in result.output
    grid = pl.tiny_params(tmp_path)["finetune"]["img_size"] // 4
    assert f"pos_embed 7x7 -> {grid}x{grid} resampled bicubically" in result.output


def test_dry_run_command_counts_the_stages_in_the_manifest(tmp_path, pl):
    with pl.project_context(tmp_path / "project") as root:
        (root / "data" / "02_intermediate").mkdir(parents=True)
        manifest = root / "data" / "03_primary" / "manifest.parquet"  # where conf/base/catalog.yml has it
        manifest.parent.mkdir(parents=True)
        labels = [i % 10 for i in range(1200)]
        pd.DataFrame({"source": ["fashion_mnist_train"] * 1200, "label": pd.array(labels, dtype="Int64")}).to_parquet(
            manifest
        )
        names = root / "data" / "02_intermediate" / "class_names.json"
        names.write_text('{"fashion_mnist_train": ["c0","c1","c2","c3","c4","c5","c6","c7","c8","c9"]}')
        catalog = {"class_names": {"type": "json.JSONDataset", "filepath": "data/02_intermediate/class_names.json"}}
        (root / "conf" / "test" / "catalog.yml").write_text(yaml.safe_dump(catalog))
        params = "finetune_intermediate.data.sources=[fashion_mnist_train]"
        result = _invoke("--params", params, "--finetune-classes", "finetune=10")
    assert result.exit_code == 0, result.output
    budget = pl.tiny_params(tmp_path)["finetune_intermediate"]["data"]["per_class"]  # the test env's
    images = f"{min(1200, 10 * budget):,} images of 10 classes (manifest) from fashion_mnist_train"
    assert f"{images}; label budget {budget}" in result.output
    target = min(1200, 10 * pl.tiny_params(tmp_path)["finetune"]["data"]["per_class"])
    assert f"{target:,} images of 10 classes (manifest, --finetune-classes) from fashion_mnist_train" in result.output


def test_dry_run_command_refuses_malformed_or_unknown_stage_counts(tmp_path, pl):
    with pl.project_context(tmp_path / "project"):
        malformed = _invoke("--finetune-images", "finetune:1000")
        unknown = _invoke("--finetune-images", "finetune_video=1000")
    assert malformed.exit_code != 0 and "'finetune:1000' is not STAGE=N" in malformed.output
    assert unknown.exit_code != 0
    assert "name no fine-tune stage of these parameters: ['finetune_video']" in unknown.output
