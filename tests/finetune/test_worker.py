"""Multi-rank fine-tuning: two CPU ranks started by the launcher on the node's run file end where one in-process rank
does (the same global batches, gradients averaged over ranks), and rank 0's results come back to the node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from eva_pipeline.config import FinetuneParams, PretrainParams
from eva_pipeline.pipelines.finetune_common import train_run

pytestmark = pytest.mark.slow  # two launched ranks

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "data" / "01_raw" / "fashion_mnist" / "train-images-idx3-ubyte.gz"
CLASSES = [f"c{i}" for i in range(10)]


def _rows(count: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"fm/{i}" for i in range(count)],
            "source": "fm",
            "location": [f"{IMAGES}#{i}" for i in range(count)],
            "label": pd.array(np.arange(count) % 10, dtype="Int64"),
            "width": np.full(count, 28, dtype="int32"),
            "height": np.full(count, 28, dtype="int32"),
            "size_bytes": 784,
            "split": "finetune",
        }
    )


def _params(world_size: int) -> FinetuneParams:
    return FinetuneParams.model_validate(
        {
            "img_size": 28,
            "epochs": 1,
            "batch_size": 8,
            "data": {"sources": ["fm"]},
            "optimizer": {"lr": 1e-3, "min_lr": 0.0, "warmup_epochs": 0, "weight_decay": 0.05, "layer_decay": 0.75},
            "ema": {"enabled": True, "decay": 0.5},
            "drop_path_rate": 0.0,  # drop path draws per rank: the one thing two ranks cannot share
            "device": "cpu",
            "world_size": world_size,
            "distributed": {"launcher": "torchrun", "master_port": 29671},
            "checkpoint": {"every_steps": 2},
        }
    )


def test_two_launched_ranks_end_where_one_rank_does(tmp_path) -> None:
    conf = yaml.safe_load((ROOT / "conf" / "base" / "parameters_pretrain.yml").read_text())
    student = PretrainParams.model_validate(conf["pretrain"])
    rows = _rows(32)
    train = (rows, rows["label"].to_numpy(dtype=np.int64))
    one, one_history, _ = train_run("r", _params(1), student, CLASSES, train, None, lambda m: None, "x", tmp_path / "a")
    two, two_history, summary = train_run(
        "r", _params(2), student, CLASSES, train, None, lambda m: None, "x", tmp_path / "b"
    )
    assert summary["steps"] == len(two_history) == len(one_history) == 4
    for key, value in one.model.items():
        torch.testing.assert_close(two.model[key], value, rtol=1e-4, atol=1e-5, msg=key)
    for key, value in one.model_ema.items():
        torch.testing.assert_close(two.model_ema[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert two.classes == CLASSES and two.config == one.config
    assert all(np.isfinite(r["loss"]) for r in two_history)
    launch = tmp_path / "b" / "launch" / "r"
    assert (launch / "ranks.log").exists() and (launch / "run.json").exists()
    assert len([p for p in (tmp_path / "b").iterdir() if p.name != "launch"]) == 1  # one checkpoint folder


def _clips(folder: Path, count: int) -> pd.DataFrame:
    """``count`` real H.264 clips of 8 frames (16x16, a bright square moving right or down) and their rows."""
    from eva_pipeline.ingest.video import encode_video

    rows = []
    for i in range(count):
        frames = np.zeros((8, 16, 16, 3), dtype=np.uint8)
        for t in range(8):
            y, x = (4, t + 2) if i % 2 else (t + 2, 4)
            frames[t, y : y + 5, x : x + 5] = 80 + 20 * (i % 7)
        path = encode_video(folder / f"clip{i}.mp4", frames, fps=8)
        rows.append({"clip_id": f"clip{i}", "path": str(path), "num_frames": 8, "label": i % 2})
    return pd.DataFrame(rows)


def test_two_launched_ranks_train_a_video_stage_as_one_rank_does(tmp_path) -> None:
    """The video stages go through the same launch: the run file carries the space-time classifier and the clip rows,
    each rank decodes its share of every global batch of real clips, and rank 0's classifier equals one rank's."""
    from eva_pipeline.config import VideoFinetuneParams
    from eva_pipeline.finetune.video import start_from_image
    from eva_pipeline.models import create_model
    from eva_pipeline.pipelines.video_common import train_video_run

    conf = yaml.safe_load((ROOT / "conf" / "base" / "parameters_pretrain.yml").read_text())
    student = PretrainParams.model_validate(conf["pretrain"])
    rows = _clips(tmp_path / "clips", 16)
    train = (rows, rows["label"].to_numpy(dtype=np.int64))
    torch.manual_seed(0)
    image_weights = create_model(student.model.name, **student.model.overrides).state_dict()

    def params(world_size: int) -> VideoFinetuneParams:
        return VideoFinetuneParams.model_validate(
            {
                "data": {"dataset": "k722"},
                "num_frames": 4,
                "tubelet": 2,
                "img_size": 16,
                "epochs": 1,
                "batch_size": 8,
                "optimizer": {"lr": 1e-3, "min_lr": 0.0, "warmup_epochs": 0, "weight_decay": 0.05, "layer_decay": 0.9},
                "augmentation": {"hflip": False},
                "validation": {"split": None},
                "drop_path_rate": 0.0,
                "device": "cpu",
                "world_size": world_size,
                "distributed": {"launcher": "torchrun", "master_port": 29673},
                "checkpoint": {"every_steps": 2},
            }
        )

    def start(model) -> None:
        start_from_image(model, image_weights)

    classes = ["down", "right"]
    one, one_history, _ = train_video_run("v", params(1), student, classes, train, None, start, "s", tmp_path / "a")
    two, two_history, _ = train_video_run("v", params(2), student, classes, train, None, start, "s", tmp_path / "b")
    assert len(two_history) == len(one_history) == 2 and two.video == one.video == {"num_frames": 4, "tubelet": 2}
    for key, value in one.model.items():
        torch.testing.assert_close(two.model[key], value, rtol=1e-4, atol=1e-5, msg=key)
    from eva_pipeline.finetune.video import make_video_classifier

    initial = make_video_classifier(params(1), student.model, 2)
    start(initial)
    assert not torch.allclose(initial.patch_embed.proj.weight, two.model["patch_embed.proj.weight"])  # it trained
