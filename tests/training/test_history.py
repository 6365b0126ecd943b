"""What reaches the metrics sink (MLflow) of a training: each due step once, only once a checkpoint holds it, none of
the work a rollback discarded, and a resumed run's earlier steps again first, so the run that finishes is whole."""

from __future__ import annotations

import pytest
import torch

from eva_pipeline.training.history import StepReport
from eva_pipeline.training.loop import run_pretraining
from eva_pipeline.training.step import cached_targets
from eva_test_support import make_params

N, D = 32, 16  # batch 8 -> 4 steps per epoch, 8 steps in all (2 epochs)


class Sink:
    """A metrics sink that records what it was given: ``(step, metrics)`` calls, ``started`` calls."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, float]]] = []
        self.starts: list[tuple[str, int]] = []

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.steps.append((step, metrics))

    def started(self, training_id: str, resumed_from_step: int) -> None:
        self.starts.append((training_id, resumed_from_step))

    @property
    def logged(self) -> list[int]:
        return [step for step, _ in self.steps]


class Bar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs: str) -> None:
        pass

    def close(self) -> None:
        pass


def _record(step: int, **extra: float) -> dict[str, float]:
    return {"step": float(step), "loss": -0.1 * step, "lr": 1e-3, "images_per_second": 10.0, **extra}


def test_records_reach_the_sink_once_a_checkpoint_holds_them_and_rolled_back_ones_never():
    sink = Sink()
    report = StepReport(Bar(), sink, log_every_steps=2, last_step=9)
    for step in range(1, 6):
        report.step(_record(step))
    assert sink.logged == []  # nothing before a checkpoint
    report.commit(4)
    assert sink.logged == [2, 4]
    assert "step" not in sink.steps[0][1] and sink.steps[0][1]["loss"] == pytest.approx(-0.2)  # the step: x-axis
    report.step(_record(6, val_loss=-0.5))
    report.discard(4)  # rolled back to step 4's checkpoint: steps 5 and 6 did not happen
    for step in range(5, 10):
        report.step(_record(step, val_loss=-0.7) if step == 7 else _record(step))
    report.close()  # the last step: everything taken is held by the weights returned
    assert sink.logged == [2, 4, 6, 7, 8, 9]  # every other step, validation results and the last, each once
    assert sink.steps[3][1]["val_loss"] == -0.7


def test_a_resumed_report_tells_the_sink_its_training_then_replays_the_steps_it_resumes_from():
    class BatchSink(Sink):
        def log_steps(self, pairs):  # many steps in one request, when the sink can
            self.batches = [*getattr(self, "batches", []), [step for step, _ in pairs]]

    sink = BatchSink()
    report = StepReport(Bar(), sink, log_every_steps=2, last_step=8)
    report.start("abc123", 4, [_record(s) for s in range(1, 7)])  # a history file never holds more, but: cut at 4
    assert sink.starts == [("abc123", 4)] and sink.batches == [[2, 4]] and sink.steps == []


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (N, 1, 28, 28), dtype=torch.uint8, generator=gen), torch.randn(N, 49, D, generator=gen)


def test_a_training_resumed_in_new_runs_logs_steps_1_to_n_once_in_each(tmp_path, data):
    images, targets = data

    def train(max_steps: int | None) -> tuple[Sink, object]:
        sink = Sink()
        params = make_params(log_every_steps=1, max_steps=max_steps, checkpoint={"every_steps": 2, "keep_last": 2})
        result = run_pretraining(
            params, images, cached_targets(targets), D, checkpoint_dir=tmp_path, metrics_fn=sink, progress=False
        )
        return sink, result

    first, _ = train(3)  # stops after step 3 (its last step is checkpointed)
    second, result = train(None)  # resumes at 3 and runs to 8
    third, _ = train(None)  # resumes at its end: nothing to train, the history is logged all the same
    assert first.logged == [1, 2, 3]
    assert second.logged == third.logged == list(range(1, 9))
    losses = [r["loss"] for r in result.run_history]
    assert [m["loss"] for _, m in second.steps] == [m["loss"] for _, m in third.steps] == losses
    (training_id,) = {s[0] for sink in (first, second, third) for s in sink.starts}
    assert [s[1] for sink in (first, second, third) for s in sink.starts] == [0, 3, 8]
    assert (tmp_path / training_id).is_dir()  # the training's id is its checkpoint folder


def test_a_rolled_back_training_logs_each_step_once_with_the_values_that_made_the_weights(tmp_path, data):
    images, targets = data
    lookup = cached_targets(targets)
    calls = []

    def poisoned(index, x):  # steps 5-7 give NaN once: 3 skips in a row -> back to the step-4 checkpoint
        calls.append(1)
        out = lookup(index, x)
        return torch.full_like(out, float("nan")) if 5 <= len(calls) <= 7 else out

    sink = Sink()
    params = make_params(
        log_every_steps=1,
        checkpoint={"every_steps": 4, "keep_last": 2},
        nonfinite={"max_consecutive_skips": 3, "max_rollbacks": 2},
    )
    result = run_pretraining(params, images, poisoned, D, checkpoint_dir=tmp_path, metrics_fn=sink, progress=False)
    assert len(calls) == 8 + 3  # the poisoned steps ran twice
    assert sink.logged == list(range(1, 9))
    assert [m["loss"] for _, m in sink.steps] == [r["loss"] for r in result.run_history]
    assert not any(m["step_skipped"] for _, m in sink.steps)
