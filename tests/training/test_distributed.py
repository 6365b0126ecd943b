"""Data parallelism: 2 CPU ranks (gloo, torch elastic launch) with the same global batch reach the same weights and
the same held-out loss as 1 rank, ZeRO-1 really partitions the optimizer state (one shard per rank), and the launcher
commands are right."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from eva_pipeline.config import PretrainParams
from eva_pipeline.ingest.build import build_manifest
from eva_pipeline.ingest.scan import SourceSpec
from eva_pipeline.loader.rows import ParquetRows
from eva_pipeline.models import EvaMIM, get_config, load_official_checkpoint
from eva_pipeline.runtime.launch import WORKER_MODULE, launch, launch_command
from eva_pipeline.targets.store import TargetStore
from eva_pipeline.training.loop import run_pretraining
from eva_pipeline.training.step import cached_targets
from eva_pipeline.training.validation import open_validation_set
from eva_pipeline.training.worker import HISTORY_FILE, WEIGHTS_FILE, RunSpec
from eva_test_support import make_params

FMNIST = Path(__file__).resolve().parents[2] / "data" / "01_raw" / "fashion_mnist"
N, D, STEPS = 32, 16, 3
HELD_OUT = 11  # validation images: an odd count, so the two ranks' shares differ in size


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A 32-image manifest of real images (plus held-out ones), a cached target store and a validation store, as
    the pipeline would leave them."""
    root = tmp_path_factory.mktemp("dist")
    specs = [
        SourceSpec(name="fm", kind="idx", split="pretrain", images=FMNIST / "train-images-idx3-ubyte.gz", limit=N),
        SourceSpec(name="held", kind="idx", split="probe", images=FMNIST / "t10k-images-idx3-ubyte.gz", limit=HELD_OUT),
    ]
    manifest, _ = build_manifest(specs)
    manifest.to_parquet(root / "manifest.parquet")
    gen = torch.Generator().manual_seed(5)
    targets = torch.randn(N, 49, D, generator=gen)
    store = TargetStore(root / "targets").compute(
        {"test": 1}, N, lambda a, b: targets[a:b], lambda t: t, shard_size=16, progress=False
    )
    held = torch.randn(HELD_OUT, 49, D, generator=gen)
    TargetStore(root / "val").compute(
        {"val": 1}, HELD_OUT, lambda a, b: held[a:b], lambda t: t, shard_size=4, progress=False
    )
    return root, manifest, store


def _params(world_size: int, launcher: str = "torchrun", port: int = 29631) -> PretrainParams:
    return make_params(
        world_size=world_size,
        batch_size=16,
        max_steps=STEPS,
        checkpoint={"every_steps": STEPS, "keep_last": 1},
        distributed={"launcher": launcher, "master_port": port},
        validation={"every_steps": 2, "batch_size": 4},  # after steps 2 and 3
    )


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "port"), [("torchrun", 29631), ("deepspeed", 29633)])
def test_two_ranks_match_one_rank_and_partition_the_optimizer(workspace, tmp_path, launcher, port):
    root, manifest, store = workspace
    from eva_pipeline.loader.pixels import load_images

    params_one = _params(1)
    validation = open_validation_set(
        ParquetRows(root / "manifest.parquet", "probe"),
        str(root / "val"),
        28,
        params_one.validation.every_steps,
        params_one.validation.batch_size,
    )
    images = load_images(manifest[manifest["split"] == "pretrain"])
    single = run_pretraining(
        params_one,
        images,
        cached_targets(TargetStore(store).load()),
        D,
        checkpoint_dir=tmp_path / "one",
        progress=False,
        validation=validation,
    )

    params = _params(2, launcher, port)
    spec = RunSpec(
        params=params.model_dump(mode="json"),
        images=str(root / "manifest.parquet"),
        target_dim=D,
        output_dir=str(tmp_path / "out"),
        checkpoint_dir=str(tmp_path / "two"),
        targets_store=str(store),
        validation={"store": str(root / "val"), "split": "probe", "manifest": str(root / "manifest.parquet")},
    )
    launch(params, spec.write(tmp_path / "run.json"), tmp_path / "ranks.log")

    model = EvaMIM(get_config(params.model.name, **params.model.overrides, target_dim=D))
    load_official_checkpoint(model, tmp_path / "out" / WEIGHTS_FILE)
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=2e-6, msg=key)
    history = pd.read_json(tmp_path / "out" / HISTORY_FILE, typ="series")["history"]
    assert [h["step"] for h in history] == [1.0, 2.0, 3.0]
    # the held-out loss: each rank evaluates its share (6 and 5 images), the sums are reduced over both ranks
    two_ranks = [h.get("val_loss") for h in history]
    one_rank = [h.get("val_loss") for h in single.run_history]
    assert two_ranks[0] is None and one_rank[0] is None and None not in two_ranks[1:]
    assert two_ranks[1:] == pytest.approx(one_rank[1:], rel=1e-5)

    (folder,) = [p for p in (tmp_path / "two").iterdir() if p.is_dir()]
    shards = sorted((folder / f"step_{STEPS}").glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    assert [s.name.split("_")[3] for s in shards] == ["0", "1"]  # one optimizer shard per rank
    sizes = []
    for shard in shards:
        state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        flat = state["single_partition_of_fp32_groups"]
        sizes.append(sum(t.numel() for t in flat))
    total = sum(p.numel() for p in model.parameters())
    assert sum(sizes) >= total and max(sizes) <= total // 2 + 64  # each rank holds about half


def _base(world_size: int, **distributed) -> PretrainParams:
    return make_params(world_size=world_size, batch_size=8 * world_size, distributed=distributed)


def test_launch_commands():
    spec = Path("run.json")
    torchrun = launch_command(_base(2, launcher="torchrun", master_port=1234), spec)
    assert torchrun == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "1234",
        "-m", WORKER_MODULE, "run.json",
    ]  # fmt: skip
    single_node = launch_command(_base(8), spec)
    assert Path(single_node[0]).name == "deepspeed"
    assert single_node[1:] == [
        "--num_gpus",
        "8",
        "--master_port",
        "29500",
        "--no_local_rank",
        "--module",
        WORKER_MODULE,
        "run.json",
    ]
    multi_node = launch_command(_base(16, hostfile="/etc/hosts.ds", master_addr="10.0.0.1"), spec)
    assert multi_node[1:5] == ["--hostfile", "/etc/hosts.ds", "--master_addr", "10.0.0.1"]
    assert "--num_gpus" not in multi_node


@pytest.mark.slow
def test_failed_ranks_raise_with_the_log(tmp_path):
    params = _base(2, launcher="torchrun", master_port=29632)
    with pytest.raises(Exception, match=r"ranks of eva_pipeline.training.worker failed"):
        launch(params, tmp_path / "missing.json", tmp_path / "ranks.log")
    assert (tmp_path / "ranks.log").read_text()


@pytest.mark.slow
def test_training_node_launches_ranks_into_one_mlflow_run(workspace, tmp_path):
    """The Kedro node with world_size 2: workers are launched, rank 0 alone logs into the session's run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from eva_pipeline.config import TeacherTargetsParams
    from eva_pipeline.datasets import TeacherTargets
    from eva_pipeline.pipelines.train_student.nodes import pretrain_student

    _root, manifest, store = workspace
    targets = TeacherTargets.from_receipt(
        store,
        {
            "mode": "cached",
            "fingerprint": {"test": 1},  # what the workspace's store was computed for
            "num_items": N,
            "target_dim": D,
            "grid": [7, 7],
            "img_size": 28,
            "manifest_digest": "x",
            "views_per_image": 0,
            "teacher": {"kind": "efficientnet_lite0"},
        },
    )
    teacher = TeacherTargetsParams(teacher={"kind": "efficientnet_lite0"})
    params = _params(2).model_copy(update={"log_every_steps": 1})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = MlflowClient(uri).create_experiment("node-test")  # not another test's active experiment
        with mlflow.start_run(experiment_id=experiment_id) as run:
            model, history, summary, _figure = pretrain_student(manifest, targets, tmp_path / "node", params, teacher)
        client = MlflowClient(uri)
        runs = client.search_runs([run.info.experiment_id])
        assert len(runs) == 1  # the workers opened no runs of their own
        losses = client.get_metric_history(run.info.run_id, "pretrain/loss")
        assert [m.step for m in losses] == [1, 2, 3]  # logged once per step: by rank 0 only
        assert list(history["step"]) == [1, 2, 3] and summary["steps"] == 3.0
        assert model.lm_head.out_features == D
    finally:
        mlflow.set_tracking_uri(None)
