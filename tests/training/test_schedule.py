"""The per-step warmup + cosine LR reproduces EVA-01's logged epoch-mean learning rates (``cosine_scheduler`` in
EVA-01 ``utils.py``)."""

import numpy as np
import pytest

from eva_pipeline.training import WarmupCosineSchedule

STEPS_PER_EPOCH = 7242


@pytest.fixture(scope="module")
def eva01() -> WarmupCosineSchedule:
    return WarmupCosineSchedule.from_epochs(
        base_value=1e-3, final_value=1e-5, epochs=150, steps_per_epoch=STEPS_PER_EPOCH, warmup_epochs=2
    )


@pytest.mark.parametrize(
    ("epoch", "logged_mean_lr"),
    [(0, 2.4998274e-4), (1, 7.5001726e-4), (2, 9.9996284e-4), (149, 1.0037180e-5)],
)
def test_epoch_mean_lr_matches_reference(eva01, epoch, logged_mean_lr):
    steps = np.arange(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH)
    mean = eva01.values(steps).mean()
    # The logged figures carry 8 significant digits: ours, rounded the same way, must be the identical number
    # (a stricter check than any relative tolerance above their rounding error of ~2e-8).
    assert float(f"{mean:.7e}") == logged_mean_lr


def test_matches_beit_cosine_scheduler_exactly(eva01):
    """Closed form == BEiT/EVA ``cosine_scheduler``'s array construction (linspace warmup, then cos(pi * i / len))."""
    total, warmup = 150 * STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH
    iters = np.arange(total - warmup)
    reference = np.concatenate(
        [np.linspace(0, 1e-3, warmup), 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + np.cos(np.pi * iters / len(iters)))]
    )
    ours = eva01.values(np.arange(total))
    np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=0)
    assert eva01(0) == 0.0
    assert eva01(warmup - 1) == pytest.approx(1e-3, rel=1e-12)
    assert eva01(total + 10) == pytest.approx(1e-5, rel=1e-9)


def test_no_warmup_starts_at_base():
    schedule = WarmupCosineSchedule(base_value=2.0, final_value=0.0, total_steps=100)
    assert schedule(0) == 2.0
    assert schedule(50) == pytest.approx(1.0)
    assert schedule(100) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"total_steps": 0}, "total_steps must be >= 1"),
        ({"total_steps": 10, "warmup_steps": 11}, "warmup_steps must be in"),
    ],
)
def test_bad_schedule_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WarmupCosineSchedule(base_value=1.0, final_value=0.0, **kwargs)
