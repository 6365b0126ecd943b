"""Start the ranks of a multi-process stage for world size > 1 and wait for them (the pattern of conventions.md).

Kedro runs one process; running ``kedro run`` under a launcher would repeat upstream nodes on every rank, race dataset
writes and open one MLflow run per rank. Instead a node writes a frozen run file and launches a Kedro-free worker
module (``eva_pipeline.training.worker`` for training, ``eva_pipeline.targets.extract`` for teacher targets)
through the DeepSpeed launcher (GPUs, multi-node with a hostfile) or torch elastic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Protocol, Self

from eva_pipeline.config import DistributedParams

WORKER_MODULE = "eva_pipeline.training.worker"


class RunFile:
    """Mixin for the frozen dataclass a node hands its ranks: written once as JSON, read by every rank."""

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, default=str))  # type: ignore[call-overload]
        return path

    @classmethod
    def read(cls, path: Path) -> Self:
        return cls(**json.loads(Path(path).read_text()))


class LaunchError(RuntimeError):
    """A rank failed; the message names the command and where the ranks' output went."""


class LaunchParams(Protocol):
    """What launching needs of a stage's parameters (PretrainParams, TeacherTargetsParams)."""

    world_size: int
    distributed: DistributedParams
    device: str


def launch_command(params: LaunchParams, spec_path: Path, module: str = WORKER_MODULE) -> list[str]:
    """The command that starts ``params.world_size`` ranks of worker ``module`` on ``spec_path``."""
    dist = params.distributed
    if dist.launcher == "torchrun":
        return [
            sys.executable, "-m", "torch.distributed.run",
            "--nproc_per_node", str(params.world_size),
            "--master_port", str(dist.master_port),
            "-m", module, str(spec_path),
        ]  # fmt: skip
    command = [str(Path(sys.executable).with_name("deepspeed"))]
    if dist.hostfile is not None:  # multi-node: one line per host, "host slots=N"; ranks = total slots
        command += ["--hostfile", str(dist.hostfile)]
        if dist.master_addr is not None:
            command += ["--master_addr", dist.master_addr]
    else:
        command += ["--num_gpus", str(params.world_size)]
    command += ["--master_port", str(dist.master_port), "--no_local_rank", "--module", module, str(spec_path)]
    return command


#: torch.distributed's rendezvous variables. A process that ran a world-size-1 engine holds MASTER_PORT (its store
#: still listens), so a child process must not inherit them.
RENDEZVOUS_ENV: tuple[str, ...] = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch(params: LaunchParams, spec_path: Path, log_path: Path, module: str = WORKER_MODULE) -> None:
    """Run the ranks to completion; their combined output goes to ``log_path`` (and the console)."""
    command = launch_command(params, spec_path, module)
    env = dict(os.environ)
    for key in RENDEZVOUS_ENV:
        env.pop(key, None)  # the launcher sets these per rank
    if params.device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            sys.stderr.write(line)
        code = proc.wait()
    if code != 0:
        raise LaunchError(f"ranks of {module} failed (exit code {code}); command: {' '.join(command)}; log: {log_path}")
