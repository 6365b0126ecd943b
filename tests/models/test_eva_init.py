"""Pre-training init statistics (EVA-01 ``modeling_pretrain.py``): trunc-normal 0.015 at +-1 sigma, 1/sqrt(2i)
rescale, zero biases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from eva_pipeline.models import create_classifier, create_model

STD = 0.015
# Std of N(0, STD^2) truncated at +-1 sigma: STD * sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)) = 0.008093.
_PHI1 = math.exp(-0.5) / math.sqrt(2 * math.pi)
TRUNC_STD = STD * math.sqrt(1 - 2 * _PHI1 / math.erf(1 / math.sqrt(2)))
WIDE = {"img_size": 28, "patch_size": 4, "embed_dim": 512, "depth": 4, "num_heads": 8, "mlp_hidden_dim": 2048}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("eva_tiny_patch4_28", **WIDE)


def test_truncated_normal_weights(model: nn.Module) -> None:
    assert 0.00805 < TRUNC_STD < 0.00815
    state = dict(model.named_parameters())
    for name in ["blocks.0.attn.qkv.weight", "blocks.2.mlp.fc1.weight", "lm_head.weight"]:
        w = state[name]
        assert w.numel() > 250_000
        assert abs(w.std().item() / TRUNC_STD - 1) < 0.01, name
        assert w.abs().max().item() <= STD
        assert w.abs().max().item() > 0.99 * STD  # truncation really at 1 sigma, not 2
    # Smaller tensors (conv, tokens): same law, looser sampling tolerance.
    for name in ["patch_embed.proj.weight", "pos_embed", "cls_token", "mask_token"]:
        w = state[name]
        assert abs(w.std().item() / TRUNC_STD - 1) < 0.1, name
        assert w.abs().max().item() <= STD, name


def test_depth_rescale_of_output_projections(model: nn.Module) -> None:
    for i, block in enumerate(model.blocks, start=1):
        for w in (block.attn.proj.weight, block.mlp.fc2.weight):
            ratio = w.std().item() / TRUNC_STD
            assert abs(ratio * math.sqrt(2 * i) - 1) < 0.02, (i, ratio)
            assert w.abs().max().item() <= STD / math.sqrt(2 * i) + 1e-9


def test_biases_and_norms(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if name.endswith((".bias", "q_bias", "v_bias")):
            if ".norm" in name or name.startswith("norm"):
                continue
            assert torch.count_nonzero(p) == 0, name
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * WIDE["depth"] + 1
    for m in norms:
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        assert m.eps == 1e-6


def test_classifier_head_init() -> None:
    torch.manual_seed(0)
    clf = create_classifier("eva_tiny_patch4_28", 1000, **WIDE)
    # trunc-normal 0.02 x 0.001 -> std 2e-5 (bounds +-2 absolute are irrelevant at this std).
    assert abs(clf.head.weight.std().item() / 2e-5 - 1) < 0.02
    assert torch.count_nonzero(clf.head.bias) == 0
    assert torch.all(clf.fc_norm.weight == 1)
    # The encoder keeps the pre-training law.
    assert abs(clf.blocks[0].attn.qkv.weight.std().item() / TRUNC_STD - 1) < 0.01


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_head_init_scale_multiplies_the_head_only(scale: float) -> None:
    torch.manual_seed(0)
    clf = create_classifier("eva_tiny_patch4_28", 1000, head_init_scale=scale, **WIDE)
    assert abs(clf.head.weight.std().item() / (0.02 * scale) - 1) < 0.02
    assert torch.count_nonzero(clf.head.bias) == 0
    assert abs(clf.blocks[0].attn.qkv.weight.std().item() / TRUNC_STD - 1) < 0.01


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_head_init_scale_must_be_positive(scale: float) -> None:
    with pytest.raises(ValueError, match="head_init_scale"):
        create_classifier("eva_tiny_patch4_28", 10, head_init_scale=scale, **WIDE)
