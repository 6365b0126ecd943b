"""The one frozen description of an EVA-01 ViT; every module is built from it, nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AttnImpl = Literal["eager", "sdpa"]
ATTN_IMPLS: tuple[str, ...] = ("eager", "sdpa")

# Output width of the MIM head when the teacher is OpenAI CLIP ViT-L/14 (its patch tokens
# after ``ln_post`` and ``@ proj``, as in EVA paper Sec. 2.2).
CLIP_L14_TARGET_DIM = 768
# EVA-01 modeling_pretrain.py: trunc-normal std of every pre-training weight, and LayerNorm eps.
PRETRAIN_INIT_STD = 0.015
LN_EPS = 1e-6
# EVA-01 pre-training (run_eva_pretraining.py): drop path linspace(0, 0.1, depth).
PRETRAIN_DROP_PATH_RATE = 0.1


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class EvaConfig:
    """Shape and numerics of one EVA ViT. Validated on creation so a bad config fails before any allocation.

    ``attn_impl``: ``"eager"`` is the official code's precision (q scaled, QK^T and softmax in fp32, probabilities
    cast back to the activation dtype); ``"sdpa"`` uses ``torch.nn.functional.scaled_dot_product_attention``, which
    is faster but computes the softmax in the input dtype (fp16/bf16 under mixed precision), so it is not
    bit-faithful there.
    """

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden_dim: int
    target_dim: int = CLIP_L14_TARGET_DIM
    in_chans: int = 3
    drop_path_rate: float = PRETRAIN_DROP_PATH_RATE
    init_std: float = PRETRAIN_INIT_STD
    ln_eps: float = LN_EPS
    attn_impl: AttnImpl = "eager"
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in (
            "img_size",
            "patch_size",
            "embed_dim",
            "depth",
            "num_heads",
            "mlp_hidden_dim",
            "target_dim",
            "in_chans",
        ):
            _positive_int(name, getattr(self, name))
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not self.init_std > 0.0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        if not self.ln_eps > 0.0:
            raise ValueError(f"ln_eps must be > 0, got {self.ln_eps}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")

    @property
    def grid_size(self) -> int:
        """Patches per side (16 for 224/14)."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per image, cls excluded (256 for 224/14)."""
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads
