"""DeepSpeed engine setup: the one place that knows DeepSpeed (the model code does not, Kedro does not).

A single CPU process is the same code path as a GPU cluster: world size 1 runs in-process with the gloo backend.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
from torch import nn

from eva_pipeline.config import FinetuneParams, PretrainParams
from eva_pipeline.training.precision import Precision

#: Runs over the engine: pre-training and the fine-tune stages (their optimiser blocks both carry ``clip_grad``).
TrainingParams = PretrainParams | FinetuneParams

_SINGLE_PROCESS_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}


def import_deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed for ``device`` without multi-minute JIT builds on CPU.

    On CPU DeepSpeed would compile its shared-memory all-reduce kernel with g++ at the first ``initialize`` (~80 s);
    gloo does the job for CPU runs, so the op is marked unavailable and DeepSpeed falls back to it.
    """
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if device.type == "cpu":
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    return deepspeed


def ensure_single_process_env() -> None:
    """torch.distributed rendezvous variables for an in-process world of one (the launcher sets them otherwise)."""
    for key, value in _SINGLE_PROCESS_ENV.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:  # a free port, so concurrent runs on one machine never collide
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])


def deepspeed_config(params: TrainingParams, world_size: int, device: torch.device | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``params`` on ``device`` (ZeRO stage, precision, clipping, batch split).

    ``params.precision`` is taken as the effective one (:func:`~eva_pipeline.training.precision.resolve_precision`
    first); bf16 is DeepSpeed's bf16 engine on a GPU and an fp32 engine with ``torch_autocast`` on a CPU (see
    :mod:`~eva_pipeline.training.precision`). ``device`` None: the one ``params.device`` names (auto: CUDA if any).
    """
    micro = params.batch_size // world_size
    cfg: dict[str, Any] = {
        "train_batch_size": params.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": params.deepspeed.zero_stage,
            "reduce_bucket_size": params.deepspeed.reduce_bucket_size,
        },
        # Our AdamW is torch's own (decoupled, param groups with lr_scale); DeepSpeed wraps it in ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if params.optimizer.clip_grad is not None:
        cfg["gradient_clipping"] = params.optimizer.clip_grad
    if params.precision == "fp16":
        ls = params.deepspeed.loss_scale
        cfg["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic
            "initial_scale_power": ls.initial_scale_power,
            "loss_scale_window": ls.loss_scale_window,
            "hysteresis": ls.hysteresis,
            "min_loss_scale": ls.min_loss_scale,
        }
    else:
        cfg.update(Precision(params.precision, _device_type(params.device, device)).deepspeed_section())
    return cfg


def _device_type(requested: str, device: torch.device | None) -> str:
    """``device``'s type, else what ``requested`` (a config's device) resolves to, without failing where it is
    absent (a dry run on a machine without the run's GPU still shows the run's config)."""
    if device is not None:
        return device.type
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def initialize_engine(
    model: nn.Module, optimizer: torch.optim.Optimizer, params: TrainingParams, device: torch.device
) -> Any:
    """Wrap model and optimiser in a DeepSpeed engine (ZeRO-1 by default)."""
    deepspeed = import_deepspeed(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        ensure_single_process_env()
    world_size = int(os.environ["WORLD_SIZE"])
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(params, world_size, device)
    )
    return engine
