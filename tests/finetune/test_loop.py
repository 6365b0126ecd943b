"""The fine-tuning loop: exact resume (weights, EMA, CutMix and augmentation draws), the LR each layer gets, the
frozen patch embedding, the EMA rule, validation records and the checkpoint handed on."""

from __future__ import annotations

import pytest
import torch

from eva_pipeline.config import FinetuneParams
from eva_pipeline.finetune import eval_transform, train_transform
from eva_pipeline.finetune.loop import run_finetuning
from eva_pipeline.loader.classification import ClassificationDataset
from eva_pipeline.models import ClassifierCheckpoint, create_classifier
from eva_pipeline.training import precision as precision_module

from .conftest import NUM_CLASSES, SMALL


def _params(**overrides) -> FinetuneParams:
    base = {
        "img_size": 28,
        "epochs": 2,
        "batch_size": 8,
        "data": {"sources": ["x"]},
        "optimizer": {
            "lr": 1e-3,
            "min_lr": 1e-5,
            "warmup_epochs": 0.5,
            "weight_decay": 0.05,
            "layer_decay": 0.5,
            "clip_grad": None,
        },
        "mixing": {"cutmix_alpha": 1.0, "label_smoothing": 0.1},
        "ema": {"enabled": True, "decay": 0.5},
        "drop_path_rate": 0.1,
        "checkpoint": {"every_steps": 3, "keep_last": 2},
        "log_every_steps": 1,
    }
    base.update(overrides)
    return FinetuneParams.model_validate(base)


def _model():
    torch.manual_seed(0)
    return create_classifier("eva_tiny_patch4_28", NUM_CLASSES, **{**SMALL, "drop_path_rate": 0.1})


def _data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), torch.arange(n) % NUM_CLASSES


def _train_set() -> ClassificationDataset:
    images, labels = _data()
    return ClassificationDataset(images, labels, train_transform(28, (0.5, 1.0)), seed=0)


def _run(params: FinetuneParams, ckpt, **kwargs):
    return run_finetuning(params, _model(), _train_set(), checkpoint_dir=ckpt, progress=False, **kwargs)


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path, monkeypatch, precision) -> None:
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)  # bf16: autocast, whatever this CPU has
    whole = _run(_params(precision=precision), tmp_path / "whole")
    assert whole.steps == 8 and whole.resumed_from_step == 0  # 32 images / 8 per batch * 2 epochs
    _run(_params(precision=precision, max_steps=3), tmp_path / "cut")  # stops after the checkpoint of step 3, mid-epoch
    resumed = _run(_params(precision=precision), tmp_path / "cut")
    assert resumed.resumed_from_step == 3
    _same_state(whole.model.state_dict(), resumed.model.state_dict())
    _same_state(whole.ema.state_dict(), resumed.ema.state_dict())  # the EMA travels in the checkpoint
    losses = [r["loss"] for r in whole.run_history]
    assert [r["loss"] for r in resumed.run_history] == losses  # the history of the whole run, steps 1..8
    assert len(set(losses)) > 1


def test_another_start_never_resumes_this_runs_state(tmp_path) -> None:
    first = _run(_params(max_steps=3), tmp_path, start="student:abc")
    other = _run(_params(max_steps=3), tmp_path, start="random")
    assert first.resumed_from_step == 0 and other.resumed_from_step == 0
    assert len(list(tmp_path.iterdir())) == 2  # one folder per (settings, data, start)


def test_the_frozen_patch_embedding_never_moves(tmp_path) -> None:
    params = _params(max_steps=4, ema={"enabled": False})
    start = _model()
    before = {k: v.clone() for k, v in start.state_dict().items()}
    frozen = {k: v for k, v in before.items() if k.startswith("patch_embed")}
    assert frozen
    result = run_finetuning(params, start, _train_set(), checkpoint_dir=tmp_path, progress=False)
    for k, v in frozen.items():
        torch.testing.assert_close(result.model.state_dict()[k], v, rtol=0, atol=0)
    moved = {k for k, v in result.model.state_dict().items() if not torch.equal(v, before[k])}
    assert "head.weight" in moved and "blocks.0.attn.qkv.weight" in moved  # everything else trains


def test_engine_groups_carry_evas_scales(tmp_path, monkeypatch) -> None:
    """Every optimiser group's LR at a step is the schedule's LR times its lr_scale, and the scales are
    ``layer_decay ** (depth + 1 - id)`` for ids 0..depth+1 (which parameter has which id: test_optim.py)."""
    from eva_pipeline.finetune import loop

    seen = []
    real = loop.optimizer_step

    def spy(engine, loss_fn, lr, **kwargs):
        record = real(engine, loss_fn, lr, **kwargs)
        seen.append([(g["lr"], g["lr_scale"], lr) for g in engine.optimizer.param_groups])
        return record

    monkeypatch.setattr(loop, "optimizer_step", spy)
    _run(_params(max_steps=2, ema={"enabled": False}), tmp_path)
    depth = SMALL["depth"]
    for groups in seen:
        for lr, lr_scale, base in groups:
            assert lr == pytest.approx(base * lr_scale)
        assert {round(scale, 12) for _, scale, _ in groups} == {round(0.5**k, 12) for k in range(depth + 2)}
    assert seen[-1][0][2] > 0


def test_ema_follows_the_official_rule(tmp_path) -> None:
    """With decay d and no warm-up, after one step ema = d * start + (1 - d) * trained (every float tensor)."""
    start = _model().state_dict()
    result = _run(_params(max_steps=1, ema={"enabled": True, "decay": 0.25}), tmp_path)
    trained = result.model.state_dict()
    for k, v in result.ema.state_dict().items():
        torch.testing.assert_close(v, 0.25 * start[k] + 0.75 * trained[k], rtol=1e-6, atol=1e-7, msg=k)


def test_run_fraction_scales_the_decay_to_the_run(tmp_path) -> None:
    result = _run(_params(max_steps=1, ema={"enabled": True, "decay": 0.9999, "run_fraction": 0.5}), tmp_path)
    assert result.ema_decay == pytest.approx(1 - 1 / 4)  # window: half of the 8 steps the schedule plans


def test_validation_records_top1_of_model_and_ema(tmp_path) -> None:
    images, labels = _data(16)
    val = ClassificationDataset(images, labels, eval_transform(28))
    params = _params(max_steps=4, validation={"sources": ["v"], "every_steps": 2, "batch_size": 5})
    result = _run(params, tmp_path, validation=val)
    evaluated = [r for r in result.run_history if "val_top1" in r]
    assert [int(r["step"]) for r in evaluated] == [2, 4]
    for r in evaluated:
        for key in ("val_top1", "val_top1_ema"):
            assert 0.0 <= r[key] <= 1.0 and (r[key] * 16) == pytest.approx(round(r[key] * 16))


def test_the_checkpoint_handed_on_rebuilds_the_same_classifier(tmp_path) -> None:
    result = _run(_params(max_steps=2), tmp_path)
    classes = [f"c{i}" for i in range(NUM_CLASSES)]
    checkpoint = ClassifierCheckpoint.from_modules(result.model, classes, result.ema)
    rebuilt = ClassifierCheckpoint.from_dict(checkpoint.to_dict())
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.classifier(use_ema=True)(x), result.ema.eval()(x))
        torch.testing.assert_close(rebuilt.classifier(use_ema=False)(x), result.model.eval()(x))
    assert rebuilt.classes == classes


def test_odd_mixing_batch_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="must be even"):
        _params(batch_size=7)
