"""The video dry run on the merged eva01 parameters: the space-time EVA-g/14 of each stage at full size on the meta
device (EVA-01 video: 8 then 16 frames at 224 px, tubelet 1), its schedule and mixing, and what this machine lacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from eva_pipeline.config import (
    PretrainParams,
    TargetVideoFinetuneParams,
    VideoEvalParams,
    VideoFinetuneParams,
    VideoIngestionParams,
)
from eva_pipeline.dry_run import EVA01_VIDEO_DATA, StageData, dry_run_video
from eva_pipeline.settings import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS

ROOT = Path(__file__).resolve().parents[2]
EVA_G_ENCODER = 1_011_143_296  # the image encoder (tests/models): pos_embed and head come on top


@pytest.fixture(scope="module")
def eva01_video():
    raw = CONFIG_LOADER_CLASS(conf_source=str(ROOT / "conf"), env="eva01", **CONFIG_LOADER_ARGS)["parameters"]
    stages = {
        "finetune_video_intermediate": VideoFinetuneParams.model_validate(raw["finetune_video_intermediate"]),
        "finetune_video": TargetVideoFinetuneParams.model_validate(raw["finetune_video"]),
    }
    data = {name: StageData(*counts, "EVA-01") for name, counts in EVA01_VIDEO_DATA.items()}
    report = dry_run_video(
        PretrainParams.model_validate(raw["pretrain"]),
        stages,
        data,
        VideoEvalParams.model_validate(raw["video_eval"]),
        VideoIngestionParams.model_validate(raw["video_ingestion"]),
    )
    return report


def test_the_k722_stage_is_eva_g_over_8_frames_of_224_px(eva01_video):
    facts = eva01_video.facts["finetune_video_intermediate/k722"]
    assert facts["tokens"] == 8 * 16 * 16  # tubelet 1: 2,048 tokens + cls
    assert facts["patch_embed_shape"] == (1408, 3, 1, 14, 14)
    # encoder + the longer pos_embed (1 + 2048 rows instead of 1 + 256) + fc_norm + the 722-class head
    extra_pos = (2048 - 256) * 1408
    assert facts["classifier_parameters"] == EVA_G_ENCODER + extra_pos + 2 * 1408 + 722 * 1408 + 722
    assert facts["steps_per_epoch"] == 630_000 // 256 and facts["total_steps"] == 40 * (630_000 // 256)
    assert facts["mixing"] == "EvenBatchMixup" and facts["loss"] == "SoftTargetCrossEntropy"
    assert facts["layer_scales"] == (1.0, 1.0)  # no layer decay in the K722 stage


def test_the_merged_eva01_stages_keep_evas_recipe_not_the_demos():
    """Parameters merge softly over conf/base: a demo deviation (strided sampling, a x1 head init, no smoothing) must
    not leak into the paper's environment."""
    raw = CONFIG_LOADER_CLASS(conf_source=str(ROOT / "conf"), env="eva01", **CONFIG_LOADER_ARGS)["parameters"]
    stages = (
        ("finetune_video_intermediate", VideoFinetuneParams, 0.3),
        ("finetune_video", TargetVideoFinetuneParams, 0.2),
    )
    for name, kind, drop_path in stages:
        params = kind.model_validate(raw[name])
        assert params.augmentation.sampling == "tsn", name
        assert tuple(params.augmentation.scales) == (1.0, 0.875, 0.75, 0.66), name
        assert params.head_init_scale == 0.001 and params.mixing.label_smoothing == 0.1, name
        assert params.drop_path_rate == drop_path and params.frame_cache_mb == 0, name


def test_the_target_stages_are_16_frames_with_layer_decay_and_epochs_per_version(eva01_video):
    for version, classes in (("k400", 400), ("k600", 600), ("k700", 700)):
        facts = eva01_video.facts[f"finetune_video/{version}"]
        assert facts["tokens"] == 16 * 256 and facts["num_classes"] == classes
        assert facts["layer_scales"][0] == pytest.approx(0.95**41) and facts["layer_scales"][1] == 1.0
    assert eva01_video.facts["finetune_video/k400"]["total_steps"] == 240_436 // 256  # 1 epoch
    assert eva01_video.facts["finetune_video/k700"]["total_steps"] == 2 * (545_317 // 256)  # 2 epochs


def test_the_report_lists_what_this_machine_lacks(eva01_video):
    missing = "\n".join(eva01_video.missing)
    assert "video_ingestion.versions[0] (k400): annotations folder data/01_raw/kinetics400/annotations" in missing
    assert "finetune_video_intermediate.world_size is 32 (one process per GPU)" in missing
    rendered = eva01_video.render()
    assert "4 temporal clips x 3 spatial crops" in rendered and "2,048 tokens" in rendered
