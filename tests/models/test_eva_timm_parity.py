"""Numerical equivalence with timm's Eva after its official-checkpoint filter (``checkpoint_filter_fn`` in
timm/models/eva.py), fp32."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from timm.models.eva import Eva, checkpoint_filter_fn
from torch import nn

from eva_pipeline.models import EvaConfig, create_classifier, create_model

TOL = 1e-5
NUM_CLASSES = 7


def _timm_eva(cfg: EvaConfig, num_classes: int) -> Eva:
    """The timm model an official EVA-01 checkpoint of ``cfg`` loads into (what ``eva_giant_patch14_*`` build)."""
    return Eva(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_hidden_dim / cfg.embed_dim,
        qkv_bias=True,
        global_pool="avg",  # -> fc_norm on, final norm Identity
        num_classes=num_classes,
    ).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))


def test_classifier_logits_match_timm(small: dict, perturb: Callable, images: torch.Tensor) -> None:
    ours = perturb(create_classifier("eva_tiny_patch4_28", NUM_CLASSES, **small)).eval()
    theirs = _timm_eva(ours.config, NUM_CLASSES)
    theirs.load_state_dict(checkpoint_filter_fn(ours.state_dict(), theirs), strict=True)
    with torch.no_grad():
        got, want = ours(images), theirs(images)
    assert got.shape == (3, NUM_CLASSES)
    assert (got - want).abs().max().item() < TOL
    assert want.abs().max().item() > 1e-2  # not trivially zero


def test_mim_encoder_tokens_match_timm(small: dict, perturb: Callable, images: torch.Tensor) -> None:
    ours = perturb(create_model("eva_tiny_patch4_28", **small)).eval()
    theirs = _timm_eva(ours.config, 0)
    filtered = checkpoint_filter_fn(ours.state_dict(), theirs)
    # timm drops the MIM-only tensors and moves the final norm to fc_norm ...
    assert not {"mask_token", "lm_head.weight", "norm.weight"} & set(filtered)
    theirs.load_state_dict(filtered, strict=True)
    assert isinstance(theirs.norm, nn.Identity)
    assert torch.equal(theirs.fc_norm.weight, ours.norm.weight)
    # ... so its forward_features is the pre-norm block output; fc_norm per token reproduces our final norm.
    with torch.no_grad():
        got = ours.forward_features(images)
        raw = theirs.forward_features(images)
        want = theirs.fc_norm(raw)
    assert got.shape == want.shape == (3, 1 + 49, small["embed_dim"])
    assert (got - want).abs().max().item() < TOL
    # Honesty check: without the norm the comparison fails, so the test can tell.
    assert (got - raw).abs().max().item() > 1e-2
