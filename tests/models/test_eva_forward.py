"""MIM forward semantics (EVA-01 ``modeling_pretrain.py``), attention implementations, gradient checkpointing,
frozen patch embedding, layer ids (EVA-01 ``optim_factory.py``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from eva_pipeline.models import EvaMIM, create_classifier, create_model, get_layer_id

GRID, PATCH = 7, 4


@pytest.fixture
def mim(small: dict, perturb: Callable) -> EvaMIM:
    torch.manual_seed(0)
    return perturb(create_model("eva_tiny_patch4_28", target_dim=112, **small)).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def mask() -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    m = torch.rand(2, GRID * GRID, generator=gen) < 0.4
    m[0, 0], m[1, 0] = True, False
    return m


def _reference_features(model: EvaMIM, images: torch.Tensor, mask: torch.Tensor, after_pos: bool = False):
    """EVA-01's masking formula (``modeling_pretrain.py``), written independently: x*(1-w) + mask_token*w, then cls
    and pos_embed."""
    x = model.patch_embed(images)
    w = mask.unsqueeze(-1).to(x.dtype)
    if not after_pos:
        x = x * (1 - w) + model.mask_token * w
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + model.pos_embed
    if after_pos:  # the wrong order, to show the test can tell
        x = torch.cat((x[:, :1], x[:, 1:] * (1 - w) + model.mask_token * w), dim=1)
    for block in model.blocks:
        x = block(x)
    return model.norm(x)


@torch.no_grad()
def test_masked_features_follow_spec_formula(mim: EvaMIM, images: torch.Tensor, mask: torch.Tensor) -> None:
    got = mim.forward_features(images, mask)
    assert got.shape == (2, 1 + GRID * GRID, 64)
    assert torch.allclose(got, _reference_features(mim, images, mask), atol=1e-6, rtol=0)
    assert not torch.allclose(got, _reference_features(mim, images, mask, after_pos=True), atol=1e-3)


@torch.no_grad()
def test_forward_returns_masked_tokens_in_target_order(mim: EvaMIM, images: torch.Tensor, mask: torch.Tensor) -> None:
    pred = mim(images, mask)
    assert pred.shape == (int(mask.sum()), 112)
    # Same rows as lm_head over the normalised features selected like targets[mask] (batch-major, then patch).
    feats = mim.forward_features(images, mask)[:, 1:]
    assert torch.allclose(pred, mim.lm_head(feats[mask]), atol=1e-6, rtol=0)
    # Image by image, concatenated: fixes the order across the batch.
    per_image = torch.cat([mim(images[i : i + 1], mask[i : i + 1]) for i in range(2)])
    assert torch.allclose(pred, per_image, atol=1e-5, rtol=0)


def _patch_region(index: int) -> tuple[slice, slice]:
    r, c = divmod(index, GRID)
    return slice(r * PATCH, (r + 1) * PATCH), slice(c * PATCH, (c + 1) * PATCH)


@torch.no_grad()
def test_pixels_of_masked_patches_do_not_matter(mim: EvaMIM, images: torch.Tensor, mask: torch.Tensor) -> None:
    edited = images.clone()
    for b, n in mask.nonzero().tolist():
        rows, cols = _patch_region(n)
        edited[b, :, rows, cols] = torch.randn(3, PATCH, PATCH) * 5
    assert torch.equal(mim.forward_features(images, mask), mim.forward_features(edited, mask))
    assert torch.equal(mim(images, mask), mim(edited, mask))
    # Editing a visible patch does change the predictions.
    b, n = (~mask).nonzero()[0].tolist()
    rows, cols = _patch_region(n)
    edited[b, :, rows, cols] += 1.0
    assert not torch.allclose(mim(images, mask), mim(edited, mask), atol=1e-4)


@torch.no_grad()
def test_masked_tokens_get_position_and_cls_is_never_masked(mim: EvaMIM, images: torch.Tensor) -> None:
    full = torch.ones(2, GRID * GRID, dtype=torch.bool)
    pred = mim(images, full)
    assert pred.shape == (2 * GRID * GRID, 112)
    # Every input token is mask_token, so only pos_embed tells positions apart: all rows must differ.
    assert torch.cdist(pred[: GRID * GRID], pred[: GRID * GRID]).add(torch.eye(GRID * GRID)).min() > 1e-3
    # And the image content is ignored entirely.
    assert torch.equal(pred[: GRID * GRID], pred[GRID * GRID :])
    # The mask addresses patches only: a (B, 1 + N) mask that would cover cls is rejected.
    with pytest.raises(ValueError, match=r"mask must have shape .*\(2, 49\).*\(2, 50\)"):
        mim(images, torch.ones(2, 1 + GRID * GRID, dtype=torch.bool))


@torch.no_grad()
def test_sdpa_matches_eager(small: dict, perturb: Callable, images: torch.Tensor, mask: torch.Tensor) -> None:
    eager = perturb(create_model("eva_tiny_patch4_28", **small)).eval()
    sdpa = create_model("eva_tiny_patch4_28", **dict(small, attn_impl="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    assert sdpa.blocks[0].attn.attn_impl == "sdpa"
    diff = (eager.forward_features(images, mask) - sdpa.forward_features(images, mask)).abs().max().item()
    assert diff < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = eager.forward_features(images, mask)
    assert torch.isfinite(low).all()
    assert (low.float() - eager.forward_features(images, mask)).abs().max().item() < 0.25


def _loss_and_grads(model: EvaMIM, images: torch.Tensor, mask: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(5)  # drop path draws
    loss = model(images, mask).square().mean()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def test_gradient_checkpointing_gives_same_gradients(small: dict, images: torch.Tensor, mask: torch.Tensor) -> None:
    cfg = dict(small, drop_path_rate=0.3)
    plain = create_model("eva_tiny_patch4_28", **cfg).train()
    ckpt = create_model("eva_tiny_patch4_28", **dict(cfg, grad_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    for block in ckpt.blocks:  # counts forward runs: recomputation in backward doubles them
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    loss_a, grads_a = _loss_and_grads(plain, images, mask)
    loss_b, grads_b = _loss_and_grads(ckpt, images, mask)
    assert len(calls) == 2 * small["depth"]
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_classifier_patch_embedding_is_frozen(small: dict, perturb: Callable, images: torch.Tensor) -> None:
    clf = perturb(create_classifier("eva_tiny_patch4_28", 5, **small)).train()
    clf(images).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in clf.patch_embed.parameters())
    assert clf.pos_embed.grad is not None and clf.head.weight.grad is not None
    free = create_classifier("eva_tiny_patch4_28", 5, freeze_patch_embed=False, **small).train()
    free(images).sum().backward()
    assert free.patch_embed.proj.weight.grad is not None


def test_layer_ids() -> None:
    depth = 40
    expected = {
        "patch_embed.proj.weight": 0,
        "cls_token": 0,
        "pos_embed": 0,
        "mask_token": 0,
        "blocks.0.attn.qkv.weight": 1,
        "blocks.9.norm1.weight": 10,
        "blocks.39.mlp.fc2.bias": 40,
        "norm.weight": 41,
        "fc_norm.bias": 41,
        "head.weight": 41,
        "lm_head.bias": 41,
        "module.blocks.3.attn.q_bias": 4,
        "_orig_mod.cls_token": 0,
    }
    assert {name: get_layer_id(name, depth) for name in expected} == expected
    with torch.device("meta"):
        clf = create_classifier("eva_giant_patch14_224", 1000, img_size=336)
    ids = {get_layer_id(name, depth) for name, _ in clf.named_parameters()}
    assert ids == set(range(depth + 2))
    with pytest.raises(ValueError, match="block 40 but num_layers is 40"):
        get_layer_id("blocks.40.norm1.weight", depth)
