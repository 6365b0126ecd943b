"""The dry run builds every object of a configured run without data, weights or GPU (eva01: the paper's recipe).

Library level on the merged eva01 parameters (exact numbers of the EVA-01 recipe), and the ``kedro dry-run`` command
in the real project folder: it must exit 0, print the plan and write nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eva_pipeline.config import IngestionParams, PretrainParams, TeacherTargetsParams
from eva_pipeline.dry_run import dry_run
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
    assert pl.file_listing(ROOT / "data") == data_before


def test_dry_run_command_without_a_manifest_asks_for_the_image_count(tmp_path, pl):
    from click.testing import CliRunner

    from eva_pipeline.cli import cli

    with pl.project_context(tmp_path / "project"):
        result = CliRunner().invoke(cli, ["dry-run", "--env", "test"])
    assert result.exit_code != 0
    assert "pass --num-images N" in result.output
