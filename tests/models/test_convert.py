"""The conversion library: the architecture read back from a state dict, the timm <-> official mappings' refusals,
the parity check's ability to fail, and the checkpoint reader's errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from eva_pipeline.models import (
    CheckpointError,
    ClassifierCheckpoint,
    create_classifier,
    create_model,
    create_video_classifier,
    get_config,
    save_classifier_checkpoint,
)
from eva_pipeline.models.convert import (
    PARITY_TOL,
    infer_config,
    official_to_timm,
    resample_patch_size,
    timm_parity,
    timm_to_official,
)
from eva_pipeline.models.loading import load_model, read_checkpoint


def test_infer_config_reads_every_shape_and_takes_the_heads_from_the_registry_or_the_caller(small, perturb):
    tiny = create_model("eva_tiny_patch4_28", target_dim=112)  # the registered demo student: 4 heads
    assert infer_config(tiny.state_dict()) == dataclasses.replace(tiny.config, drop_path_rate=0.0)
    state = create_model("eva_tiny_patch4_28", **small).state_dict()  # 64-d, 2 blocks: no registered model
    with pytest.raises(CheckpointError, match="cannot tell the number of attention heads"):
        infer_config(state)
    config = infer_config(state, num_heads=4)
    assert (config.embed_dim, config.depth, config.num_heads, config.mlp_hidden_dim) == (64, 2, 4, 256)
    assert (config.img_size, config.patch_size, config.target_dim) == (28, 4, 768)
    base = get_config("eva_tiny_patch4_28", **small, attn_impl="sdpa")
    assert infer_config(state, base=base).attn_impl == "sdpa"  # the base's numerics are kept
    with pytest.raises(CheckpointError, match="depth 12 vs 2"):
        infer_config(state, base=get_config("eva_base_patch14_224"))
    video = create_video_classifier("eva_tiny_patch4_28", 3, num_frames=4, **small)
    with pytest.raises(CheckpointError, match="not an image ViT"):
        infer_config(video.state_dict())


def test_timm_to_official_refuses_other_layouts_and_incomplete_states(small):
    model = create_classifier("eva_tiny_patch4_28", 3, **small)
    state = official_to_timm(model.state_dict(), model.config)
    assert timm_to_official(state).keys() == state.keys()  # a classifier keeps its keys
    with pytest.raises(CheckpointError, match="rope"):
        timm_to_official({**state, "rope.freqs": torch.zeros(4)})
    without_bias = {k: v for k, v in state.items() if k != "head.bias"}
    with pytest.raises(CheckpointError, match="incomplete head"):
        timm_to_official(without_bias)
    without_block = {k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(CheckpointError, match=r"missing 'blocks.1.mlp.fc2.bias'"):
        timm_to_official(without_block)


def test_official_to_timm_checks_the_result_against_timms_model(small):
    state = create_model("eva_tiny_patch4_28", **small).state_dict()
    config = infer_config(state, num_heads=4)
    with pytest.raises(CheckpointError, match="do not fit timm's Eva"):
        official_to_timm(state, dataclasses.replace(config, mlp_hidden_dim=128))


def test_timm_parity_is_zero_on_converted_weights_and_large_on_swapped_biases(small, perturb):
    state = perturb(create_classifier("eva_tiny_patch4_28", 3, **small)).state_dict()
    config = infer_config(state, num_heads=4)
    converted = official_to_timm(state, config)
    assert timm_parity(state, converted, config) < PARITY_TOL
    q, v = "blocks.0.attn.q_bias", "blocks.0.attn.v_bias"
    swapped = {**converted, q: converted[v], v: converted[q]}
    assert timm_parity(state, swapped, config) > PARITY_TOL


def test_resample_patch_size_keeps_a_same_size_state_and_refuses_bad_sizes(small):
    state = create_model("eva_tiny_patch4_28", **small).state_dict()
    same = resample_patch_size(state, 4)
    assert all(torch.equal(same[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="not a multiple of patch size 6"):
        resample_patch_size(state, 6)
    assert resample_patch_size(state, 6, img_size=36)["pos_embed"].shape == (1, 37, 64)
    with pytest.raises(ValueError, match="method must be one of"):
        resample_patch_size(state, 4, method="nearest")


def test_read_checkpoint_names_what_it_cannot_use(tmp_path, small):
    with pytest.raises(CheckpointError, match="no checkpoint file at"):
        read_checkpoint(tmp_path / "missing.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a mapping"):
        read_checkpoint(tmp_path / "list.pt")
    torch.save({"model": {"blocks.0.norm1.weight": torch.ones(2)}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="neither a fine-tuned EVA classifier"):
        read_checkpoint(tmp_path / "partial.pt")
    video = create_video_classifier("eva_tiny_patch4_28", 3, num_frames=4, **small)
    save_classifier_checkpoint(ClassifierCheckpoint.from_modules(video, ["a", "b", "c"]), tmp_path / "video.pt")
    with pytest.raises(CheckpointError, match="a video classifier checkpoint"):
        read_checkpoint(tmp_path / "video.pt")


def test_an_official_file_with_an_ema_gives_the_ema_unless_asked_otherwise(tmp_path, small, perturb):
    model, ema = (perturb(create_classifier("eva_tiny_patch4_28", 3, **small), seed) for seed in (0, 1))
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict()}, tmp_path / "official.pt")
    released = read_checkpoint(tmp_path / "official.pt")
    assert torch.equal(released.state["head.weight"], ema.head.weight) and "model_ema" in released.source
    trained = read_checkpoint(tmp_path / "official.pt", use_ema=False)
    assert torch.equal(trained.state["head.weight"], model.head.weight)


def test_load_model_resamples_pos_embed_and_refuses_a_size_the_patch_does_not_divide(tmp_path, small):
    model = create_classifier("eva_tiny_patch4_28", 3, **small)
    path = save_classifier_checkpoint(ClassifierCheckpoint.from_modules(model, ["a", "b", "c"]), tmp_path / "c.pt")
    loaded = load_model(path, img_size=40)
    assert loaded.config.img_size == 40 and loaded.model.pos_embed.shape == (1, 101, 64)
    assert loaded.classes == ["a", "b", "c"] and not loaded.model.training
    with pytest.raises(CheckpointError, match="not a multiple of the checkpoint's patch size 4"):
        load_model(path, img_size=30)
