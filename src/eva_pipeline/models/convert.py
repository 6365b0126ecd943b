"""Conversions of EVA-01 weights: the architecture read back from a state dict, official <-> timm ``Eva`` key layout,
and the patch 14 -> 16 conversion of EVA's detection and segmentation backbones.

Official -> timm is timm's own ``checkpoint_filter_fn`` (what ``timm.create_model(..., pretrained=True)`` applies):
MIM-only tensors dropped, the final ``norm`` moved to ``fc_norm``. timm -> official is the inverse, written here: the
two layouts share every other key name, so only ``fc_norm`` goes back to ``norm`` on a head-less (MIM) encoder;
``mask_token`` and ``lm_head`` do not exist in timm's ``Eva`` and cannot come back.

The patch conversion follows EVA-01's ``interpolate_patch_14to16.py`` (``method="eva"``: plain bicubic resize of
the kernel and of the pos_embed grid, no antialias), or timm's loader (``method="timm"``: ``resample_patch_embed``,
FlexiViT's pseudo-inverse, which keeps a resized patch's token, and an antialiased ``resample_abs_pos_embed``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.eva import Eva, checkpoint_filter_fn

from eva_pipeline.fileio import replace_atomically
from eva_pipeline.models.checkpoint import (
    HEAD_KEYS,
    CheckpointError,
    block_count,
    listed,
    load_official_checkpoint,
)
from eva_pipeline.models.config import CLIP_L14_TARGET_DIM, EvaConfig
from eva_pipeline.models.eva import EvaClassifier, EvaMIM
from eva_pipeline.models.finetuned import save_torch_atomically
from eva_pipeline.models.registry import MODEL_CONFIGS

Kind = Literal["mim", "classifier"]
PatchMethod = Literal["eva", "timm"]
PATCH_METHODS: tuple[str, ...] = ("eva", "timm")
#: safetensors metadata keys written by :func:`save_timm_safetensors` (values are JSON).
TIMM_ARGS_KEY = "eva_pipeline.timm_eva"
CLASSES_META_KEY = "eva_pipeline.classes"
#: Largest difference between our model and timm's on the same weights, relative to the outputs' scale (fp32;
#: measured: 7.5e-8 on a small config, eva-reference.md section 8).
PARITY_TOL = 1e-4

#: Tensors only the MIM pre-training model has (timm's ``Eva`` has no place for them).
MIM_ONLY_KEYS: tuple[str, ...] = ("mask_token", "lm_head.weight", "lm_head.bias")
_NORM = ("norm.weight", "norm.bias")
_FC_NORM = ("fc_norm.weight", "fc_norm.bias")
_BLOCK_SUFFIXES = (
    "norm1.weight",
    "norm1.bias",
    "attn.q_bias",
    "attn.v_bias",
    "attn.qkv.weight",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)
_STEM = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")


def checkpoint_kind(state: Mapping[str, torch.Tensor]) -> Kind:
    """``"classifier"`` (fc_norm + head, a fine-tuned model) or ``"mim"`` (final norm, a pre-trained encoder)."""
    if all(k in state for k in HEAD_KEYS) and all(k in state for k in _FC_NORM):
        return "classifier"
    if all(k in state for k in _NORM):
        return "mim"
    raise CheckpointError(
        "neither a fine-tuned EVA classifier (fc_norm.*, head.*) nor a pre-trained encoder (norm.*): "
        f"keys outside the blocks: {listed(sorted(k for k in state if not k.startswith('blocks.')))}"
    )


def _tensor(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"not an EVA ViT state dict: no {key!r}")
    return state[key]


def infer_config(
    state: Mapping[str, torch.Tensor], *, base: EvaConfig | None = None, num_heads: int | None = None
) -> EvaConfig:
    """The :class:`EvaConfig` of a state dict: every shape is read from the tensors; the number of heads (which no
    tensor shows) is ``num_heads``, else ``base``'s, else that of the one registered model of the same width, depth
    and MLP size. ``base`` (a ``--model`` / student config) must agree with the tensors on everything else."""
    kernel = _tensor(state, "patch_embed.proj.weight")
    if kernel.ndim != 4 or kernel.shape[-1] != kernel.shape[-2]:
        raise CheckpointError(
            f"patch_embed.proj.weight has shape {tuple(kernel.shape)}: not an image ViT with square patches "
            "(a video classifier's kernel is 5-D)"
        )
    embed_dim, in_chans, patch = int(kernel.shape[0]), int(kernel.shape[1]), int(kernel.shape[-1])
    tokens = _tensor(state, "pos_embed").shape[1] - 1
    grid = math.isqrt(max(tokens, 0))
    if tokens <= 0 or grid * grid != tokens:
        raise CheckpointError(f"pos_embed has {tokens + 1} tokens: not 1 (cls) + a square grid")
    depth = block_count(state)
    if depth == 0:
        raise CheckpointError("the state dict has no blocks.<i>. tensors")
    mlp = int(_tensor(state, "blocks.0.mlp.fc1.weight").shape[0])
    target_dim = int(state["lm_head.weight"].shape[0]) if "lm_head.weight" in state else CLIP_L14_TARGET_DIM
    shape = {
        "img_size": grid * patch,
        "patch_size": patch,
        "embed_dim": embed_dim,
        "depth": depth,
        "mlp_hidden_dim": mlp,
        "in_chans": in_chans,
    }
    if base is not None:
        differ = [
            f"{name} {getattr(base, name)} vs {value}"
            for name, value in shape.items()
            if name != "img_size" and getattr(base, name) != value
        ]
        if differ:
            raise CheckpointError(
                f"the given model config does not fit the checkpoint (config vs checkpoint): {', '.join(differ)}"
            )
    if num_heads is None and base is not None:
        num_heads = base.num_heads
    if num_heads is None:
        same = {
            c.num_heads
            for c in MODEL_CONFIGS.values()
            if (c.embed_dim, c.depth, c.mlp_hidden_dim) == (embed_dim, depth, mlp)
        }
        if len(same) != 1:
            raise CheckpointError(
                f"cannot tell the number of attention heads of this checkpoint (width {embed_dim}, depth {depth}, "
                f"MLP {mlp}: {'no' if not same else 'more than one'} registered model of that shape); give the model "
                "name, the student config or the number of heads"
            )
        num_heads = same.pop()
    fields: dict[str, Any] = {} if base is None else dataclasses.asdict(base)
    fields.update(shape, num_heads=num_heads, target_dim=target_dim, drop_path_rate=0.0, grad_checkpointing=False)
    try:
        return EvaConfig(**fields)
    except ValueError as err:
        raise CheckpointError(f"the checkpoint's architecture is not a valid EVA config: {err}") from None


def timm_eva_kwargs(config: EvaConfig, num_classes: int) -> dict[str, Any]:
    """The ``timm.models.eva.Eva`` arguments of an EVA-01 ViT (what timm's ``eva_giant_patch14_*`` build): fused qkv
    with q/v biases, absolute pos_embed, mean pooling through ``fc_norm``, no final norm."""
    return {
        "img_size": config.img_size,
        "patch_size": config.patch_size,
        "in_chans": config.in_chans,
        "embed_dim": config.embed_dim,
        "depth": config.depth,
        "num_heads": config.num_heads,
        "mlp_ratio": config.mlp_hidden_dim / config.embed_dim,
        "qkv_bias": True,
        "global_pool": "avg",
        "num_classes": num_classes,
    }


def create_timm_eva(config: EvaConfig, num_classes: int, device: str | torch.device | None = None) -> Eva:
    """timm's ``Eva`` for ``config`` in eval mode (``device="meta"``: shapes only, nothing allocated)."""
    return Eva(**timm_eva_kwargs(config, num_classes), device=device).eval()


def _check_keys(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse a state dict whose keys or shapes differ from ``want``'s, listing every difference."""
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(got) & set(want) if tuple(got[k].shape) != tuple(want[k].shape))
    problems = []
    if missing:
        problems.append(f"missing: {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected: {listed(unexpected)}")
    if wrong:
        problems.append(
            "shape mismatch: " + listed([f"{k} {tuple(got[k].shape)} vs {tuple(want[k].shape)}" for k in wrong])
        )
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def official_to_timm(state: Mapping[str, torch.Tensor], config: EvaConfig) -> dict[str, torch.Tensor]:
    """An official EVA-01 state dict (MIM or fine-tuned) -> the state dict of timm's ``Eva`` for ``config``, through
    timm's ``checkpoint_filter_fn``; the result is checked key by key against that model (built on the meta
    device)."""
    num_classes = int(state["head.weight"].shape[0]) if "head.weight" in state else 0
    model = create_timm_eva(config, num_classes, device="meta")
    out = checkpoint_filter_fn(dict(state), model)
    if "mask_token" not in state and all(k in out for k in _NORM):
        # An encoder without mask_token (e.g. from timm_to_official): timm's filter moves norm -> fc_norm only when it
        # sees a MIM checkpoint by its mask_token; apply the same move.
        for src, dst in zip(_NORM, _FC_NORM, strict=True):
            out[dst] = out.pop(src)
    _check_keys(out, model.state_dict(), f"the converted weights do not fit timm's Eva ({config})")
    return out


def timm_to_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of an EVA-01-layout timm ``Eva`` -> official keys: unchanged for a classifier (fc_norm, head);
    ``fc_norm`` -> ``norm`` for a head-less encoder (the inverse of timm's MIM filter). Any other timm layout (rope,
    SwiGLU, layer scale, register tokens) is refused with the keys that do not belong."""
    state = dict(state)
    depth = block_count(state)
    allowed = {*_STEM, *_NORM, *_FC_NORM, *HEAD_KEYS}
    allowed |= {f"blocks.{i}.{suffix}" for i in range(depth) for suffix in _BLOCK_SUFFIXES}
    unexpected = sorted(set(state) - allowed)
    if unexpected:
        raise CheckpointError(
            f"not the EVA-01 layout of timm's Eva (no rope, SwiGLU, layer scale or register tokens): unexpected keys "
            f"{listed(unexpected)}"
        )
    head = [k for k in HEAD_KEYS if k in state]
    if head and len(head) != len(HEAD_KEYS):
        raise CheckpointError(f"incomplete head: only {head}")
    if not head and all(k in state for k in _FC_NORM) and not any(k in state for k in _NORM):
        for src, dst in zip(_FC_NORM, _NORM, strict=True):
            state[dst] = state.pop(src)
    missing = sorted({*_STEM, *(f"blocks.{i}.{s}" for i in range(depth) for s in _BLOCK_SUFFIXES)} - set(state))
    if missing:
        raise CheckpointError(f"incomplete EVA state dict: missing {listed(missing)}")
    checkpoint_kind(state)  # a final norm or a classifier's fc_norm + head must be there
    return state


def resample_patch_size(
    state: Mapping[str, torch.Tensor],
    patch_size: int,
    *,
    img_size: int | None = None,
    method: PatchMethod = "eva",
) -> dict[str, torch.Tensor]:
    """``state`` with its patch kernel resized to ``patch_size`` and its pos_embed to the grid
    ``img_size // patch_size`` (``img_size``: the checkpoint's by default, 224 -> a 14 x 14 grid at patch 16).

    ``method="eva"`` is EVA-01's ``interpolate_patch_14to16.py`` (bicubic ``F.interpolate`` of both, in fp32, no
    antialias); ``"timm"`` is what timm's loader does for a model of the new patch size (``resample_patch_embed``,
    the pseudo-inverse of the input resize, and an antialiased bicubic pos_embed). Other tensors are unchanged;
    dtypes are kept.
    """
    if method not in PATCH_METHODS:
        raise ValueError(f"method must be one of {PATCH_METHODS}, got {method!r}")
    kernel = _tensor(state, "patch_embed.proj.weight")
    pos = _tensor(state, "pos_embed")
    if kernel.ndim != 4:
        raise CheckpointError(f"patch_embed.proj.weight has shape {tuple(kernel.shape)}: not an image ViT's kernel")
    old_grid = math.isqrt(pos.shape[1] - 1)
    if old_grid * old_grid != pos.shape[1] - 1:
        raise CheckpointError(f"pos_embed has {pos.shape[1]} tokens: not 1 (cls) + a square grid")
    img_size = old_grid * int(kernel.shape[-1]) if img_size is None else img_size
    if patch_size < 1 or img_size % patch_size:
        raise ValueError(
            f"image size {img_size} is not a multiple of patch size {patch_size}: give an image size that is "
            f"(e.g. {max(patch_size, img_size - img_size % patch_size)})"
        )
    grid = img_size // patch_size
    antialias = method == "timm"
    if method == "timm":
        new_kernel = resample_patch_embed(kernel, [patch_size, patch_size], interpolation="bicubic", antialias=True)
    else:
        new_kernel = F.interpolate(
            kernel.float(), size=(patch_size, patch_size), mode="bicubic", align_corners=False
        ).to(kernel.dtype)
    out = dict(state)
    out["patch_embed.proj.weight"] = new_kernel
    out["pos_embed"] = resample_abs_pos_embed(
        pos,
        new_size=[grid, grid],
        old_size=[old_grid, old_grid],
        num_prefix_tokens=1,
        interpolation="bicubic",
        antialias=antialias,
    )
    return out


def save_official_state(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write ``{"model": state}`` (the official EVA-01 layout, dtypes kept) atomically."""
    return save_torch_atomically({"model": {k: v.detach().cpu().contiguous() for k, v in state.items()}}, path)


def save_timm_safetensors(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    timm_args: Mapping[str, Any],
    classes: list[str] | None = None,
) -> Path:
    """Write a timm state dict as safetensors atomically, with the ``Eva`` arguments (and the head's class names)
    as JSON in the file's metadata, so it can be rebuilt without guessing."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {"format": "pt", TIMM_ARGS_KEY: json.dumps(dict(timm_args), sort_keys=True)}
    if classes is not None:
        metadata[CLASSES_META_KEY] = json.dumps(list(classes))
    return replace_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def timm_metadata(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str] | None]:
    """The ``Eva`` arguments and the class names a file of :func:`save_timm_safetensors` records (``{}`` and None for
    another safetensors file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    args = json.loads(metadata[TIMM_ARGS_KEY]) if TIMM_ARGS_KEY in metadata else {}
    classes = json.loads(metadata[CLASSES_META_KEY]) if CLASSES_META_KEY in metadata else None
    return args, classes


def our_model(state: Mapping[str, torch.Tensor], config: EvaConfig) -> EvaMIM | EvaClassifier:
    """Our model of ``state`` (official keys) in eval mode: a classifier when it has a head, else the MIM model
    (whose ``mask_token`` and ``lm_head`` may be absent: inference does not use them). A pos_embed of another grid
    than ``config``'s is resampled bicubically."""
    config = dataclasses.replace(config, drop_path_rate=0.0, grad_checkpointing=False)
    if checkpoint_kind(state) == "classifier":
        model: EvaMIM | EvaClassifier = EvaClassifier(
            config, int(state["head.weight"].shape[0]), freeze_patch_embed=False, initialise=False
        )
        strict = True
    else:
        if "lm_head.weight" in state:
            config = dataclasses.replace(config, target_dim=int(state["lm_head.weight"].shape[0]))
        model = EvaMIM(config, initialise=False)
        strict = all(k in state for k in MIM_ONLY_KEYS)
        missing = sorted(set(model.state_dict()) - set(state) - set(MIM_ONLY_KEYS))
        unexpected = sorted(set(state) - set(model.state_dict()))
        if missing or unexpected:
            raise CheckpointError(
                f"the weights do not fit EvaMIM: missing {listed(missing)}; unexpected {listed(unexpected)}"
            )
    load_official_checkpoint(model, state, strict=strict, resample_pos_embed=True)
    return model.eval()


def timm_parity(
    official: Mapping[str, torch.Tensor], timm_state: Mapping[str, torch.Tensor], config: EvaConfig, batch: int = 2
) -> float:
    """Largest absolute difference, relative to max(1, the largest output), between our model on ``official`` and
    timm's ``Eva`` on ``timm_state``, on a fixed random input in fp32: logits of a classifier; for an encoder, our
    final-norm tokens against timm's ``fc_norm`` applied per token (where timm's filter moved our norm)."""
    ours = our_model(official, config).float()
    num_classes = int(timm_state["head.weight"].shape[0]) if "head.weight" in timm_state else 0
    theirs = create_timm_eva(config, num_classes)
    theirs.load_state_dict(dict(timm_state), strict=True)
    theirs = theirs.float().eval()
    size = (batch, config.in_chans, config.img_size, config.img_size)
    images = torch.randn(size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        if isinstance(ours, EvaClassifier):
            got, want = ours(images), theirs(images)
        else:
            got, want = ours.forward_features(images), theirs.fc_norm(theirs.forward_features(images))
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
