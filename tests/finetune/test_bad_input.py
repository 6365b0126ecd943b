"""Bad fine-tune inputs fail before training with messages that say what is wrong: a checkpoint of another model
size, a stage resolution the patch size does not divide."""

from __future__ import annotations

import pytest
import torch

from eva_pipeline.finetune.weights import load_finetune_start
from eva_pipeline.models import CheckpointError, create_classifier, create_model, get_config, load_official_checkpoint


def test_checkpoint_of_another_width_lists_every_shape(small: dict) -> None:
    wide = create_model("eva_tiny_patch4_28", **dict(small, embed_dim=48)).state_dict()
    clf = create_classifier("eva_tiny_patch4_28", 5, **small)
    with pytest.raises(CheckpointError) as info:
        load_finetune_start(clf, wide)
    message = str(info.value)
    assert (
        "shape mismatch (pos_embed not resampled: its width differs (a checkpoint of another model size?))" in message
    )
    assert "blocks.0.attn.qkv.weight: expected (96, 32), got (144, 48)" in message
    assert "pos_embed: expected (1, 50, 32), got (1, 50, 48)" in message


def test_checkpoint_of_another_depth_is_refused_not_half_loaded(small: dict) -> None:
    deeper = create_model("eva_tiny_patch4_28", **dict(small, depth=3)).state_dict()
    clf = create_classifier("eva_tiny_patch4_28", 5, **small)
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"(?s)another model size.*checkpoint has 3 blocks, the model 2.*"
                       r"unexpected in checkpoint: 'blocks\.2\.attn\.proj\.bias'"):  # fmt: skip
        load_finetune_start(clf, deeper)
    assert all(torch.equal(v, before[k]) for k, v in clf.state_dict().items())  # nothing was loaded
    shallower = create_model("eva_tiny_patch4_28", **dict(small, depth=1)).state_dict()
    with pytest.raises(CheckpointError, match=r"(?s)checkpoint has 1 blocks, the model 2.*missing from checkpoint"):
        load_finetune_start(clf, shallower)
    # Control: the plain non-strict load (as the official loader) takes the deeper checkpoint without a word.
    report = load_official_checkpoint(clf, deeper, strict=False)
    assert any(k.startswith("blocks.2.") for k in report.unexpected_keys)


def test_pos_embed_that_is_no_square_grid_is_named(small: dict) -> None:
    state = create_model("eva_tiny_patch4_28", **small).state_dict()
    state["pos_embed"] = state["pos_embed"][:, :40]
    with pytest.raises(CheckpointError, match=r"not resampled: it is not 1 \+ a square grid.*\n  pos_embed: expected"):
        load_finetune_start(create_classifier("eva_tiny_patch4_28", 5, **small), state)


def test_stage_resolution_must_be_divisible_by_the_patch() -> None:
    with pytest.raises(ValueError, match="img_size 500 is not divisible by patch_size 14"):
        create_classifier("eva_giant_patch14_224", 1000, img_size=500)
    assert get_config("eva_giant_patch14_224", img_size=560).grid_size == 40  # the paper's 560 px stage is fine
    with pytest.raises(ValueError, match="img_size 30 is not divisible by patch_size 4"):
        create_classifier("eva_tiny_patch4_28", 10, img_size=30)
