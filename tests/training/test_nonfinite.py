"""Non-finite losses/gradients: DeepSpeed skips the step; a run stuck skipping rolls back to the last checkpoint and,
when that keeps failing, stops with a clear message (the public EVA code's rollback reloads a file it never saved)."""

from __future__ import annotations

import pytest
import torch

from eva_pipeline.training.loop import run_pretraining
from eva_pipeline.training.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from eva_pipeline.training.step import cached_targets
from eva_test_support import make_params

N, D = 32, 16  # batch 8 -> 4 steps per epoch, 8 steps in all


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(99)
    return torch.randint(0, 256, (N, 1, 28, 28), dtype=torch.uint8, generator=gen), torch.randn(N, 49, D, generator=gen)


class NaNTargets:
    """Cached targets, but NaN on the given target-function calls (the loop makes one call per step it runs)."""

    def __init__(self, targets: torch.Tensor, poisoned_calls) -> None:
        self.lookup = cached_targets(targets)
        self.poisoned_calls = poisoned_calls
        self.calls = 0

    def __call__(self, index, images):
        self.calls += 1
        out = self.lookup(index, images)
        return torch.full_like(out, float("nan")) if self.poisoned_calls(self.calls) else out


def _params(**changes):
    return make_params(
        checkpoint={"every_steps": 4, "keep_last": 2},
        nonfinite={"max_consecutive_skips": 3, "max_rollbacks": 2},
        **changes,
    )


def test_guard_counts_and_limits():
    guard = NonFiniteGuard(max_consecutive_skips=2, max_rollbacks=1)
    assert not guard.observe(False) and not guard.observe(True) and not guard.observe(False)
    assert guard.observe(False) and guard.rollbacks == 1  # two in a row -> roll back
    assert not guard.observe(False)
    with pytest.raises(NonFiniteTrainingError, match="after 1 rollback"):
        guard.observe(False)


def test_nan_steps_are_skipped_then_rolled_back_to_an_identical_result(tmp_path, data):
    images, targets = data
    clean = run_pretraining(
        _params(), images, cached_targets(targets), D, checkpoint_dir=tmp_path / "clean", progress=False
    )

    # Steps 5, 6, 7 (calls 5-7) are poisoned once: 3 skips in a row -> back to the step-4 checkpoint -> replay clean.
    injected = NaNTargets(targets, lambda call: 5 <= call <= 7)
    result = run_pretraining(_params(), images, injected, D, checkpoint_dir=tmp_path / "nan", progress=False)

    skipped = [r["step"] for r in result.history if r["step_skipped"]]
    assert skipped == [5.0, 6.0, 7.0]
    assert injected.calls == 8 + 3  # the three poisoned steps ran twice
    assert [r["step"] for r in result.history][-4:] == [5.0, 6.0, 7.0, 8.0]
    # The run's history is the trajectory that led to the weights: the rolled-back steps are gone from it.
    assert [r["step"] for r in result.run_history] == [float(s) for s in range(1, 9)]
    assert not any(r["step_skipped"] for r in result.run_history)
    for key, value in clean.model.state_dict().items():  # the rollback restored the exact state
        torch.testing.assert_close(result.model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_a_single_skipped_step_does_not_roll_back(tmp_path, data):
    images, targets = data
    injected = NaNTargets(targets, lambda call: call == 6)
    result = run_pretraining(_params(), images, injected, D, checkpoint_dir=tmp_path / "one", progress=False)
    assert [r["step"] for r in result.history if r["step_skipped"]] == [6.0]
    assert injected.calls == 8  # no replay
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_persistent_nan_stops_after_the_allowed_rollbacks_and_keeps_the_good_checkpoint(tmp_path, data):
    images, targets = data
    params, stuck = _params(), tmp_path / "stuck"
    with pytest.raises(NonFiniteTrainingError, match=r"after 2 rollback\(s\).*last good checkpoint is kept"):
        run_pretraining(params, images, NaNTargets(targets, lambda call: call >= 5), D, checkpoint_dir=stuck)
    (folder,) = [p for p in (tmp_path / "stuck").iterdir() if p.is_dir()]
    assert (folder / "latest").read_text().strip() == "step_4"
    assert (folder / "step_4").is_dir()


def test_nan_before_the_first_checkpoint_is_a_clear_error(tmp_path, data):
    images, targets = data
    with pytest.raises(NonFiniteTrainingError, match="before the first checkpoint"):
        run_pretraining(
            _params(), images, NaNTargets(targets, lambda call: True), D, checkpoint_dir=tmp_path, progress=False
        )
