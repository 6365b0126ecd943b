"""DeepSpeed engine setup (EVA paper, Sec. 2.2: ZeRO stage 1, fp16 with dynamic loss scaling) and the MLflow step
logger.

The DeepSpeed config must carry the paper's settings (ZeRO-1, reduce bucket 5e8, clipping 3.0, fp16 dynamic loss
scale 2^16 / 500 / 2 / 1); impossible precision/device requests must fail before any work; and the engine's ZeRO
optimiser must keep our AdamW groups (weight decay and ``lr_scale``) so the schedule applies through it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from eva_pipeline.config import PretrainParams
from eva_pipeline.models import EvaMIM, get_config, get_layer_id
from eva_pipeline.runtime.device import resolve_device
from eva_pipeline.tracking import MlflowStepLogger
from eva_pipeline.training import loop, recipe
from eva_pipeline.training.engine import deepspeed_config, initialize_engine
from eva_pipeline.training.objective import mim_cosine_loss
from eva_pipeline.training.optim import AdamWConfig, apply_lr, build_adamw, param_groups
from eva_pipeline.training.precision import check_precision
from eva_pipeline.training.schedule import WarmupCosineSchedule
from eva_pipeline.training.step import cached_targets
from eva_test_support import TINY, merge_nested
from eva_test_support import make_params as make_tiny_params


def make_params(**changes) -> PretrainParams:
    """The shared tiny CPU config with a 2-block student; ``changes`` merge in."""
    return make_tiny_params(**merge_nested({"model": {"overrides": {"depth": 2}}}, changes))


# ------------------------------------------------------------------------------------------- deepspeed_config
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_deepspeed_config_carries_the_reference_settings(tmp_path, precision):
    cfg = deepspeed_config(make_params(precision=precision, batch_size=32), world_size=1, device=torch.device("cuda"))
    assert cfg["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 500_000_000}
    assert cfg["gradient_clipping"] == 3.0
    assert cfg["train_batch_size"] == 32 and cfg["train_micro_batch_size_per_gpu"] == 32
    assert cfg["gradient_accumulation_steps"] == 1
    assert "scheduler" not in cfg and "optimizer" not in cfg  # our client AdamW and per-step LR, not DeepSpeed's
    if precision == "fp16":
        assert cfg["fp16"] == {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 500,
            "hysteresis": 2,
            "min_loss_scale": 1.0,
        }
        assert "bf16" not in cfg
    elif precision == "bf16":
        assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg and "torch_autocast" not in cfg
    else:
        assert "fp16" not in cfg and "bf16" not in cfg and "torch_autocast" not in cfg


def test_bf16_on_cpu_is_an_fp32_engine_with_autocast():
    """On CPU bf16 is DeepSpeed's torch_autocast over fp32 weights (training/precision.py says why), gradients
    all-reduced in fp32 (no lower-precision modules); the device comes from the params when not given."""
    params = make_params(precision="bf16")
    cfg = deepspeed_config(params, world_size=1, device=torch.device("cpu"))
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in cfg and "fp16" not in cfg
    assert deepspeed_config(params, world_size=1) == cfg  # make_params: device cpu
    assert "torch_autocast" not in deepspeed_config(make_params(precision="fp32"), world_size=1)


def test_deepspeed_config_follows_the_params(tmp_path):
    params = make_params(
        precision="fp16",
        batch_size=64,
        world_size=4,
        optimizer={"clip_grad": 1.5},
        deepspeed={
            "reduce_bucket_size": 1234,
            "loss_scale": {"initial_scale_power": 8, "loss_scale_window": 7, "hysteresis": 3, "min_loss_scale": 0.5},
        },
    )
    cfg = deepspeed_config(params, world_size=4)
    # DeepSpeed's invariant: global batch = micro batch x accumulation x world size.
    assert cfg["train_batch_size"] == 64 and cfg["train_micro_batch_size_per_gpu"] == 16
    assert cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 4 == cfg["train_batch_size"]
    assert cfg["gradient_clipping"] == 1.5
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1234
    assert (
        cfg["fp16"]["initial_scale_power"],
        cfg["fp16"]["loss_scale_window"],
        cfg["fp16"]["hysteresis"],
        cfg["fp16"]["min_loss_scale"],
    ) == (8, 7, 3, 0.5)
    no_clip = deepspeed_config(make_params(optimizer={"clip_grad": None}), world_size=1)
    assert no_clip.get("gradient_clipping", 0) == 0  # 0 is DeepSpeed's "off"


def test_default_params_are_the_papers(tmp_path):
    params = make_params()
    assert params.deepspeed.zero_stage == 1 and params.deepspeed.reduce_bucket_size == 500_000_000
    ls = params.deepspeed.loss_scale
    assert (ls.initial_scale_power, ls.loss_scale_window, ls.hysteresis, ls.min_loss_scale) == (16, 500, 2, 1.0)
    assert params.optimizer.clip_grad == 3.0
    assert params.optimizer.betas == (0.9, 0.98) and params.optimizer.eps == 1e-6


# ------------------------------------------------------------------------------------------- precision / device
def test_fp16_on_cpu_is_refused_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"fp16.*CUDA"):
        check_precision("fp16", torch.device("cpu"))
    check_precision("fp32", torch.device("cpu"))
    check_precision("bf16", torch.device("cpu"))

    def must_not_run(*args, **kwargs):
        raise AssertionError("work started before the precision check")

    monkeypatch.setattr(recipe, "EvaMIM", must_not_run)
    monkeypatch.setattr(loop, "initialize_engine", must_not_run)
    params = make_params(precision="fp16")
    images = torch.zeros((16, 1, 28, 28), dtype=torch.uint8)
    with pytest.raises(ValueError, match="fp16"):
        loop.run_pretraining(
            params, images, cached_targets(torch.zeros(16, 49, 8)), 8, checkpoint_dir=tmp_path / "ckpt"
        )
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")

    def must_not_run(*args, **kwargs):
        raise AssertionError("work started before the device check")

    monkeypatch.setattr(recipe, "EvaMIM", must_not_run)
    monkeypatch.setattr(loop, "initialize_engine", must_not_run)
    images = torch.zeros((16, 1, 28, 28), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="cuda"):
        loop.run_pretraining(
            make_params(device="cuda"),
            images,
            cached_targets(torch.zeros(16, 49, 8)),
            8,
            checkpoint_dir=tmp_path / "ckpt",
            progress=False,
        )


# ------------------------------------------------------------------------------------------- the ZeRO optimiser
def _layer_decayed_model_and_groups(seed: int):
    torch.manual_seed(seed)
    model = EvaMIM(get_config("eva_tiny_patch4_28", **{**TINY, "depth": 2}, target_dim=8))
    depth = model.config.depth
    groups = param_groups(model, 0.05, layer_decay=0.5, layer_id=lambda n: get_layer_id(n, depth), num_layers=depth)
    return model, groups


def test_engine_optimizer_is_zero1_and_keeps_our_groups(tmp_path):
    """The engine's optimiser is DeepSpeed's ZeRO-1 wrapper around our AdamW; its groups keep weight_decay and
    lr_scale, apply_lr works through it, and one engine step equals one plain torch AdamW step with those groups
    (so the per-group LR really reaches the update)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    params = make_params()
    model, groups = _layer_decayed_model_and_groups(seed=3)
    reference, ref_groups = _layer_decayed_model_and_groups(seed=3)
    assert len({g["lr_scale"] for g in groups}) >= 3  # the test is only meaningful with distinct scales
    engine = initialize_engine(
        model, build_adamw(groups, AdamWConfig(lr=params.optimizer.lr)), params, torch.device("cpu")
    )
    assert isinstance(engine.optimizer, DeepSpeedZeroOptimizer)
    assert engine.zero_optimization_stage() == 1
    assert engine.gradient_clipping() == 3.0
    ds_groups = engine.optimizer.param_groups
    assert [(g["weight_decay"], g["lr_scale"]) for g in ds_groups] == [
        (g["weight_decay"], g["lr_scale"]) for g in groups
    ]
    apply_lr(engine.optimizer, 4e-3)
    assert [g["lr"] for g in ds_groups] == pytest.approx([4e-3 * g["lr_scale"] for g in groups], rel=1e-12)

    ref_opt = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "param_names"} for g in ref_groups],
        lr=1.0,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    for g in ref_opt.param_groups:
        g["lr"] = 4e-3 * g["lr_scale"]
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 28, 28, generator=gen)
    mask = torch.zeros(4, 49, dtype=torch.bool)
    mask[:, ::3] = True
    target = torch.randn(int(mask.sum()), 8, generator=gen)

    loss = mim_cosine_loss(engine(x, mask), target)
    engine.backward(loss)
    engine.step()

    ref_loss = mim_cosine_loss(reference(x, mask), target)
    ref_loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 3.0)
    ref_opt.step()

    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-7)
    for (name, p), q in zip(engine.module.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6, msg=name)
    # Each group moved by about its own LR (Adam's first step is ~lr * sign(grad)): the scales were applied.
    for group in ref_groups:
        step = max(
            (p.detach() - before[n]).abs().max().item()
            for n, p in zip(group["param_names"], group["params"], strict=True)
        )
        assert step == pytest.approx(4e-3 * group["lr_scale"], rel=0.05), group["param_names"][0]


def test_loop_lr_is_the_schedule_and_reaches_the_zero_groups(tmp_path, monkeypatch):
    """In a real run every step's recorded LR is the schedule's value and the ZeRO optimiser's groups carry it."""
    engines = []

    def capture(*args, **kwargs):
        engine = initialize_engine(*args, **kwargs)
        engines.append(engine)
        return engine

    monkeypatch.setattr(loop, "initialize_engine", capture)
    params = make_params(epochs=3, optimizer={"lr": 2e-3, "min_lr": 1e-4, "warmup_epochs": 1})
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (24, 1, 28, 28), dtype=torch.uint8, generator=gen)
    result = loop.run_pretraining(
        params,
        images,
        cached_targets(torch.randn(24, 49, 8, generator=gen)),
        8,
        checkpoint_dir=tmp_path / "ckpt",
        progress=False,
    )
    schedule = WarmupCosineSchedule.from_epochs(2e-3, 1e-4, epochs=3, steps_per_epoch=3, warmup_epochs=1)
    lrs = [h["lr"] for h in result.history]
    assert len(lrs) == 9
    assert lrs == pytest.approx([schedule(s) for s in range(9)], rel=1e-12, abs=0)
    # Warmup 0 -> 2e-3 over 3 steps (both ends included), then half-cosine to 1e-4 at the end.
    assert lrs[:3] == pytest.approx([0.0, 1e-3, 2e-3])
    assert lrs[-1] == pytest.approx(1e-4 + 0.5 * (2e-3 - 1e-4) * (1 + np.cos(np.pi * 5 / 6)))
    (engine,) = engines
    assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx(
        [lrs[-1] * g["lr_scale"] for g in engine.optimizer.param_groups]
    )
    assert {g["weight_decay"] for g in engine.optimizer.param_groups} == {0.0, 0.05}


# ------------------------------------------------------------------------------------------- MLflow step logger
def _mlflow_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("steps"))
    return uri, client, run.info.run_id


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")  # inside mlflow's sqlite store
def test_mlflow_step_logger_logs_a_metric_history(tmp_path):
    uri, client, run_id = _mlflow_run(tmp_path)
    logger = MlflowStepLogger(run_id, uri, prefix="pretrain/")
    for step, loss in [(10, -0.1), (20, -0.25), (30, -0.5)]:
        logger(step, {"loss": loss, "lr": step * 1e-4})
    history = client.get_metric_history(run_id, "pretrain/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(10, -0.1), (20, -0.25), (30, -0.5)]
    assert [m.step for m in client.get_metric_history(run_id, "pretrain/lr")] == [10, 20, 30]
    assert set(client.get_run(run_id).data.metrics) == {"pretrain/loss", "pretrain/lr"}

    MlflowStepLogger(run_id, uri, prefix="pretrain/", rank=1)(40, {"loss": 123.0, "other": 1.0})
    assert len(client.get_metric_history(run_id, "pretrain/loss")) == 3
    assert "pretrain/other" not in client.get_run(run_id).data.metrics
    assert client.get_run(run_id).info.status == "RUNNING"  # the logger never ends the run it logs into


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")
def test_run_pretraining_logs_every_n_steps_and_the_last(tmp_path):
    uri, client, run_id = _mlflow_run(tmp_path)
    params = make_params(log_every_steps=2, max_steps=5, epochs=3)
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=gen)
    result = loop.run_pretraining(
        params,
        images,
        cached_targets(torch.randn(16, 49, 8, generator=gen)),
        8,
        checkpoint_dir=tmp_path / "ckpt",
        metrics_fn=MlflowStepLogger(run_id, uri, prefix="pretrain/"),
        progress=False,
    )
    losses = sorted(client.get_metric_history(run_id, "pretrain/loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == [2, 4, 5]
    assert [m.value for m in losses] == pytest.approx([result.history[i]["loss"] for i in (1, 3, 4)], rel=1e-6)
    logged = set(client.get_run(run_id).data.metrics)
    assert {"pretrain/lr", "pretrain/grad_norm", "pretrain/epoch", "pretrain/step_skipped"} <= logged
    assert "pretrain/step" not in logged  # the step is the x-axis, not a metric
