"""EMA: the official update rule step by step, timm's warm-up schedule, and the 0.9999 short-run trap."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from timm.utils import ModelEma
from torch import nn

from eva_pipeline.finetune.ema import EVA_EMA_DECAY, create_ema, decay_for_run, update_ema


def _linear(value: float = 0.0) -> nn.Linear:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(value)
    return layer


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def _ema_value(ema) -> float:
    values = {round(v, 6) for p in ema.module.parameters() for v in p.flatten().tolist()}
    assert len(values) == 1
    return values.pop()


def test_update_rule_without_warmup_by_hand() -> None:
    model = _linear(1.0)
    ema = create_ema(model, decay=0.9)
    assert not ema.module.training
    want = 1.0
    for step, value in enumerate([2.0, 4.0, -1.0, 0.5], start=1):
        _set(model, value)
        assert _ema_value(ema) == pytest.approx(want)  # nothing moves before the update
        assert update_ema(ema, model, step) == 0.9
        want = 0.9 * want + 0.1 * value
        assert _ema_value(ema) == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx(0.9 * (0.9 * (0.9 * (0.9 + 0.2) + 0.4) - 0.1) + 0.05)


def test_same_weights_as_the_official_model_ema() -> None:
    """EVA-01 uses timm's ModelEma (v1); ours without warm-up gives the same weights after each step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    ours = create_ema(model, decay=0.95)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        official = ModelEma(model, decay=0.95)
    for step in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        update_ema(ours, model, step)
        official.update(model)
        for a, b in zip(ours.module.state_dict().values(), official.ema.state_dict().values(), strict=True):
            assert torch.allclose(a, b, atol=1e-6)


def test_warmup_schedule_by_hand() -> None:
    """timm's warm-up: copy at step 1, then decay_k = min(decay, 1 - k^(-2/3))."""
    model = _linear(0.0)
    ema = create_ema(model, decay=0.99, warmup=True)
    want, decays = 0.0, []
    for step in range(1, 8):
        _set(model, float(step))
        decays.append(update_ema(ema, model, step))
        expected = 0.0 if step == 1 else min(0.99, 1.0 - step ** (-2 / 3))
        assert decays[-1] == pytest.approx(expected, rel=1e-12)
        want = expected * want + (1 - expected) * step
        assert _ema_value(ema) == pytest.approx(want, abs=1e-5)
    assert decays[1] == pytest.approx(1 - 2 ** (-2 / 3))  # 0.370
    # Capped by the configured decay once 1 - k^(-2/3) passes it (k >= 1000 for 0.99).
    assert ema.get_decay(5000) == 0.99


def test_evas_decay_stays_at_init_over_a_short_run() -> None:
    """The trap: over 100 steps in which the weights walk from 0 to 1, the EMA at 0.9999 moves under 1% of the
    way; warm-up or a decay scaled to the run follow the weights (each checked against the hand recurrence)."""
    steps = 100

    def run(ema, decay_of) -> tuple[float, float]:
        model, want = _linear(0.0), 0.0
        for step in range(1, steps + 1):
            _set(model, step / steps)
            update_ema(ema, model, step)
            want = decay_of(step) * want + (1 - decay_of(step)) * step / steps
        return _ema_value(ema), want

    got, want = run(create_ema(_linear(0.0), EVA_EMA_DECAY), lambda k: EVA_EMA_DECAY)
    assert got == pytest.approx(want, abs=1e-6) and got < 0.01  # under 1% of the way to the final weights (1.0)
    got, want = run(
        create_ema(_linear(0.0), EVA_EMA_DECAY, warmup=True), lambda k: 0.0 if k == 1 else 1 - k ** (-2 / 3)
    )
    assert got == pytest.approx(want, abs=1e-5) and got > 0.75
    scaled = decay_for_run(steps)
    assert scaled == pytest.approx(0.9)
    got, want = run(create_ema(_linear(0.0), scaled), lambda k: scaled)
    assert got == pytest.approx(want, abs=1e-5) and got > 0.85


def test_decay_for_run() -> None:
    assert decay_for_run(500) == pytest.approx(1 - 1 / 50)
    assert decay_for_run(10**6) == EVA_EMA_DECAY  # long runs keep the paper's value
    assert decay_for_run(5) == 0.0  # a window of one step: the EMA is the model
    assert math.isclose(decay_for_run(2000, window_fraction=0.5), 0.999)
    with pytest.raises(ValueError, match="total_steps"):
        decay_for_run(0)
    with pytest.raises(ValueError, match="decay must be in"):
        create_ema(_linear(), decay=1.0)
    with pytest.raises(ValueError, match="from 1"):
        update_ema(create_ema(_linear()), _linear(), 0)
