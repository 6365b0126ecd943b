"""fp16's dynamic loss scale survives a SIGKILL and a resume (issue 14; needs a CUDA GPU: CPUs have no fp16 path).

A run killed mid-interval resumes from its last checkpoint with DeepSpeed's loss-scaler state (scale, and the
iterations since the last overflow that decide when it grows next), so every later step has the same scale, the
same skipped steps and the same loss as the run that was never interrupted. Losing the scaler state would restart
at ``2**initial_scale_power`` and grow on another schedule: both are checked. Skipped without a GPU.
"""

from __future__ import annotations

import json
import os
import signal
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 training needs a CUDA GPU"),
]

STEPS, KILL_AT, EVERY = 12, 7, 2  # killed after step 7: step 7 is discarded work, the resume starts after step 6
INITIAL_SCALE_POWER = 12  # doubles every 2 steps to 2**15 by the checkpoint; overflows come later

WORKER = string.Template(r"""
import json, os, signal, sys
import torch
from eva_pipeline.training.loop import run_pretraining
from eva_pipeline.training.step import cached_targets
from eva_test_support import make_params

root, kill_at, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
gen = torch.Generator().manual_seed(1234)
images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=gen)
targets = torch.randn(32, 49, 16, generator=gen)
params = make_params(
    device="cuda", precision="fp16", epochs=3, log_every_steps=1,
    checkpoint=dict(every_steps=$every, keep_last=2),
    deepspeed=dict(loss_scale=dict(initial_scale_power=$power, loss_scale_window=2, hysteresis=2)),
)

def metrics(step, record):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint: what a preempted node does

result = run_pretraining(
    params, images, cached_targets(targets), 16, checkpoint_dir=root, metrics_fn=metrics, progress=False
)
json.dump({"resumed_from_step": result.resumed_from_step, "history": result.history}, open(out, "w"))
""").substitute(every=EVERY, power=INITIAL_SCALE_POWER)


def _worker(tmp_path: Path, root: Path, kill_at: int, name: str) -> subprocess.CompletedProcess:
    src = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # other tests pin DeepSpeed to the CPU
    env["PYTHONPATH"] = os.pathsep.join([str(src / "src"), str(src / "tests"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", WORKER, str(root), str(kill_at), str(tmp_path / f"{name}.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_fp16_loss_scale_survives_a_kill_and_resume_cuda(tmp_path):
    straight = _worker(tmp_path, tmp_path / "a", 0, "a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = json.loads((tmp_path / "a.json").read_text())["history"]
    assert [h["step"] for h in a] == [float(s) for s in range(1, STEPS + 1)]

    killed = _worker(tmp_path, tmp_path / "b", KILL_AT, "b1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _worker(tmp_path, tmp_path / "b", 0, "b2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    b = json.loads((tmp_path / "b2.json").read_text())
    start = KILL_AT - KILL_AT % EVERY
    assert b["resumed_from_step"] == start
    assert [h["step"] for h in b["history"]] == [float(s) for s in range(start + 1, STEPS + 1)]

    scales_a = [h["loss_scale"] for h in a]
    # The scale had moved by the checkpoint, so a scaler restarted from scratch would show.
    assert len(set(scales_a)) > 1 and scales_a[start - 1] != 2.0**INITIAL_SCALE_POWER, scales_a
    assert [h["loss_scale"] for h in b["history"]] == scales_a[start:]
    assert [h["step_skipped"] for h in b["history"]] == [h["step_skipped"] for h in a[start:]]
    assert [h["loss"] for h in b["history"]] == pytest.approx([h["loss"] for h in a[start:]], rel=1e-3, abs=1e-5)
