"""AdamW with layer-wise LR decay for fine-tuning (EVA paper, image classification; EVA-01
``run_class_finetuning.py`` and ``optim_factory.py``, inherited from BEiT), built with timm's
``param_groups_layer_decay``.

The model's ``group_matcher()`` gives timm EVA-01's layer ids (embeddings 0, ``blocks.i`` i + 1, the rest depth + 1),
and timm scales layer ``i`` by ``layer_decay ** (max_id - i)``, which is the official ``lrd ** (depth + 1 - i)`` once
the largest id is depth + 1, i.e. once some parameter (fc_norm, head) follows the last block; a bare encoder is refused.
Weight decay follows the official rule: none for 1-D tensors, ``*.bias`` and ``model.no_weight_decay()``. Frozen
parameters (the patch embedding of every EVA fine-tune) are left out of the optimiser, as in the official code.
"""

from __future__ import annotations

import torch
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay
from torch import nn

from eva_pipeline.training.optim import AdamWConfig, build_adamw

# timm matches these with fnmatch; "*.bias" makes the official ``name.endswith(".bias")`` explicit (timm alone relies
# on biases being 1-D).
_BIAS_PATTERN = "*.bias"


def layer_decay_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Trainable parameters grouped by (layer, decay), each group with ``lr_scale`` and ``param_names``.

    ``layer_decay`` 1.0 gives every group scale 1 (the official code then builds no assigner). Raises ``ValueError``
    when the model has no ``group_matcher`` or no parameter after its last block, where timm's scales would shift.
    """
    if not hasattr(model, "group_matcher") or not hasattr(model, "blocks"):
        raise ValueError(f"{type(model).__name__} has no group_matcher()/blocks: not an EVA ViT")
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    depth = len(model.blocks)
    layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    if max(layer_of.values()) != depth + 1:
        raise ValueError(
            f"{type(model).__name__} has no parameter after its last block (fc_norm, head), so timm's layer ids "
            f"would end at {max(layer_of.values())} instead of depth + 1 = {depth + 1}: the scales would not be EVA's"
        )
    groups = param_groups_layer_decay(
        model,
        weight_decay=weight_decay,
        no_weight_decay_list=[*sorted(model.no_weight_decay()), _BIAS_PATTERN],
        layer_decay=layer_decay,
    )
    name_of = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        group["param_names"] = [name_of[id(p)] for p in group["params"]]
    return groups


def frozen_parameter_names(model: nn.Module) -> list[str]:
    """Parameters that no optimiser built here updates (``requires_grad`` False: the frozen patch embedding)."""
    return [n for n, p in model.named_parameters() if not p.requires_grad]


def build_finetune_adamw(model: nn.Module, cfg: AdamWConfig, layer_decay: float) -> torch.optim.AdamW:
    """Decoupled AdamW over :func:`layer_decay_param_groups`; set each step's LR with ``training.optim.apply_lr``.

    ``cfg`` carries lr, betas, eps and weight decay: (0.9, 0.98), 1e-6 in the IN-21K intermediate stage, torch's
    defaults (0.9, 0.999), 1e-8 in the IN-1K stage (EVA-01 README commands).
    """
    return build_adamw(layer_decay_param_groups(model, cfg.weight_decay, layer_decay), cfg)
