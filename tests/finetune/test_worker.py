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
