"""Parameter counts and state-dict keys against the official EVA-01 models and checkpoints; giant only ever on the
meta device."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.eva import checkpoint_filter_fn

from eva_pipeline.models import EvaViT, create_classifier, create_model, get_config, list_models


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def giant_mim() -> torch.nn.Module:
    with torch.device("meta"):
        return create_model("eva_giant_patch14_224")


def test_giant_mim_and_encoder_counts(giant_mim: torch.nn.Module) -> None:
    assert giant_mim.cls_token.is_meta
    assert _numel(giant_mim) == 1_012_229_632
    with torch.device("meta"):
        encoder = EvaViT(get_config("eva_giant_patch14_224"))
    assert _numel(encoder) == 1_011_143_296


@pytest.mark.parametrize(
    ("img_size", "num_classes", "expected"),
    [(336, 1000, 1_013_005_672), (560, 1000, 1_014_447_464), (224, 21841, 1_041_920_081)],
)
def test_giant_classifier_counts(img_size: int, num_classes: int, expected: int) -> None:
    with torch.device("meta"):
        model = create_classifier("eva_giant_patch14_224", num_classes, img_size=img_size)
    assert _numel(model) == expected
    # The frozen patch embedding still counts, but is not trainable.
    assert not any(p.requires_grad for p in model.patch_embed.parameters())


def test_timm_giant_count_and_key_compatibility(giant_mim: torch.nn.Module) -> None:
    with torch.device("meta"):
        timm_model = timm.create_model("eva_giant_patch14_224", pretrained=False)
        classifier = create_classifier("eva_giant_patch14_224", 1000)
    assert _numel(timm_model) == 1_012_555_112
    timm_state = timm_model.state_dict()

    from_mim = checkpoint_filter_fn(giant_mim.state_dict(), timm_model)
    # timm drops mask_token/lm_head, renames norm -> fc_norm; only the new classifier head is left for timm to init.
    assert set(timm_state) - set(from_mim) == {"head.weight", "head.bias"}
    assert set(from_mim) <= set(timm_state)
    assert {k: tuple(v.shape) for k, v in from_mim.items()} == {k: tuple(timm_state[k].shape) for k in from_mim}

    from_ft = checkpoint_filter_fn(classifier.state_dict(), timm_model)
    assert {k: tuple(v.shape) for k, v in from_ft.items()} == {k: tuple(v.shape) for k, v in timm_state.items()}


def _official_mim_keys(depth: int) -> list[str]:
    """The released EVA-01 MIM checkpoint's keys, written out by hand."""
    keys = ["cls_token", "mask_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        keys += [
            f"blocks.{i}.{name}"
            for name in (
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
        ]
    return [*keys, "norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias"]


def test_official_key_set_and_shapes(small: dict) -> None:
    model = create_model("eva_tiny_patch4_28", target_dim=112, **small)
    state = model.state_dict()
    assert sorted(state) == sorted(_official_mim_keys(small["depth"]))
    d, n = small["embed_dim"], (small["img_size"] // small["patch_size"]) ** 2
    assert state["blocks.0.attn.qkv.weight"].shape == (3 * d, d)
    assert state["pos_embed"].shape == (1, 1 + n, d)
    assert state["mask_token"].shape == state["cls_token"].shape == (1, 1, d)
    assert state["patch_embed.proj.weight"].shape == (d, 3, small["patch_size"], small["patch_size"])
    assert state["lm_head.weight"].shape == (112, d)
    # The fixed-zero k bias is neither a parameter nor a buffer.
    assert not any("k_bias" in k for k in state) and not list(model.buffers())


def test_registry_sizes() -> None:
    assert {
        "eva_giant_patch14_224",
        "eva_large_patch14_224",
        "eva_base_patch14_224",
        "eva_small_patch14_224",
        "eva_tiny_patch4_28",
    } <= set(list_models())
    shapes = {
        name: (c.embed_dim, c.depth, c.num_heads, c.mlp_hidden_dim, c.patch_size, c.img_size)
        for name in list_models()
        for c in [get_config(name)]
    }
    assert shapes["eva_giant_patch14_224"] == (1408, 40, 16, 6144, 14, 224)
    assert shapes["eva_large_patch14_224"] == (1024, 24, 16, 4096, 14, 224)
    assert shapes["eva_base_patch14_224"] == (768, 12, 12, 3072, 14, 224)
    assert shapes["eva_small_patch14_224"] == (384, 12, 6, 1536, 14, 224)
    tiny = get_config("eva_tiny_patch4_28")
    assert tiny.grid_size == 7 and tiny.num_patches == 49
    giant = get_config("eva_giant_patch14_224")
    assert (giant.head_dim, giant.num_patches, giant.target_dim, giant.drop_path_rate) == (88, 256, 768, 0.1)
