"""The video pre-flight checks: Kinetics folders that do not exist are listed with what to put there (those the
demo's generator writes are not), and a video stage's image size, device and ranks are checked."""

from __future__ import annotations

from pathlib import Path

import torch

from eva_pipeline.config import VideoFinetuneParams, VideoIngestionParams
from eva_pipeline.preflight import check_video_finetune, check_video_sources
from eva_test_support import make_params

RAW = Path(__file__).resolve().parents[2] / "data" / "01_raw" / "fashion_mnist"


def _ingestion(tmp_path: Path, synthetic: bool) -> VideoIngestionParams:
    generated = tmp_path / "generated"
    block = {
        "versions": [
            {"name": "v1", "annotations": str(generated / "v1" / "annotations"), "clips": str(generated / "v1")},
            {"name": "k400", "annotations": str(tmp_path / "k400" / "csv"), "clips": str(tmp_path / "k400")},
        ]
    }
    if synthetic:
        block["synthetic"] = {
            "out_dir": str(generated),
            "train_images": str(RAW / "train-images-idx3-ubyte.gz"),
            "train_labels": str(RAW / "train-labels-idx1-ubyte.gz"),
            "test_images": str(RAW / "t10k-images-idx3-ubyte.gz"),
            "test_labels": str(tmp_path / "missing-labels.gz"),
        }
    return VideoIngestionParams.model_validate(block)


def test_missing_kinetics_folders_are_listed_and_generated_ones_are_not(tmp_path):
    problems = check_video_sources(_ingestion(tmp_path, synthetic=True))
    text = "\n".join(problems)
    assert "versions[0]" not in text  # under the generator's out_dir: written by the run itself
    assert "video_ingestion.versions[1] (k400): annotations folder" in text and "train.csv" in text
    assert "video_ingestion.versions[1] (k400): clips folder" in text
    assert "video_ingestion.synthetic.test_labels" in text and len(problems) == 3
    (tmp_path / "k400" / "csv").mkdir(parents=True)
    without_generator = check_video_sources(_ingestion(tmp_path, synthetic=False))
    assert [p for p in without_generator if "versions[0]" in p]  # nothing generates them now


def test_a_video_stage_is_checked_against_the_student_and_this_machine():
    stage = {
        "data": {"dataset": "k722"},
        "num_frames": 4,
        "img_size": 30,
        "optimizer": {"lr": 1e-3, "min_lr": 0.0, "weight_decay": 0.05, "layer_decay": 1.0, "warmup_epochs": 0},
        "epochs": 1,
        "batch_size": 8,
        "device": "cuda",
        "world_size": 2,
    }
    problems = check_video_finetune("finetune_video", VideoFinetuneParams.model_validate(stage), make_params())
    text = "\n".join(problems)
    assert "finetune_video.img_size" in text and "divisible" in text  # patch 4 does not divide 30
    if torch.cuda.device_count() < 2:
        assert "finetune_video.world_size is 2 (one process per GPU)" in text
    assert ("finetune_video.device is 'cuda'" in text) != torch.cuda.is_available()
