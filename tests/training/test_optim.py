"""AdamW parameter groups follow EVA: no decay for 1-D params, biases, pos_embed, cls_token; mask_token decayed."""

import pytest
import torch

from eva_pipeline.models import create_model, get_layer_id
from eva_pipeline.training import AdamWConfig, apply_lr, build_adamw, param_groups


@pytest.fixture(scope="module")
def model():
    return create_model("eva_tiny_patch4_28", depth=2, target_dim=16)


def _names(groups, decayed: bool) -> set[str]:
    return {n for g in groups if (g["weight_decay"] > 0) == decayed for n in g["param_names"]}


def test_decay_exclusions(model):
    groups = param_groups(model, weight_decay=0.05)
    no_decay, decay = _names(groups, False), _names(groups, True)
    assert {
        "pos_embed",
        "cls_token",
        "blocks.0.attn.q_bias",
        "blocks.0.attn.v_bias",
        "norm.weight",
        "norm.bias",
        "blocks.1.norm1.weight",
        "patch_embed.proj.bias",
        "lm_head.bias",
    } <= no_decay
    assert "mask_token" in decay  # EVA decays the mask token
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "lm_head.weight"} <= decay
    every = {n for n, p in model.named_parameters() if p.requires_grad}
    assert no_decay | decay == every and not no_decay & decay
    # Exactly the rule: 1-D or *.bias or the two embeddings.
    for name, param in model.named_parameters():
        expected = not (param.ndim == 1 or name.endswith(".bias") or name in {"pos_embed", "cls_token"})
        assert (name in decay) == expected, name
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}


def test_adamw_hyperparameters_and_decoupled_decay(model):
    optimizer = build_adamw(param_groups(model, weight_decay=0.05), AdamWConfig())
    assert isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-6 and "param_names" not in group


def test_layer_decay_scales(model):
    depth = model.config.depth
    groups = param_groups(
        model, weight_decay=0.05, layer_decay=0.5, layer_id=lambda n: get_layer_id(n, depth), num_layers=depth
    )
    scale_of = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale_of["pos_embed"] == pytest.approx(0.5 ** (depth + 1))
    assert scale_of["blocks.0.attn.qkv.weight"] == pytest.approx(0.5**depth)
    assert scale_of[f"blocks.{depth - 1}.mlp.fc1.weight"] == pytest.approx(0.5)
    assert scale_of["lm_head.weight"] == 1.0
    optimizer = build_adamw(groups, AdamWConfig(lr=1.0))
    apply_lr(optimizer, 2e-3)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx(
        sorted({2e-3 * g["lr_scale"] for g in groups})
    )


def test_layer_decay_needs_layer_ids(model):
    with pytest.raises(ValueError, match="layer_decay needs both layer_id and num_layers"):
        param_groups(model, weight_decay=0.05, layer_decay=0.9)
