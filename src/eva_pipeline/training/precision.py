"""Mixed precision per device: how a run asked for in fp32, fp16 or bf16 actually computes, decided once at setup.

* **fp32**: a DeepSpeed fp32 engine, no autocast.
* **fp16** (GPU only; DeepSpeed refuses it on CPU): DeepSpeed's fp16 engine, the paper's setting: the model in fp16,
  fp32 master weights in the optimiser, dynamic loss scale.
* **bf16 on a GPU**: DeepSpeed's bf16 engine (the model in bf16, fp32 master weights in the ZeRO optimiser), as
  measured on the H200 (``benchmarks/README.md``).
* **bf16 on a CPU**: a DeepSpeed fp32 engine with DeepSpeed's ``torch_autocast`` section, i.e.
  ``torch.autocast("cpu", dtype=torch.bfloat16)`` around every forward of the engine (training and validation),
  and the same autocast around the online teacher (:meth:`Precision.autocast`). The weights, their gradients, the
  optimiser state, the residual stream and the loss stay fp32; autocast's matmul-class ops (linear, conv, bmm,
  sdpa) run in bf16, and so do the elementwise ops on their outputs (e.g. the MLP's GELU).

  Why not DeepSpeed's bf16 engine on CPU: it does keep fp32 master weights in the ZeRO optimiser (checked:
  ``single_partition_of_fp32_groups`` is fp32) but holds the model itself in bf16: bf16 weights in the forward, a
  bf16 residual stream and bf16 gradients, where autocast keeps all three fp32. On this project's CPU it was also
  slower than autocast (demo student, batch 128, eager attention: 613 ms against 469 ms per step, one run in one
  process on a loaded machine; ``benchmarks/README.md``). DeepSpeed's ``torch_autocast`` and a hand-written
  ``torch.autocast`` around the engine gave bit-identical weights after 20 steps at world size 1; the DeepSpeed
  section is used so the engine's own forward carries it everywhere (both training loops, their validations, the
  benchmark), with ``lower_precision_safe_modules: []`` so that gradients are all-reduced in fp32 when several
  ranks train (DeepSpeed's default would reduce Linear/Conv gradients in bf16).

Native support is checked at run time (:func:`cpu_has_native_bf16`): a CPU without bf16 matrix instructions
emulates bf16 several times slower than fp32 (measured ~7x on an AVX2-only machine, ``environment.md``), so ``bf16``
there runs in fp32 with one log line, and its checkpoints are those of an fp32 run (the fingerprint holds the
effective precision).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

PrecisionName = Literal["fp32", "fp16", "bf16"]

#: CPU capability flags (``torch.cpu.get_capabilities()`` / ``/proc/cpuinfo`` names) of native bf16 matrix math:
#: x86 AVX512-BF16 dot products or AMX-BF16 tiles, Arm's BF16 extension (NEON or SVE).
NATIVE_BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")

_CPUINFO = Path("/proc/cpuinfo")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16, AMX-BF16 or Arm BF16).

    ``torch.cpu.get_capabilities()`` (cpuinfo, as torch's own kernels dispatch) where this torch has it, else the
    flags of ``/proc/cpuinfo``. ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not the question: it is true on
    any AVX-512 CPU, where oneDNN emulates bf16.
    """
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        caps = capabilities()
        return any(bool(caps.get(flag, False)) for flag in NATIVE_BF16_FLAGS)
    try:
        text = _CPUINFO.read_text()
    except OSError:
        return False
    flags = {f for line in text.splitlines() if line.startswith(("flags", "Features")) for f in line.split()[2:]}
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


@dataclass(frozen=True)
class Precision:
    """How a run computes: ``name`` is the effective precision (``bf16`` asked on a CPU without bf16 is ``fp32``)."""

    name: PrecisionName
    device_type: str

    @property
    def cpu_autocast(self) -> bool:
        """bf16 on CPU: an fp32 engine with autocast (the module docstring says why)."""
        return self.name == "bf16" and self.device_type == "cpu"

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype of the model input: the engine's weights' dtype (autocast takes fp32 inputs)."""
        if self.name == "fp16":
            return torch.float16
        if self.name == "bf16" and not self.cpu_autocast:
            return torch.bfloat16
        return torch.float32

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast the engine applies to its forwards, for the forwards it does not run (the online teacher)."""
        if self.cpu_autocast:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def deepspeed_section(self) -> dict[str, Any]:
        """The DeepSpeed config entries of this precision, fp16's loss scale aside (``engine.deepspeed_config``)."""
        if self.cpu_autocast:
            return {"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}
        if self.name == "bf16":
            return {"bf16": {"enabled": True}}
        return {}


def check_precision(precision: str, device: torch.device | str) -> None:
    """fp16 needs a GPU (DeepSpeed refuses it on CPU); say so before any work starts."""
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise ValueError(
            "precision 'fp16' needs a CUDA GPU (DeepSpeed: fp16 is not supported on CPU); use fp32 or bf16"
        )


def resolve_precision(precision: str, device: torch.device | str) -> Precision:
    """The effective precision of a run asking for ``precision`` on ``device``; raises before any work where it
    cannot run (fp16 on CPU), falls back to fp32 with one log line where it would only be slower (bf16 on a CPU
    without native bf16)."""
    check_precision(precision, device)
    device_type = torch.device(device).type
    if precision == "bf16" and device_type == "cpu" and not cpu_has_native_bf16():
        log.warning(
            "precision bf16: this CPU has no native bf16 matrix instructions (%s), where bf16 is slower than fp32; "
            "training in fp32",
            "/".join(NATIVE_BF16_FLAGS[:2]),
        )
        return Precision("fp32", device_type)
    return Precision(precision, device_type)  # type: ignore[arg-type]
