"""Smoke test of benchmarks/pretrain_step.py: a tiny config for a step or two, result structure, FLOP formula.

No assertion on speed: the numbers depend on the machine.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from eva_pipeline.models import EvaConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pretrain_step.py"


@pytest.fixture(scope="module")
def bench_module():
    spec = importlib.util.spec_from_file_location("eva_bench_pretrain_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def tiny_config(bm):
    student = EvaConfig(
        img_size=42,
        patch_size=14,
        embed_dim=32,
        depth=1,
        num_heads=2,
        mlp_hidden_dim=64,
        target_dim=16,
        drop_path_rate=0.0,
    )
    teacher = bm.TeacherShape(image_size=42, patch_size=14, width=32, layers=1, heads=2, mlp_ratio=2.0, output_dim=16)
    return bm.BenchConfig("tiny", student, teacher, None, batch=2, num_masking_patches=3, min_num_patches=1)


def test_flops_match_a_hand_count(bench_module):
    bm = bench_module
    # 8 px / patch 4 -> N = 4 patches, T = 5 tokens; D = 8, depth 1, MLP 16, 4-d targets, 2 masked tokens per image.
    student = EvaConfig(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2, mlp_hidden_dim=16, target_dim=4)
    teacher = bm.TeacherShape(image_size=8, patch_size=4, width=8, layers=1, heads=2, mlp_ratio=2.0, output_dim=4)
    cfg = bm.BenchConfig("toy", student, teacher, None, batch=1, num_masking_patches=2, min_num_patches=1)
    patch = 2 * 4 * (3 * 4 * 4) * 8  # 3072
    qkv, attn_proj, mlp = 2 * 5 * 8 * 24, 2 * 5 * 8 * 8, 2 * 5 * 8 * 16 + 2 * 5 * 16 * 8  # 1920, 640, 2560
    qk, av = 2 * 5 * 5 * 8, 2 * 5 * 5 * 8  # 400, 400
    block = qkv + attn_proj + mlp + qk + av  # 5920
    assert bm.vit_forward_flops(5, 4, 8, 1, 16, 4) == patch + block == 8992
    flops = bm.flops_per_image(cfg, masked_tokens=2)
    assert flops["student_forward"] == 8992 + 2 * 2 * 8 * 4 == 9120  # lm_head on the 2 masked tokens
    assert flops["student_train"] == 3 * 9120
    assert flops["teacher_forward"] == 8992 + 2 * 5 * 8 * 4 == 9312  # @ proj on cls + 4 patch tokens
    assert flops["online"] == 27360 + 9312 and flops["cached"] == 27360


def test_peak_tflops(bench_module):
    bm = bench_module
    assert bm.peak_tflops(torch.device("cpu"), "fp32", None) is None
    assert bm.peak_tflops(torch.device("cpu"), "bf16", 2.5) == 2.5
    assert bm.PEAK_TFLOPS["H200"]["bf16"] == bm.PEAK_TFLOPS["H100"]["bf16"] == 989.0
    assert bm.PEAK_TFLOPS["A100"]["bf16"] == 312.0


def test_open_clip_teacher_registration_matches_the_shape(bench_module):
    import open_clip

    bm = bench_module
    shape = tiny_config(bm).teacher
    name = bm.register_teacher(shape)
    assert bm.register_teacher(shape) == name  # idempotent
    visual = open_clip.create_model(name, pretrained=None).visual
    assert tuple(visual.grid_size) == (3, 3) and visual.proj.shape == (32, 16)
    assert len(visual.transformer.resblocks) == 1 and visual.transformer.resblocks[0].attn.num_heads == 2


@pytest.mark.slow
def test_benchmark_runs_and_reports(bench_module, monkeypatch, tmp_path, capsys):
    bm = bench_module
    monkeypatch.setattr(bm, "size_config", lambda size: tiny_config(bm))
    out = tmp_path / "result.json"
    result = bm.main(
        [
            "--device",
            "cpu",
            "--steps",
            "1",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--peak-tflops",
            "1.0",
            "--breakdown",
            "--profile",
            "--json",
            str(out),
        ]
    )

    assert set(result["images_per_second"]) == set(bm.MODES) == {"reference", "ours_online", "ours_cached"}
    assert all(v > 0 for v in result["images_per_second"].values())
    assert all(len(v) == 2 for v in result["images_per_second_rounds"].values())
    assert set(result["ratios"]) == {"ours_online/reference", "ours_cached/reference", "ours_cached/ours_online"}
    ips = result["images_per_second"]
    assert result["ratios"]["ours_cached/ours_online"] == pytest.approx(ips["ours_cached"] / ips["ours_online"])
    assert set(result["mfu"]) == set(bm.MODES) and all(v > 0 for v in result["mfu"].values())
    flops = result["flops_per_image"]
    assert result["achieved_tflops"]["ours_cached"] == pytest.approx(ips["ours_cached"] * flops["cached"] / 1e12)
    assert result["masked_tokens_per_image"] > 0 and result["batch"] == 2
    assert set(result["breakdown_ms"]) == {"reference_teacher", "ours_teacher"}
    assert json.loads(out.read_text())["ratios"] == pytest.approx(result["ratios"])

    printed = capsys.readouterr().out
    for key in ("| reference", "| ours_online", "| ours_cached", "ours_online/reference", "== ours_cached:"):
        assert key in printed
    assert "optimizer" in printed.split("== reference:")[1].splitlines()[0]  # phases named in the profile
    ours_phases = printed.split("== ours_cached:")[1].splitlines()[0]  # ranges that train_step itself opens
    assert all(phase in ours_phases for phase in ("targets", "forward", "backward", "optimizer"))
    assert result["equal_work_bound"] == pytest.approx(1.0 / result["achieved_tflops"]["reference"])
    assert "equal-work bound" in printed


def test_our_step_is_the_loops_train_step(bench_module, monkeypatch):
    """``ours_*`` time ``eva_pipeline.training.step.train_step`` itself, not a copy; its profiler ranges share the
    benchmark's prefix, so ``--profile`` names its phases."""
    from eva_pipeline.training import step

    bm = bench_module
    assert bm.PHASE_PREFIX == step.STEP_PHASE_PREFIX
    bench = bm.build_bench(tiny_config(bm), torch.device("cpu"), zero_stage=0)
    calls = []
    real = step.train_step
    monkeypatch.setattr(step, "train_step", lambda *a, **k: calls.append(k["step"]) or real(*a, **k))
    losses = [bench.steps["ours_cached"](), bench.steps["ours_online"]()]
    assert calls == [0, 1] and all(isinstance(v, float) for v in losses)


def test_variants_switch_one_build_in_place(bench_module, monkeypatch, tmp_path):
    """``--variants``: one build, attention and checkpointing switched per variant, one JSON entry each."""
    bm = bench_module
    monkeypatch.setattr(bm, "size_config", lambda size: tiny_config(bm))
    built = []
    real_build = bm.build_bench
    monkeypatch.setattr(bm, "build_bench", lambda *a, **k: built.append(1) or real_build(*a, **k))
    out = tmp_path / "variants.json"
    results = bm.main(
        [
            "--device",
            "cpu",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--peak-tflops",
            "1.0",
            "--zero-stage",
            "0",
            "--variants",
            "sdpa",
            "eager+ckpt",
            "--json",
            str(out),
        ]
    )
    assert len(built) == 1
    assert [(r["attn"], r["grad_checkpointing"], r["zero_stage"]) for r in results] == [
        ("sdpa", False, 0),
        ("eager", True, 0),
    ]
    assert [r["attn"] for r in json.loads(out.read_text())] == ["sdpa", "eager"]
    assert bm.parse_variant("sdpa+ckpt+compile") == ("sdpa", True, True)
    with pytest.raises(ValueError, match="expected eager"):
        bm.parse_variant("flash")
    with pytest.raises(SystemExit, match="must come last"):
        bm.main(["--device", "cpu", "--variants", "sdpa+compile", "eager"])


def test_precisions_are_timed_in_the_same_rounds(bench_module, monkeypatch, capsys):
    """``--precision fp32 bf16``: one build per precision, each mode's images/s over fp32's; ours runs bf16 as the
    loop does (autocast over an fp32 engine, the teacher under it), and both steps fall back where the loop would."""
    from eva_pipeline.training import precision as precision_module

    bm = bench_module
    monkeypatch.setattr(bm, "size_config", lambda size: tiny_config(bm))
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    argv = ["--device", "cpu", "--steps", "1", "--rounds", "2", "--warmup", "0", "--peak-tflops", "1.0"]
    fp32, bf16 = bm.main([*argv, "--precision", "fp32", "bf16"])
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert fp32["vs_first_precision"] == dict.fromkeys(bm.MODES, 1.0)
    assert bf16["vs_first_precision"]["ours_cached"] == pytest.approx(
        bf16["images_per_second"]["ours_cached"] / fp32["images_per_second"]["ours_cached"]
    )
    assert all(len(v) == 2 for v in bf16["images_per_second_rounds"].values())
    assert "images/s vs fp32" in capsys.readouterr().out

    bench = bm.build_bench(tiny_config(bm), torch.device("cpu"), "bf16", zero_stage=0)
    assert bench.ours.engine.torch_autocast_enabled() and bench.ours.precision.cpu_autocast
    assert {p.dtype for p in bench.ours.teacher.parameters()} == {torch.float32}  # autocast, not bf16 weights
    assert bench.reference.amp and bench.reference.dtype == torch.bfloat16

    fixed = bm.main([*argv, "--precision", "fp32:sdpa", "bf16:eager", "--variants", "sdpa+ckpt"])
    assert [(r["precision"], r["attn"], r["grad_checkpointing"]) for r in fixed] == [
        ("fp32", "sdpa", False),  # a build's own variant wins over --variants
        ("bf16", "eager", False),
    ]
    with pytest.raises(ValueError, match="expected one of"):
        bm.parse_build("fp8:sdpa")

    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    assert bm.build_bench(tiny_config(bm), torch.device("cpu"), "bf16", zero_stage=0).precision == "fp32"


def test_cpu_peak_is_measured_when_no_data_sheet_applies(bench_module):
    bm = bench_module
    assert bm.peak_tflops(bm.torch.device("cpu"), "fp32", None) is None
    measured = bm.measure_matmul_tflops(bm.torch.device("cpu"), "fp32", n=128, seconds=0.05)
    assert 1e-4 < measured < 100  # TFLOP/s of two CPU cores: positive and physically plausible


def test_reference_student_has_our_shapes(bench_module):
    from eva_pipeline.models import EvaMIM

    bm = bench_module
    cfg = tiny_config(bm)
    ref = bm.ReferenceMIM(cfg.student)
    ours = EvaMIM(dataclasses.replace(cfg.student))
    # Same parameter count: timm's k bias is a buffer, our q/v biases and the head/mask token match one to one.
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in ours.parameters())
    images, masks = bm.make_batch(cfg)
    assert images.shape == (2, 3, 42, 42) and masks.dtype == torch.bool and masks.shape == (2, 9)
    out = ref(images, masks)
    assert out.shape == (int(masks.sum()), cfg.student.target_dim)
    ckpt = bm.ReferenceMIM(cfg.student, grad_checkpointing=True)
    ckpt.load_state_dict(ref.state_dict())
    again = ckpt(images, masks)
    again.sum().backward()
    torch.testing.assert_close(again, out)
    assert ckpt.eva.blocks[0].attn.qkv.weight.grad is not None


def test_loader_order_benchmark_prints_ours_against_the_randperm_baseline(capsys):
    """Smoke test of benchmarks/loader_order.py's order part: both measured, a ratio printed (no speed asserted)."""
    path = SCRIPT.parent / "loader_order.py"
    spec = importlib.util.spec_from_file_location("eva_bench_loader_order", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.bench_order([10_007])
    line = capsys.readouterr().out.splitlines()[1]
    assert "10,007 images: EpochOrder" in line and "torch.randperm" in line and line.rstrip().endswith("the randperm")
