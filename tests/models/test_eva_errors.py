"""Bad configurations and inputs fail early with messages that say what was expected."""

from __future__ import annotations

import pytest
import torch

from eva_pipeline.models import EvaConfig, UnknownModelError, create_classifier, create_model


def test_image_not_divisible_by_patch() -> None:
    with pytest.raises(ValueError, match="img_size 30 is not divisible by patch_size 4"):
        EvaConfig(img_size=30, patch_size=4, embed_dim=64, depth=1, num_heads=4, mlp_hidden_dim=128)
    with pytest.raises(ValueError, match="img_size 230 is not divisible by patch_size 14"):
        create_classifier("eva_giant_patch14_224", 1000, img_size=230)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embed_dim": 66}, "embed_dim 66 is not divisible by num_heads 4"),
        ({"attn_impl": "flash"}, "attn_impl must be one of"),
        ({"depth": 0}, "depth must be a positive int"),
        ({"drop_path_rate": 1.0}, r"drop_path_rate must be in \[0, 1\)"),
    ],
)
def test_invalid_configs(small: dict, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model("eva_tiny_patch4_28", **dict(small, **overrides))


def test_unknown_override_field() -> None:
    with pytest.raises(TypeError, match=r"unknown EvaConfig field.*'width'"):
        create_model("eva_tiny_patch4_28", width=3)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(KeyError, match=r"unknown EVA model 'eva_huge'; known models: .*eva_giant_patch14_224"):
        create_model("eva_huge")
    with pytest.raises(ValueError, match="eva_tiny_patch4_28"):
        create_classifier("eva_huge", 10)
    assert issubclass(UnknownModelError, KeyError)


def test_wrong_image_size(small: dict) -> None:
    model = create_model("eva_tiny_patch4_28", **small)
    mask = torch.ones(2, 49, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 28, 28\), got \(2, 3, 32, 32\)"):
        model(torch.zeros(2, 3, 32, 32), mask)
    with pytest.raises(ValueError, match=r"got \(2, 1, 28, 28\)"):
        model.forward_features(torch.zeros(2, 1, 28, 28))
    clf = create_classifier("eva_tiny_patch4_28", 3, **small)
    with pytest.raises(ValueError, match=r"\(batch, 3, 28, 28\), got \(3, 28, 28\)"):
        clf(torch.zeros(3, 28, 28))


def test_bad_masks(small: dict) -> None:
    model = create_model("eva_tiny_patch4_28", **small)
    images = torch.zeros(2, 3, 28, 28)
    with pytest.raises(TypeError, match=r"mask must be a torch.bool tensor, got torch.float32"):
        model(images, torch.ones(2, 49))
    with pytest.raises(TypeError, match=r"torch.uint8"):
        model(images, torch.ones(2, 49, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, num_patches\) = \(2, 49\), got \(2, 7, 7\)"):
        model(images, torch.ones(2, 7, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask selects no tokens"):
        model(images, torch.zeros(2, 49, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs a mask"):
        model(images, None)


def test_bad_num_classes(small: dict) -> None:
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        create_classifier("eva_tiny_patch4_28", -1, **small)
