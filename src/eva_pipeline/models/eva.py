"""EVA-01 vanilla ViT (EVA paper, Sec. 2.2; official code: EVA-01 ``modeling_pretrain.py`` for pre-training,
``run_class_finetuning.py`` for fine-tuning) with the official EVA-01 state-dict key names.

Module names are chosen so that ``state_dict()`` keys are exactly the released EVA-01 checkpoints' keys; timm
building blocks are used wherever their parameter names agree (``PatchEmbed``, ``Mlp``, ``LayerNormFp32``,
``DropPath``, ``trunc_normal_``).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNormFp32, Mlp, PatchEmbed, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from eva_pipeline.models.config import EvaConfig

# EVA-01 fine-tuning (run_class_finetuning.py): head init = trunc-normal std 0.02 (timm's default absolute
# bounds +-2, as BEiT/EVA fine-tune code), then weight and bias scaled by 0.001.
HEAD_INIT_STD = 0.02
HEAD_INIT_SCALE = 1e-3

# Parameters that live before the first block (layer id 0 for layer-wise LR decay).
_EMBED_PARAMS = ("patch_embed.", "cls_token", "pos_embed", "mask_token")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def trunc_normal_sigma_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """EVA-01 pre-training init: normal(0, std) truncated at +-1 sigma (a=-std, b=std), empirical std ~0.54 std."""
    return trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


class EvaAttention(nn.Module):
    """Multi-head self-attention with EVA's bias layout: fused ``qkv`` without bias, learnable q/v biases, k bias 0.

    The zero k bias is built on the fly (not a parameter nor a buffer) so the state dict stays the official one.
    """

    def __init__(self, dim: int, num_heads: int, attn_impl: str = "eager") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_impl == "sdpa":
            # Softmax in the input dtype: fast, but not the official code's fp32 QK^T/softmax under fp16/bf16.
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            q = q * self.scale
            # fp32 logits and softmax as the official code; autocast would otherwise re-cast the matmul to fp16.
            with torch.autocast(device_type=x.device.type, enabled=False):
                attn = (q.float() @ k.float().transpose(-2, -1)).softmax(dim=-1)
            x = attn.to(v.dtype) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class EvaBlock(nn.Module):
    """Pre-norm transformer block; no layer scale, no relative position bias (EVA-01 pre-training)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_hidden_dim: int, drop_path: float, ln_eps: float, attn_impl: str
    ) -> None:
        super().__init__()
        self.norm1 = LayerNormFp32(dim, eps=ln_eps)
        self.attn = EvaAttention(dim, num_heads, attn_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNormFp32(dim, eps=ln_eps)
        self.mlp = Mlp(dim, mlp_hidden_dim, act_layer=nn.GELU)  # nn.GELU default = exact erf GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class EvaViT(nn.Module):
    """The EVA encoder: patch embedding, cls token, absolute pos_embed and ``depth`` blocks, no final norm.

    Subclasses add their heads and then call :meth:`init_weights`, so EVA's pre-training init covers their modules
    too.
    """

    def __init__(self, config: EvaConfig, *, initialise: bool = True) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(
            img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans, embed_dim=dim
        )
        self.num_patches = config.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))
        rates = torch.linspace(0.0, config.drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            EvaBlock(dim, config.num_heads, config.mlp_hidden_dim, rate, config.ln_eps, config.attn_impl)
            for rate in rates
        )
        self.grad_checkpointing = config.grad_checkpointing
        self.detach_patch_embed = False
        if initialise:
            self.init_weights()

    # ---- initialisation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """EVA-01's pre-training init (``modeling_pretrain.py``); a no-op on the meta device (nothing to fill), call
        again after ``to_empty``."""
        if self.cls_token.is_meta:
            return
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                trunc_normal_sigma_(module.weight, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, EvaAttention):
                nn.init.zeros_(module.q_bias)
                nn.init.zeros_(module.v_bias)
        for name in ("cls_token", "pos_embed", "mask_token"):
            token = getattr(self, name, None)
            if token is not None:
                trunc_normal_sigma_(token, std)
        for i, block in enumerate(self.blocks, start=1):
            scale = math.sqrt(2.0 * i)
            block.attn.proj.weight.div_(scale)
            block.mlp.fc2.weight.div_(scale)
        self._init_head()

    def _init_head(self) -> None:
        """Hook for subclasses whose head is not initialised like the encoder."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (training only) to trade compute for memory."""
        self.grad_checkpointing = enable

    # ---- timm optimiser interface (timm/models/eva.py: ``no_weight_decay``, ``group_matcher``) ---------------------
    def no_weight_decay(self) -> set[str]:
        """Non-1-D parameters never decayed (EVA-01 ``modeling_finetune.py``); mask_token is absent: EVA decays it."""
        return {"pos_embed", "cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Layer groups for ``timm.optim.param_groups_layer_decay``, giving EVA-01's layer ids (``get_layer_id``).

        Embeddings form group 0, ``blocks.i`` group i + 1, and every unmatched parameter (final norm, fc_norm, head,
        lm_head) timm's last group, depth + 1. Unlike timm's ``Eva``, the final ``norm`` is not folded into the last
        block: EVA-01's ``optim_factory.py`` gives it depth + 1. Each block is one group already, so ``coarse`` changes
        nothing.
        """
        del coarse
        return {"stem": r"^(?:cls_token|mask_token|pos_embed|patch_embed\.)", "blocks": r"^blocks\.(\d+)\."}

    # ---- forward pieces -------------------------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_chans, cfg.img_size, cfg.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (batch, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(images.shape)}"
            )

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, N, D) patch tokens, before cls and pos_embed."""
        self._check_images(images)
        x = self.patch_embed(images)
        return x.detach() if self.detach_patch_embed else x

    def _add_cls_and_pos(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1) + self.pos_embed

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        return x

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Block output for all tokens, (B, 1 + N, D), cls first, no final norm."""
        return self._run_blocks(self._add_cls_and_pos(self.patchify(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)


class EvaMIM(EvaViT):
    """Pre-training model (EVA-01 ``modeling_pretrain.py``): mask_token before cls/pos, final LayerNorm, ``lm_head``
    on masked tokens."""

    def __init__(self, config: EvaConfig, *, initialise: bool = True) -> None:
        super().__init__(config, initialise=False)
        dim = config.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm = LayerNormFp32(dim, eps=config.ln_eps)
        self.lm_head = nn.Linear(dim, config.target_dim)
        if initialise:
            self.init_weights()

    def _check_mask(self, mask: torch.Tensor, batch: int) -> None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a torch.bool tensor, got {got}")
        expected = (batch, self.num_patches)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask must have shape (batch, num_patches) = {expected}, got {tuple(mask.shape)}")

    def _encode(self, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.patchify(images)
        if mask is not None:
            self._check_mask(mask, x.shape[0])
            # Equals the official x*(1-w) + mask_token*w for finite x, in one op; dtype promotion is the same.
            x = torch.where(mask.unsqueeze(-1), self.mask_token, x)
        return self._run_blocks(self._add_cls_and_pos(x))

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised tokens (B, 1 + N, D); ``mask`` (bool, (B, N)) replaces those patches by mask_token."""
        return self.norm(self._encode(images, mask))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predictions for the masked tokens only, (mask.sum(), target_dim), ordered like ``targets[mask]``.

        Tokens are selected once before the (per-token) final norm and lm_head, so unmasked ones cost nothing there.
        """
        if mask is None:
            raise ValueError("EvaMIM.forward needs a mask; use forward_features for unmasked tokens")
        x = self._encode(images, mask)[:, 1:][mask]
        if x.shape[0] == 0:
            raise ValueError("mask selects no tokens: the MIM loss would be empty (NaN); mask at least one patch")
        return self.lm_head(self.norm(x))


class EvaTokens(nn.Module):
    """A pre-trained student as a one-input model (what MLflow's pytorch flavour and serving call): images (B, C, H,
    W) -> its final-norm tokens (B, 1 + N, D), cls first; the features that the linear probe reads."""

    def __init__(self, student: EvaMIM) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student.forward_features(images)


class EvaClassifier(EvaViT):
    """Fine-tune model (EVA-01 ``run_class_finetuning.py``): mean of patch tokens (cls excluded) -> fc_norm -> head.

    ``freeze_patch_embed`` (default, as every EVA fine-tune) sets the patch embedding's ``requires_grad`` to False and
    detaches its output, so no gradient or optimizer state is spent on it. ``head_init_scale`` multiplies the new
    head's trunc-normal(0.02) init (EVA's ``--init_scale``, 0.001).
    """

    def __init__(
        self,
        config: EvaConfig,
        num_classes: int,
        *,
        freeze_patch_embed: bool = True,
        head_init_scale: float = HEAD_INIT_SCALE,
        initialise: bool = True,
    ) -> None:
        super().__init__(config, initialise=False)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if not head_init_scale > 0:
            raise ValueError(f"head_init_scale must be > 0, got {head_init_scale!r}")
        self.num_classes = num_classes
        self.head_init_scale = head_init_scale
        dim = config.embed_dim
        self.fc_norm = LayerNormFp32(dim, eps=config.ln_eps)
        self.head: nn.Module = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.detach_patch_embed = freeze_patch_embed
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)
        if initialise:
            self.init_weights()

    @torch.no_grad()
    def _init_head(self) -> None:
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
            self.head.weight.mul_(self.head_init_scale)
            self.head.bias.mul_(self.head_init_scale)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 1 + N, D) block output -> logits (or the normalised pooled feature with ``pre_logits``)."""
        x = self.fc_norm(x[:, 1:].mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def get_layer_id(param_name: str, num_layers: int) -> int:
    """Layer id for layer-wise LR decay (EVA-01 ``optim_factory.py``): embeddings 0, ``blocks.i`` i + 1, everything
    after = depth + 1.

    ``num_layers`` is the encoder depth (40 for EVA-g); the scale is then ``decay ** (num_layers + 1 - id)``.
    DDP/compile wrapper prefixes (``module.``, ``_orig_mod.``) are ignored.
    """
    name = param_name
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    if name.startswith(_EMBED_PARAMS):
        return 0
    match = _BLOCK_RE.match(name)
    if match is not None:
        block = int(match.group(1))
        if block >= num_layers:
            raise ValueError(f"{param_name!r} is block {block} but num_layers is {num_layers}")
        return block + 1
    return num_layers + 1
