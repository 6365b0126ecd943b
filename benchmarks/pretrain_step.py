"""Pre-training step throughput: our DeepSpeed step vs a plain PyTorch loop written from the paper.

Three training steps are timed in one process, on the same batch, masks and precision:

``reference``
    What a user would write from the EVA paper: ``timm.models.eva.Eva`` student of our student's shapes plus a
    ``mask_token`` (replaces masked patch embeddings before cls/pos-embed, ``x*(1-w) + mask_token*w``) and a
    ``Linear`` lm_head applied to *all* tokens before the masked ones are selected; an open_clip teacher of our
    teacher's config run online every step (``visual`` with ``output_tokens=True``, ``@ proj``, ``torch.no_grad``);
    loss ``-cosine.mean()``; ``torch.optim.AdamW`` + ``clip_grad_norm_(3.0)``; autocast for bf16/fp16 (+ GradScaler
    for fp16).
``ours_online``
    ``eva_pipeline.training.step.train_step``, the very step ``run_pretraining`` runs (not a copy of it): ``EvaMIM``
    (lm_head on masked tokens only), ``mim_cosine_loss``, DeepSpeed engine (ZeRO-1) from ``initialize_engine`` over
    ``build_adamw(param_groups(..))``, targets from ``OpenClipTeacher.targets`` every step. Precision as the loop
    resolves it (``eva_pipeline.training.precision``): bf16 on CPU is an fp32 engine with DeepSpeed's
    ``torch_autocast`` and the teacher (fp32 weights) under the same autocast, as the reference; where the CPU has no
    native bf16 both steps run fp32.
``ours_cached``
    The same step and engine with targets looked up in a precomputed fp16 store (``cached_targets``), the mode of
    the embedded default configuration.

Weights are random (``pretrained=None``): timing does not depend on their values. Data loading, augmentation and
mask generation are not timed (identical for all three); the host->device copy of the batch is (the loop does it).

Model FLOPs (per image, analytic, matmuls counted as 2*m*n*k; norms, softmax, GELU, elementwise ops not counted):

    ViT forward(T tokens, N patches, D, depth L, MLP hidden H, patch p, C channels)
        = 2*N*(C*p*p)*D                                    # patch embedding
        + L * [ 2*T*D*3D + 2*T*D*D + 2*2*T*D*H              # qkv, attn proj, fc1 + fc2
                + 2*T*T*D + 2*T*T*D ]                       # Q K^T and attn @ V (all heads together)
    student forward = ViT(T = N + 1) + 2*M*D*D_target       # lm_head on the M masked tokens only
    student train   = 3 * student forward                   # backward = 2x forward
    teacher forward = ViT_teacher(T = N + 1) + 2*(N + 1)*W*D_out   # @ proj on cls + patch tokens
    online = student train + teacher forward;  cached = student train

The same (useful) FLOP count is used for every mode of a kind, so the reference's lm_head on unmasked tokens is
wasted work and not counted. MFU = images/s * FLOPs per image / peak FLOP/s.

Usage (CPU, small)::

    .venv/bin/python benchmarks/pretrain_step.py --device cpu --size small --batch 16 --steps 5 --rounds 3
    .venv/bin/python benchmarks/pretrain_step.py --device cpu --size demo --precision bf16 --variants eager sdpa
    .venv/bin/python benchmarks/pretrain_step.py --device cuda --size giant --precision bf16   # batch 32 / GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MODES: tuple[str, ...] = ("reference", "ours_online", "ours_cached")
RATIOS: tuple[tuple[str, str], ...] = (
    ("ours_online", "reference"),
    ("ours_cached", "reference"),
    ("ours_cached", "ours_online"),
)
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense peak TFLOP/s by GPU name fragment and precision (NVIDIA data sheets, SXM parts, no sparsity).
# fp32 is the non-tensor-core rate: torch leaves TF32 matmuls off by default.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}

# Optimiser: EVA-01 pre-training (EVA paper, Sec. 2.2; run_eva_pretraining.py).
LR, BETAS, EPS, WEIGHT_DECAY, CLIP_GRAD = 1e-3, (0.9, 0.98), 1e-6, 0.05, 3.0


# ------------------------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class TeacherShape:
    """An open_clip ViT image tower (``vision_cfg``) and its projection width (``embed_dim``)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    output_dim: int

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class BenchConfig:
    """Student, teacher and masking of one benchmark size."""

    name: str
    student: Any  # eva_pipeline.models.EvaConfig
    teacher: TeacherShape
    open_clip_name: str | None  # an existing open_clip config (giant), else a generated one is registered
    batch: int
    num_masking_patches: int
    min_num_patches: int


def size_config(size: str) -> BenchConfig:
    """``small``: CPU-friendly (112 px, 8x8 grid, 6 x 384 student, 4 x 256 teacher); ``giant``: EVA-g + ViT-L/14;
    ``demo``: the embedded demo's student and batch (``conf/base``: 28 px, 7x7 grid, 4 x 128, 20 of 49 patches
    masked, batch 128, 112-d targets) with a stand-in online teacher (the demo's EfficientNet targets are cached).

    The small teacher/student forward-FLOP ratio (~0.3) is the giant pair's (ViT-L/14 vs EVA-g), so the share of the
    step spent in the teacher is representative.
    """
    from eva_pipeline.models import get_config

    if size == "demo":
        student = get_config("eva_tiny_patch4_28", target_dim=112, drop_path_rate=0.0)
        teacher = TeacherShape(image_size=28, patch_size=4, width=128, layers=2, heads=4, mlp_ratio=4.0, output_dim=112)
        return BenchConfig("demo", student, teacher, None, batch=128, num_masking_patches=20, min_num_patches=4)
    if size == "small":
        student = get_config("eva_small_patch14_224", img_size=112, depth=4)
        teacher = TeacherShape(
            image_size=112, patch_size=14, width=256, layers=3, heads=4, mlp_ratio=4.0, output_dim=768
        )
        return BenchConfig("small", student, teacher, None, batch=16, num_masking_patches=26, min_num_patches=4)
    if size == "giant":
        student = get_config("eva_giant_patch14_224")
        teacher = TeacherShape(
            image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_ratio=4.0, output_dim=768
        )
        return BenchConfig("giant", student, teacher, "ViT-L-14", batch=32, num_masking_patches=105, min_num_patches=16)
    raise ValueError(f"unknown size {size!r}; choose small, giant or demo")


def open_clip_config(teacher: TeacherShape) -> dict:
    """An open_clip model config (json dict) for ``teacher``; the text tower is minimal (it is never run)."""
    return {
        "embed_dim": teacher.output_dim,
        "vision_cfg": {
            "image_size": teacher.image_size,
            "layers": teacher.layers,
            "width": teacher.width,
            "head_width": teacher.width // teacher.heads,
            "mlp_ratio": teacher.mlp_ratio,
            "patch_size": teacher.patch_size,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 64, "heads": 1, "layers": 1},
    }


def register_teacher(teacher: TeacherShape) -> str:
    """Register ``teacher`` with open_clip (``add_model_config`` on a json in a temp dir); returns the model name.

    open_clip keeps loaded configs in memory, so the temporary folder is removed right away.
    """
    import open_clip

    cfg = open_clip_config(teacher)
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    name = f"evabench-vit-{digest}"
    if open_clip.get_model_config(name) is None:
        with tempfile.TemporaryDirectory(prefix="evabench-openclip-") as tmp:
            path = Path(tmp) / f"{name}.json"
            path.write_text(json.dumps(cfg))
            open_clip.add_model_config(path)
    return name


# ------------------------------------------------------------------------------------------------------- FLOPs
def vit_forward_flops(
    num_tokens: int, num_patches: int, dim: int, depth: int, mlp_hidden: int, patch_size: int, in_chans: int = 3
) -> int:
    """Matmul FLOPs of one ViT forward on one image (see the module docstring for the formula)."""
    t, d = num_tokens, dim
    patch = 2 * num_patches * (in_chans * patch_size * patch_size) * d
    block = 2 * t * d * 3 * d + 2 * t * d * d + 2 * 2 * t * d * mlp_hidden + 2 * 2 * t * t * d
    return patch + depth * block


def flops_per_image(cfg: BenchConfig, masked_tokens: float) -> dict[str, float]:
    """Student forward / train, teacher forward and per-mode totals for ``masked_tokens`` masked patches per image."""
    s, t = cfg.student, cfg.teacher
    n = s.num_patches
    student_fwd = vit_forward_flops(n + 1, n, s.embed_dim, s.depth, s.mlp_hidden_dim, s.patch_size, s.in_chans)
    student_fwd += 2 * masked_tokens * s.embed_dim * s.target_dim
    tn = t.grid**2
    teacher_fwd = vit_forward_flops(tn + 1, tn, t.width, t.layers, t.mlp_hidden, t.patch_size)
    teacher_fwd += 2 * (tn + 1) * t.width * t.output_dim
    student_train = 3 * student_fwd
    return {
        "student_forward": float(student_fwd),
        "student_train": float(student_train),
        "teacher_forward": float(teacher_fwd),
        "online": float(student_train + teacher_fwd),
        "cached": float(student_train),
    }


def mode_flops(flops: dict[str, float], mode: str) -> float:
    return flops["cached"] if mode == "ours_cached" else flops["online"]


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    """``override``, else the table entry for this CUDA GPU, else None (CPU: no default peak)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision]
    return None


def measure_matmul_tflops(device: torch.device, precision: str, n: int = 1024, seconds: float = 1.0) -> float:
    """Achieved TFLOP/s of back-to-back (n x n) @ (n x n) matmuls in ``precision``: this machine's practical peak,
    the denominator of MFU where no data-sheet figure applies (CPU)."""
    dtype = PRECISIONS[precision]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    _sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


# ------------------------------------------------------------------------------------------------------- inputs
def make_batch(cfg: BenchConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-normalised-like float32 CPU images (B, 3, H, W) and EVA block masks (B, N) from fixed seeds."""
    from eva_pipeline.masking import BlockMaskGenerator

    s = cfg.student
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(cfg.batch, s.in_chans, s.img_size, s.img_size, generator=gen)
    masker = BlockMaskGenerator(
        grid=(s.grid_size, s.grid_size),
        num_masking_patches=cfg.num_masking_patches,
        min_num_patches=cfg.min_num_patches,
    )
    rng = np.random.default_rng(seed)
    masks = torch.from_numpy(np.stack([masker(rng).reshape(-1) for _ in range(cfg.batch)]))
    return images, masks.bool()


# train_step marks its own forward/backward/optimizer ranges with this prefix
# (eva_pipeline.training.step.STEP_PHASE_PREFIX); the reference step and the targets use it too.
PHASE_PREFIX = "step::"


def _phase(name: str) -> contextlib.AbstractContextManager:
    """A profiler range (``step::<name>``) around one phase of a step; costs nothing when not profiling."""
    return torch.profiler.record_function(PHASE_PREFIX + name)


# ------------------------------------------------------------------------------------------------- reference step
class ReferenceMIM(nn.Module):
    """timm ``Eva`` + mask token + lm_head, written the straightforward way (head on all tokens, then select)."""

    def __init__(self, student: Any, grad_checkpointing: bool = False) -> None:
        super().__init__()
        from timm.models.eva import Eva

        self.eva = Eva(
            img_size=student.img_size,
            patch_size=student.patch_size,
            in_chans=student.in_chans,
            num_classes=0,
            global_pool="token",  # keeps the final LayerNorm as ``eva.norm``
            embed_dim=student.embed_dim,
            depth=student.depth,
            num_heads=student.num_heads,
            mlp_ratio=student.mlp_hidden_dim / student.embed_dim,
            qkv_bias=True,
            drop_path_rate=student.drop_path_rate,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, student.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.lm_head = nn.Linear(student.embed_dim, student.target_dim)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.eva.patch_embed(images)
        w = mask.unsqueeze(-1).type_as(self.mask_token)
        x = x * (1 - w) + self.mask_token * w
        x, rope = self.eva._pos_embed(x)
        for blk in self.eva.blocks:
            x = checkpoint(blk, x, rope, use_reentrant=False) if self.grad_checkpointing else blk(x, rope=rope)
        x = self.eva.norm(x)
        return self.lm_head(x[:, 1:])[mask]


class ReferenceStep:
    """Plain PyTorch: online open_clip teacher, AdamW, clip_grad_norm_, autocast (+GradScaler for fp16)."""

    def __init__(
        self,
        cfg: BenchConfig,
        teacher_name: str,
        device: torch.device,
        precision: str,
        grad_checkpointing: bool = False,
        compile_student: bool = False,
    ) -> None:
        import open_clip

        self.device, self.dtype = device, PRECISIONS[precision]
        self.amp = precision != "fp32"
        self.model = ReferenceMIM(cfg.student, grad_checkpointing).to(device).train()
        if compile_student:
            self.model.compile()
        clip = open_clip.create_model(teacher_name, pretrained=None, device=device)
        self.teacher = clip.visual.eval().requires_grad_(False)
        self.teacher.output_tokens = True
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY
        )
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def teacher_targets(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.amp), torch.no_grad():
            _, tokens = self.teacher(images)
            return tokens @ self.teacher.proj

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> float:
        x = images.to(self.device, non_blocking=True)
        mask = masks.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.amp):
            with torch.no_grad(), _phase("teacher"):
                _, tokens = self.teacher(x)
                target = (tokens @ self.teacher.proj)[mask]
            with _phase("forward"):
                pred = self.model(x, mask)
        with _phase("forward"):
            loss = -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            with _phase("backward"):
                self.scaler.scale(loss).backward()
            with _phase("optimizer"):
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_GRAD)
                self.scaler.step(self.optimizer)
                self.scaler.update()
        else:
            with _phase("backward"):
                loss.backward()
            with _phase("optimizer"):
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_GRAD)
                self.optimizer.step()
        return loss.item()


# ------------------------------------------------------------------------------------------------------ our step
def pretrain_params(cfg: BenchConfig, device: torch.device, precision: str, zero_stage: int = 1) -> Any:
    """A PretrainParams for the engine (only precision, batch, ZeRO and clipping matter to ``deepspeed_config``)."""
    from eva_pipeline.config import PretrainParams

    return PretrainParams.model_validate(
        {
            "model": {"name": "eva_small_patch14_224"},
            "masking": {"num_masking_patches": cfg.num_masking_patches, "min_num_patches": cfg.min_num_patches},
            "optimizer": {
                "lr": LR,
                "min_lr": 1e-5,
                "warmup_epochs": 0,
                "weight_decay": WEIGHT_DECAY,
                "betas": BETAS,
                "eps": EPS,
                "clip_grad": CLIP_GRAD,
            },
            "epochs": 1,
            "batch_size": cfg.batch,
            "precision": precision,
            "device": device.type,
            "deepspeed": {"zero_stage": zero_stage},
        }
    )


class OursStep:
    """``eva_pipeline.training.step.train_step`` (the step ``run_pretraining`` runs) over one engine, after the
    loop's host->device copy; ``target_fns[targets](index, images)`` selects online or cached targets."""

    def __init__(
        self,
        cfg: BenchConfig,
        teacher_name: str,
        device: torch.device,
        precision: str,
        attn: str = "eager",
        grad_checkpointing: bool = False,
        compile_student: bool = False,
        zero_stage: int = 1,
    ) -> None:
        from eva_pipeline.models import EvaMIM
        from eva_pipeline.teachers import OpenClipTeacher
        from eva_pipeline.training.engine import initialize_engine
        from eva_pipeline.training.optim import AdamWConfig, build_adamw, param_groups
        from eva_pipeline.training.precision import resolve_precision
        from eva_pipeline.training.step import cached_targets

        self.device, self.precision = device, resolve_precision(precision, device)
        precision = self.precision.name
        student = dataclasses.replace(cfg.student, attn_impl=attn, grad_checkpointing=grad_checkpointing)
        model = EvaMIM(student)
        params = pretrain_params(cfg, device, precision, zero_stage)
        optimizer = build_adamw(
            param_groups(model, WEIGHT_DECAY), AdamWConfig(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
        )
        if compile_student:
            model.compile()  # in place: parameter names (and so the groups above) are unchanged
        self.engine = initialize_engine(model, optimizer, params, device)
        self.engine.train()
        # bf16 on CPU: fp32 weights under the loop's autocast (step_inputs), as the reference's teacher
        teacher_precision = "fp32" if self.precision.cpu_autocast else precision
        self.teacher = OpenClipTeacher(teacher_name, pretrained=None, device=str(device), precision=teacher_precision)
        self.grid = (student.grid_size, student.grid_size)
        store = torch.randn(cfg.batch, student.num_patches, student.target_dim).to(torch.float16)  # target store
        self.target_fns: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
            "online": lambda index, x: self._online(x),
            "cached": cached_targets(store),
        }
        self.index = torch.arange(cfg.batch)
        self.step = 0  # train_step seeds drop path from (seed, rank, step), as the loop does

    def _online(self, images: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast():  # as step_inputs runs the online teacher
            return self.teacher.targets(images, self.grid)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, targets: str) -> float:
        from eva_pipeline.training.step import train_step

        device = self.device
        mask = masks.to(device, non_blocking=True)
        with _phase("teacher" if targets == "online" else "targets"):
            target = self.target_fns[targets](self.index, images).to(device, non_blocking=True)[mask]
        x = images.to(device, self.precision.input_dtype, non_blocking=True)
        record = train_step(self.engine, x, mask, target, LR, num_masked=int(masks.sum()), step=self.step, seed=0)
        self.step += 1
        return record["loss"]


# ------------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step`` (synchronised before and after)."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - start


@dataclass
class Bench:
    """The built steps, bound to one batch: ``steps[mode]()`` runs one training step of that mode."""

    cfg: BenchConfig
    device: torch.device
    precision: str
    reference: ReferenceStep
    ours: OursStep
    images: torch.Tensor
    masks: torch.Tensor
    compiled: bool = False

    @property
    def steps(self) -> dict[str, Callable[[], float]]:
        return {
            "reference": lambda: self.reference(self.images, self.masks),
            "ours_online": lambda: self.ours(self.images, self.masks, "online"),
            "ours_cached": lambda: self.ours(self.images, self.masks, "cached"),
        }


def build_bench(
    cfg: BenchConfig,
    device: torch.device,
    precision: str = "fp32",
    attn: str = "eager",
    grad_checkpointing: bool = False,
    compile_student: bool = False,
    seed: int = 0,
    zero_stage: int = 1,
) -> Bench:
    from eva_pipeline.training.engine import ensure_single_process_env, import_deepspeed
    from eva_pipeline.training.precision import resolve_precision

    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import_deepspeed(device)
    ensure_single_process_env()
    precision = resolve_precision(precision, device).name  # both steps at what training would run (bf16 -> fp32
    # on a CPU without native bf16, with the loop's log line)
    teacher_name = cfg.open_clip_name or register_teacher(cfg.teacher)
    torch.manual_seed(seed)
    reference = ReferenceStep(cfg, teacher_name, device, precision, grad_checkpointing, compile_student)
    ours = OursStep(cfg, teacher_name, device, precision, attn, grad_checkpointing, compile_student, zero_stage)
    images, masks = make_batch(cfg, seed)
    return Bench(cfg, device, precision, reference, ours, images, masks, compiled=compile_student)


def run_benchmark(
    bench: Bench, steps: int = 5, rounds: int = 3, warmup: int = 2, peak: float | None = None, breakdown: bool = False
) -> dict[str, Any]:
    """Warm up every mode, then ``rounds`` interleaved rounds of ``steps`` timed steps; median images/s per mode."""
    return run_benchmarks([bench], steps, rounds, warmup, [peak], breakdown)[0]


def run_benchmarks(
    benches: list[Bench],
    steps: int = 5,
    rounds: int = 3,
    warmup: int = 2,
    peaks: list[float | None] | None = None,
    breakdown: bool = False,
) -> list[dict[str, Any]]:
    """:func:`run_benchmark` of several builds (e.g. one per precision) with their rounds interleaved: every round
    times every mode of every build, in an order that alternates, so a load spike on a shared machine hits all of
    them alike and their ratios hold."""
    if steps < 1 or rounds < 1 or warmup < 0:
        raise ValueError("steps and rounds must be >= 1, warmup >= 0")
    cuda = benches[0].device.type == "cuda"
    for bench in benches:
        for mode in MODES:
            for _ in range(warmup):
                bench.steps[mode]()
    resident = torch.cuda.memory_allocated(benches[0].device) / 2**30 if cuda else None
    per_round: list[dict[str, list[float]]] = [{m: [] for m in MODES} for _ in benches]
    peak_gib: list[dict[str, float]] = [dict.fromkeys(MODES, 0.0) for _ in benches]
    slots = [(i, mode) for i in range(len(benches)) for mode in MODES]
    for r in range(rounds):
        for i, mode in slots if r % 2 == 0 else slots[::-1]:  # alternate the order: no mode always runs first
            bench = benches[i]
            if cuda:
                torch.cuda.reset_peak_memory_stats(bench.device)
            seconds = time_steps(bench.steps[mode], steps, bench.device)
            per_round[i][mode].append(bench.cfg.batch * steps / seconds)
            if cuda:
                peak_gib[i][mode] = max(peak_gib[i][mode], torch.cuda.max_memory_allocated(bench.device) / 2**30)
    peaks = peaks or [None] * len(benches)
    return [
        _result(bench, per_round[i], steps, rounds, warmup, peaks[i], resident, peak_gib[i], breakdown)
        for i, bench in enumerate(benches)
    ]


def _result(
    bench: Bench,
    per_round: dict[str, list[float]],
    steps: int,
    rounds: int,
    warmup: int,
    peak: float | None,
    resident: float | None,
    peak_gib: dict[str, float],
    breakdown: bool,
) -> dict[str, Any]:
    """One build's result from its timed rounds (medians, ratios, FLOPs, MFU, memory)."""
    cuda = bench.device.type == "cuda"
    throughput = {m: statistics.median(v) for m, v in per_round.items()}
    ratios = {f"{a}/{b}": throughput[a] / throughput[b] for a, b in RATIOS}
    masked = float(bench.masks.sum()) / bench.masks.shape[0]
    flops = flops_per_image(bench.cfg, masked)
    achieved = {m: throughput[m] * mode_flops(flops, m) / 1e12 for m in MODES}
    result: dict[str, Any] = {
        "size": bench.cfg.name,
        "device": str(bench.device),
        "device_name": torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "precision": bench.precision,
        "batch": bench.cfg.batch,
        "steps": steps,
        "rounds": rounds,
        "warmup": warmup,
        "attn": current_attn(bench),
        "zero_stage": bench.ours.engine.zero_optimization_stage(),
        "grad_checkpointing": bench.ours.engine.module.grad_checkpointing,
        "compiled": bench.compiled,
        "student": dataclasses.asdict(bench.ours.engine.module.config),  # as built (variants change attn/ckpt after)
        "teacher": dataclasses.asdict(bench.cfg.teacher),
        "masked_tokens_per_image": masked,
        "weights": "random (timing does not depend on weight values)",
        "images_per_second": throughput,
        "images_per_second_rounds": per_round,
        "ratios": ratios,
        "flops_per_image": flops,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": {m: achieved[m] / peak for m in MODES} if peak else None,
        # No step doing the reference's useful FLOPs can beat it by more than peak / its achieved rate.
        "equal_work_bound": peak / achieved["reference"] if peak else None,
    }
    if cuda:
        # Both steps live in one process: "resident" is both students, their optimiser states and the teacher; a
        # mode's peak adds that mode's activations (and the other step's idle state) on top.
        result["memory_gib"] = {
            "resident": resident,
            "peak": peak_gib,
            "device_total": torch.cuda.get_device_properties(bench.device).total_memory / 2**30,
        }
    if breakdown:
        result["breakdown_ms"] = time_breakdown(bench, max(5, steps))
    return result


# ----------------------------------------------------------------------------------------------------- variants
def current_attn(bench: Bench) -> str:
    from eva_pipeline.models.eva import EvaAttention

    impls = {m.attn_impl for m in bench.ours.engine.module.modules() if isinstance(m, EvaAttention)}
    return impls.pop() if len(impls) == 1 else "mixed"


def parse_variant(text: str) -> tuple[str, bool, bool]:
    """``sdpa``, ``eager+ckpt``, ``sdpa+compile`` ... -> (attn, grad checkpointing, compile)."""
    attn, *flags = text.split("+")
    if attn not in ("eager", "sdpa") or not set(flags) <= {"ckpt", "compile"}:
        raise ValueError(f"variant {text!r}: expected eager|sdpa followed by +ckpt and/or +compile")
    return attn, "ckpt" in flags, "compile" in flags


def parse_build(text: str) -> tuple[str, tuple[str, bool, bool] | None]:
    """``bf16`` -> ("bf16", None); ``bf16:eager`` -> ("bf16", ("eager", False, False)): a precision and, optionally,
    the variant its build keeps whatever ``--variants`` says."""
    precision, _, variant = text.partition(":")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {text!r}: expected one of {sorted(PRECISIONS)}, optionally :VARIANT")
    return precision, parse_variant(variant) if variant else None


def set_variant(bench: Bench, attn: str, grad_checkpointing: bool, compile_students: bool) -> None:
    """Switch the built steps in place (no rebuild of a 1B-parameter model per variant).

    ``attn`` changes our attention only: the reference keeps timm's own choice (fused sdpa), what a user gets.
    Gradient checkpointing applies to both students; compilation is irreversible, so it must come last.
    """
    from eva_pipeline.models.eva import EvaAttention

    if bench.compiled and not compile_students:
        raise ValueError("a compiled bench cannot be uncompiled: put +compile variants last")
    for module in bench.ours.engine.module.modules():
        if isinstance(module, EvaAttention):
            module.attn_impl = attn
    bench.ours.engine.module.set_grad_checkpointing(grad_checkpointing)
    bench.reference.model.grad_checkpointing = grad_checkpointing
    if compile_students and not bench.compiled:
        bench.ours.engine.module.compile()
        bench.reference.model.compile()
        bench.compiled = True


def time_breakdown(bench: Bench, reps: int = 5) -> dict[str, float]:
    """Milliseconds per batch of the teacher forward alone, reference vs ours (interleaved, median of ``reps``)."""
    device, x = bench.device, bench.images
    grid = bench.ours.grid
    fns = {
        "reference_teacher": lambda: bench.reference.teacher_targets(x.to(device)),
        "ours_teacher": lambda: bench.ours.teacher.targets(x, grid),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for key, fn in fns.items():
            times[key].append(1e3 * time_steps(fn, 1, device))
    return {k: statistics.median(v) for k, v in times.items()}


# ------------------------------------------------------------------------------------------------------- output
def format_table(result: dict[str, Any]) -> str:
    ips, ach, mfu = result["images_per_second"], result["achieved_tflops"], result["mfu"]
    flops = result["flops_per_image"]
    lines = [
        f"size={result['size']} device={result['device_name']} precision={result['precision']} "
        f"batch={result['batch']} attn(ours)={result['attn']} grad_ckpt={result['grad_checkpointing']} "
        f"compiled={result['compiled']} threads={result['torch_threads']}",
        f"timed: {result['rounds']} rounds x {result['steps']} steps per mode (median of rounds), "
        f"{result['warmup']} warm-up steps; weights: {result['weights']}",
        f"model GFLOPs/image: student fwd {flops['student_forward'] / 1e9:.3f}, student train "
        f"{flops['student_train'] / 1e9:.3f}, teacher fwd {flops['teacher_forward'] / 1e9:.3f} "
        f"(masked tokens/image {result['masked_tokens_per_image']:.2f})",
        "",
        f"| {'mode':<12} | {'images/s':>9} | {'rounds (images/s)':<26} | {'TFLOP/s':>8} | {'MFU':>6} |",
        f"|{'-' * 14}|{'-' * 11}|{'-' * 28}|{'-' * 10}|{'-' * 8}|",
    ]
    for m in MODES:
        rounds = ", ".join(f"{v:.2f}" for v in result["images_per_second_rounds"][m])
        mfu_s = f"{100 * mfu[m]:.1f}%" if mfu else "n/a"
        lines.append(f"| {m:<12} | {ips[m]:>9.2f} | {rounds:<26} | {ach[m]:>8.4f} | {mfu_s:>6} |")
    lines.append("")
    for key, value in result["ratios"].items():
        lines.append(f"{key:<26} {value:.3f}x")
    if result.get("breakdown_ms"):
        b = result["breakdown_ms"]
        lines.append(
            f"teacher forward alone (ms/batch): reference {b['reference_teacher']:.1f}, ours {b['ours_teacher']:.1f}"
        )
    if result.get("memory_gib"):
        mem = result["memory_gib"]
        lines.append(
            f"memory (GiB): resident {mem['resident']:.1f} of {mem['device_total']:.1f}; peak per mode "
            + ", ".join(f"{m} {v:.1f}" for m, v in mem["peak"].items())
        )
    if result["peak_tflops"]:
        source = result.get("peak_source", "given")
        lines.append(f"peak: {result['peak_tflops']:.4f} TFLOP/s ({source})")
        lines.append(
            f"equal-work bound: a step with the reference's FLOPs at 100% of that peak would be "
            f"{result['equal_work_bound']:.2f}x the reference"
        )
    return "\n".join(lines)


def format_precision_ratios(results: list[dict[str, Any]]) -> str:
    """Images/s of every mode at each precision over the first precision's, measured in the same rounds."""
    names = [f"{r['precision']}:{r['attn']}" for r in results]  # attn: ours (the reference keeps timm's sdpa)
    lines = [
        f"images/s vs {names[0]} (same run, interleaved rounds; precision:attention of ours):",
        f"| {'mode':<12} | " + " | ".join(f"{n:>11}" for n in names) + " |",
    ]
    for m in MODES:
        lines.append(f"| {m:<12} | " + " | ".join(f"{r['vs_first_precision'][m]:>10.2f}x" for r in results) + " |")
    return "\n".join(lines)


def profile_modes(bench: Bench, rows: int = 12) -> str:
    """torch.profiler of one step per mode: time per phase (teacher/forward/backward/optimizer) and top ops."""
    from torch.profiler import ProfilerActivity, profile

    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    out = []
    for mode, fn in bench.steps.items():
        fn()
        with profile(activities=activities) as prof:
            fn()
            _sync(bench.device)
        events = prof.key_averages()
        phases = ", ".join(
            f"{e.key[len(PHASE_PREFIX) :]} {e.cpu_time_total / 1e3:.0f} ms"
            + (f" (device {e.device_time_total / 1e3:.0f} ms)" if cuda else "")
            for e in events
            if e.key.startswith(PHASE_PREFIX)
        )
        out.append(f"== {mode}: {phases}\n" + events.table(sort_by=key, row_limit=rows))
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", choices=["small", "giant", "demo"], default="small")
    p.add_argument(
        "--precision",
        nargs="+",
        default=None,
        metavar="PRECISION[:VARIANT]",
        help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA); several (e.g. fp32 bf16): one build each, "
        "rounds interleaved, each mode's images/s as a ratio to the first build's; ':VARIANT' fixes a build's "
        "variant (e.g. fp32:sdpa bf16:eager), else it follows --variants/--attn",
    )
    p.add_argument("--batch", type=int, default=None, help="default: 16 (small), 32 (giant), 128 (demo)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    p.add_argument("--attn", choices=["eager", "sdpa"], default="eager", help="our EvaConfig.attn_impl")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks (both students)")
    p.add_argument("--compile", action="store_true", help="torch.compile both students")
    p.add_argument("--zero-stage", type=int, choices=[0, 1], default=1, help="our engine's ZeRO stage (recipe: 1)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s for MFU (default: table for H100/H200/A100; on CPU a measured GEMM peak)",
    )
    p.add_argument("--breakdown", action="store_true", help="also time the teacher forward alone")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per mode")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="VARIANT",
        help="time several variants on one build, e.g. sdpa eager sdpa+ckpt sdpa+compile (compile last); "
        "overrides --attn/--grad-checkpointing/--compile",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the results here (a list, one entry per variant, rewritten after each)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible to torch")
    builds = [parse_build(b) for b in args.precision or ["bf16" if device.type == "cuda" else "fp32"]]
    cfg = size_config(args.size)
    if args.batch:
        cfg = dataclasses.replace(cfg, batch=args.batch)
    variants = (
        [parse_variant(v) for v in args.variants]
        if args.variants
        else [(args.attn, args.grad_checkpointing, args.compile)]
    )
    compiles = [c for _, _, c in variants]
    if compiles != sorted(compiles):
        raise SystemExit("--variants: +compile variants must come last (compilation cannot be undone)")
    benches = [build_bench(cfg, device, p, *(fixed or variants[0]), zero_stage=args.zero_stage) for p, fixed in builds]
    peaks, sources = [], []
    for bench in benches:  # bench.precision: the effective one (bf16 -> fp32 on a CPU without bf16)
        peak = peak_tflops(device, bench.precision, args.peak_tflops)
        sources.append("given" if args.peak_tflops else "data sheet")
        if peak is None:
            peak, sources[-1] = measure_matmul_tflops(device, bench.precision), f"measured: 1024^3 {bench.precision}"
        peaks.append(peak)
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    results: list[dict[str, Any]] = []
    many = bool(args.variants) or len(benches) > 1
    for attn, ckpt, compiled in variants:
        for bench, (_, fixed) in zip(benches, builds, strict=True):
            set_variant(bench, *(fixed or (attn, ckpt, compiled)))
        batch = run_benchmarks(benches, args.steps, args.rounds, args.warmup, peaks, args.breakdown)
        for result, source in zip(batch, sources, strict=True):
            result["peak_source"] = source
            result["command"] = command
            result["vs_first_precision"] = {
                m: result["images_per_second"][m] / batch[0]["images_per_second"][m] for m in MODES
            }
            print(format_table(result), "\n", flush=True)
        if len(benches) > 1:
            print(format_precision_ratios(batch), "\n", flush=True)
        results.extend(batch)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results if many else results[0], indent=2, default=str))
    if args.profile:
        for bench in benches:
            print(f"## precision {bench.precision}\n{profile_modes(bench)}", flush=True)
    return results if many else results[0]


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
