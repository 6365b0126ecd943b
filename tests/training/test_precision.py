"""Mixed precision on CPU: bf16 is an fp32 engine with autocast where the CPU has native bf16 (weights, optimiser
state and loss in fp32; the student's and the online teacher's matmuls in bf16), and plain fp32 with one log line
where it does not; both branches are forced here by replacing the detector."""

from __future__ import annotations

import logging

import pytest
import torch

from eva_pipeline.training import precision as precision_module
from eva_pipeline.training.loop import run_pretraining
from eva_pipeline.training.precision import Precision, cpu_has_native_bf16, resolve_precision
from eva_pipeline.training.step import cached_targets
from eva_test_support import make_params

N, D = 32, 16  # batch 8 -> 4 steps per epoch


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (N, 1, 28, 28), dtype=torch.uint8, generator=gen)
    return images, torch.randn(N, 49, D, generator=gen)


@pytest.fixture
def native_bf16(monkeypatch):
    """Set whether this 'CPU' has native bf16: ``native_bf16(True)``."""

    def set_to(value: bool) -> None:
        monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: value)

    return set_to


def _run(params, data, folder, targets=None, **kwargs):
    images, stored = data
    return run_pretraining(
        params, images, targets or cached_targets(stored), D, checkpoint_dir=folder, progress=False, **kwargs
    )


def _fallback_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == precision_module.__name__]


# ------------------------------------------------------------------------------------------- the detector
@pytest.mark.parametrize(
    ("caps", "native"),
    [
        ({"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, False),  # AVX-512 without BF16
        ({"avx2": True}, False),
        ({"avx512_f": True, "avx512_bf16": True}, True),  # e.g. Zen 4, Cooper Lake
        ({"avx512_bf16": False, "amx_bf16": True}, True),  # Sapphire Rapids and later
        ({"neon": True, "bf16": True}, True),  # Armv8.6
    ],
)
def test_native_bf16_is_read_from_torch_cpu_capabilities(monkeypatch, caps, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert cpu_has_native_bf16() is native


def test_without_torch_capabilities_the_cpuinfo_flags_decide(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision_module, "_CPUINFO", cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert not cpu_has_native_bf16()
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_native_bf16()
    cpuinfo.unlink()
    assert not cpu_has_native_bf16()  # unreadable: assume not


# ------------------------------------------------------------------------------------------- resolving
def test_bf16_on_a_cpu_without_it_falls_back_to_fp32_with_one_log_line(native_bf16, caplog):
    native_bf16(False)
    with caplog.at_level(logging.INFO, logger=precision_module.__name__):
        got = resolve_precision("bf16", torch.device("cpu"))
    assert got == Precision("fp32", "cpu") and got.input_dtype == torch.float32 and not got.cpu_autocast
    (record,) = _fallback_records(caplog)
    assert record.levelno == logging.WARNING and "fp32" in record.getMessage() and "\n" not in record.getMessage()


def test_bf16_on_a_cpu_with_it_is_autocast_over_fp32(native_bf16, caplog):
    native_bf16(True)
    with caplog.at_level(logging.INFO, logger=precision_module.__name__):
        got = resolve_precision("bf16", torch.device("cpu"))
    assert got.name == "bf16" and got.cpu_autocast and got.input_dtype == torch.float32
    assert not _fallback_records(caplog)
    with got.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_other_precisions_are_unchanged(native_bf16):
    native_bf16(False)  # the detector only matters to bf16 on CPU
    assert resolve_precision("fp32", "cpu") == Precision("fp32", "cpu")
    cuda = resolve_precision("bf16", "cuda")  # DeepSpeed's bf16 engine on a GPU: bf16 weights and inputs
    assert not cuda.cpu_autocast and cuda.input_dtype == torch.bfloat16
    assert cuda.deepspeed_section() == {"bf16": {"enabled": True}}
    with pytest.raises(ValueError, match=r"fp16.*CUDA"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="fp8"):
        resolve_precision("fp8", "cpu")


# ------------------------------------------------------------------------------------------- training
def test_bf16_training_keeps_fp32_weights_and_runs_the_student_in_bf16(native_bf16, data, tmp_path, monkeypatch):
    native_bf16(True)
    seen: dict[str, torch.dtype] = {}
    from eva_pipeline.training import step as step_module

    real_loss = step_module.mim_cosine_loss

    def loss_spy(pred, target, num_tokens=None):
        seen["pred"] = pred.dtype
        out = real_loss(pred, target, num_tokens)
        seen["loss"] = out.dtype
        return out

    monkeypatch.setattr(step_module, "mim_cosine_loss", loss_spy)
    bf16 = _run(make_params(precision="bf16", max_steps=4), data, tmp_path / "bf16")
    assert seen == {"pred": torch.bfloat16, "loss": torch.float32}  # the lm_head ran under autocast; the loss in fp32
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float32}  # master weights are the model's own

    fp32 = _run(make_params(precision="fp32", max_steps=4), data, tmp_path / "fp32")
    got = [h["loss"] for h in bf16.history]
    want = [h["loss"] for h in fp32.history]
    assert got != want  # really another precision ...
    assert got == pytest.approx(want, abs=2e-3)  # ... of the same training
    assert [p.name for p in (tmp_path / "bf16").iterdir()] != [p.name for p in (tmp_path / "fp32").iterdir()]


def test_bf16_engine_state_is_fp32(native_bf16):
    """The optimiser's master partition and Adam moments of the autocast engine are fp32 (DeepSpeed's bf16 engine
    would hold the model itself in bf16)."""
    from eva_pipeline.training import recipe
    from eva_pipeline.training.engine import initialize_engine

    native_bf16(True)
    params = make_params(precision="bf16")
    model = recipe.initial_student(params, D)
    engine = initialize_engine(model, recipe.make_optimizer(model, params), params, torch.device("cpu"))
    assert engine.torch_autocast_enabled() and engine.torch_autocast_dtype() == torch.bfloat16
    assert not engine.bfloat16_enabled() and not engine.fp16_enabled()
    x = torch.zeros(2, 3, 28, 28)
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[:, :5] = True
    engine.train()
    loss = engine(x, mask).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    assert {p.dtype for p in engine.module.parameters()} == {torch.float32}
    assert {t.dtype for t in engine.optimizer.single_partition_of_fp32_groups} == {torch.float32}
    moments = [v for s in engine.optimizer.optimizer.state.values() for v in s.values() if v.ndim > 0]
    assert moments and {m.dtype for m in moments} == {torch.float32}


def test_the_online_teacher_runs_under_the_same_autocast(native_bf16, data, tmp_path):
    native_bf16(True)
    _, stored = data
    states = []

    def teacher(indices, images):
        states.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), images.dtype))
        return stored[indices]

    _run(make_params(precision="bf16", max_steps=2), data, tmp_path / "a", targets=teacher)
    assert states == [(True, torch.bfloat16, torch.float32)] * 2
    states.clear()
    _run(make_params(precision="fp32", max_steps=2), data, tmp_path / "b", targets=teacher)
    assert [s[0] for s in states] == [False, False]


def test_a_fallback_run_is_an_fp32_run(native_bf16, data, tmp_path, caplog):
    """bf16 asked on a CPU without it trains, checkpoints and resumes as fp32: the same folder and weights."""
    native_bf16(False)
    with caplog.at_level(logging.INFO, logger=precision_module.__name__):
        fell_back = _run(make_params(precision="bf16", max_steps=4), data, tmp_path / "ckpt")
    assert len(_fallback_records(caplog)) == 1
    fp32 = _run(make_params(precision="fp32", max_steps=4), data, tmp_path / "ckpt")
    assert fp32.resumed_from_step == 4  # the fallback run's checkpoint is the fp32 run's
    reference = _run(make_params(precision="fp32", max_steps=4), data, tmp_path / "ref")
    for key, value in reference.model.state_dict().items():
        assert torch.equal(fell_back.model.state_dict()[key], value), key


def test_an_fp32_run_after_a_bf16_run_in_one_process_is_unchanged(native_bf16, data, tmp_path):
    """DeepSpeed records torch_autocast process-wide (``deepspeed.runtime.torch_autocast``): a ``kedro run`` that
    pre-trains in bf16 and then fine-tunes in fp32 must get the fp32 engine it would get alone."""
    native_bf16(True)
    before = _run(make_params(precision="fp32", max_steps=3), data, tmp_path / "a")
    _run(make_params(precision="bf16", max_steps=1), data, tmp_path / "b")
    after = _run(make_params(precision="fp32", max_steps=3), data, tmp_path / "c")
    for key, value in before.model.state_dict().items():
        assert torch.equal(after.model.state_dict()[key], value), key
