"""The space-time EVA classifier against the image classifier it is inflated from: identical frames give the image
logits, the tubelet kernel averages 2-D embeddings, the temporal pos_embed resize is linear interpolation written out
by hand, the K722 -> K400 head picks rows, and the checkpoint round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.optim import param_groups_layer_decay
from timm.optim._param_groups import group_parameters

from eva_pipeline.models import (
    VIDEO_KEY,
    CheckpointError,
    ClassifierCheckpoint,
    EvaClassifier,
    EvaVideoClassifier,
    create_classifier,
    create_model,
    create_video_classifier,
    get_config,
    get_layer_id,
    inflate_image_state,
    inflate_patch_embed_weight,
    load_classifier_checkpoint,
    load_video_start,
    resample_temporal_pos_embed,
    resample_video_pos_embed,
    save_classifier_checkpoint,
)

NAME = "eva_tiny_patch4_28"


def _image(small: dict, perturb, num_classes: int = 5, seed: int = 0, **kw) -> EvaClassifier:
    torch.manual_seed(seed)
    kw = {**small, **kw}
    return perturb(create_classifier(NAME, num_classes, freeze_patch_embed=False, **kw), seed).eval()


def _video(small: dict, num_frames: int, num_classes: int = 5, tubelet: int = 1, **kw) -> EvaVideoClassifier:
    torch.manual_seed(1)
    kw = {**small, **kw}
    return create_video_classifier(NAME, num_classes, num_frames, tubelet=tubelet, **kw).eval()


def _frames(clip: torch.Tensor, i: int) -> torch.Tensor:
    return clip[:, :, i]


# ---- forward: the inflated model on a still clip is the image model, up to the weight of the one cls key --------
def _image_with_cls_key_bias(image: EvaClassifier, frame: torch.Tensor, cls_bias: float) -> torch.Tensor:
    """The image classifier written out by hand, with ``cls_bias`` added to every query's logit for the cls key."""
    x = image._add_cls_and_pos(image.patch_embed(frame))
    bias = torch.zeros(x.shape[1])
    bias[0] = cls_bias
    for block in image.blocks:
        attn, (batch, tokens, dim) = block.attn, x.shape
        qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
        qkv = F.linear(block.norm1(x), attn.qkv.weight, qkv_bias).reshape(batch, tokens, 3, attn.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        weights = ((q * attn.scale) @ k.transpose(-2, -1) + bias).softmax(-1)
        x = x + attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))
        x = x + block.mlp(block.norm2(x))
    return image.forward_head(x)


@pytest.mark.parametrize(("num_frames", "tubelet"), [(1, 1), (2, 2), (4, 4), (2, 1), (4, 1), (4, 2)])
def test_identical_frames_give_the_image_model_with_one_cls_key_among_copies(
    small: dict, perturb, num_frames: int, tubelet: int
) -> None:
    """A still clip through the inflated model, against the image model on the frame.

    With the kernel split evenly over the tubelet (W / t per frame) a tubelet of identical frames embeds to the
    image's patch tokens, and every frame's positions are the image's: the sequence is cls + T' copies of the image's
    N tokens. Attention over T' copies of each patch key gives each copy 1/T' of the image weight, and the copies'
    values are equal, so the patch part of every output is the image's; the mean over T' x N tokens that are T' copies
    is the mean over N. The one cls key is not copied: against T' copies of the patch keys its weight is that of a
    cls logit lowered by log T'. So the logits equal the image model's exactly when T' = 1, and for T' > 1 those of the
    image model with a -log T' bias on the cls key (written out by hand here), not the plain image model's.
    """
    image = _image(small, perturb)
    video = _video(small, num_frames, tubelet=tubelet)
    report = load_video_start(video, {"model": image.state_dict()})
    assert (report.source, report.source_grid, report.head) == ("image", (1, 7, 7), "loaded")
    frames = num_frames // tubelet
    frame = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    clip = frame.unsqueeze(2).repeat(1, 1, num_frames, 1, 1)
    with torch.no_grad():
        got, plain = video(clip), image(frame)
        want = _image_with_cls_key_bias(image, frame, -float(np.log(frames)))
        assert video.forward_features(clip).shape == (2, 1 + frames * 49, small["embed_dim"])
    assert plain.abs().max() > 0.1  # perturbed weights: logits far from the 1e-3 head init
    with torch.no_grad():  # the hand-written reference without bias is the image model
        torch.testing.assert_close(_image_with_cls_key_bias(image, frame, 0.0), plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    if frames == 1:
        torch.testing.assert_close(got, plain, atol=2e-5, rtol=1e-4)
    else:
        assert (got - plain).abs().max() > 1e-3  # the cls key's weight is visibly different


def test_time_major_tokens_are_the_frames_2d_embeddings(small: dict, perturb) -> None:
    image = _image(small, perturb)
    video = _video(small, 3)
    load_video_start(video, {"model": image.state_dict()})
    clip = torch.randn(2, 3, 3, 28, 28)
    with torch.no_grad():
        tokens = video.patchify(clip)
        per_frame = [image.patch_embed(_frames(clip, i)) for i in range(3)]
    torch.testing.assert_close(tokens, torch.cat(per_frame, dim=1), atol=1e-6, rtol=0)


def test_tubelet_kernel_averages_the_2d_embeddings_of_its_frames(small: dict, perturb) -> None:
    """Conv3d with W / t repeated over t frames is linear: its output is the mean of the t frames' 2-D convolutions
    (each with the full bias), on a clip whose frames all differ."""
    image = _image(small, perturb)
    video = _video(small, 6, tubelet=3)
    load_video_start(video, {"model": image.state_dict()})
    assert video.patch_embed.proj.weight.shape == (small["embed_dim"], 3, 3, 4, 4)
    torch.testing.assert_close(video.patch_embed.proj.bias, image.patch_embed.proj.bias, atol=0, rtol=0)
    clip = torch.randn(2, 3, 6, 28, 28)
    with torch.no_grad():
        tokens = video.patchify(clip).reshape(2, 2, 49, -1)
        for k in range(2):
            mean = torch.stack([image.patch_embed(_frames(clip, 3 * k + j)) for j in range(3)]).mean(0)
            torch.testing.assert_close(tokens[:, k], mean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("num_frames", "tubelet"), [(4, 1), (8, 2)])
def test_the_inflated_model_cannot_tell_a_clip_from_its_reverse(small: dict, perturb, num_frames, tubelet) -> None:
    """Why the demo's K722 stage needs a head of normal size (README, video section): at the start, the kernel is the
    same for every frame of a tubelet and the pos_embed the same for every time step, so reversing time permutes the
    tokens (and pairs the same frames into tubelets) and the logits do not change; once the tubelet kernel or the
    per-frame pos_embed differ over time, they do. A model blind to order would have to guess "left" vs "right"."""
    image = _image(small, perturb)
    video = _video(small, num_frames, tubelet=tubelet)
    load_video_start(video, {"model": image.state_dict()})
    clip = torch.randn(2, 3, num_frames, 28, 28)
    reverse = clip.flip(2)
    with torch.no_grad():
        torch.testing.assert_close(video(reverse), video(clip), atol=1e-5, rtol=1e-5)
        if tubelet > 1:
            video.patch_embed.proj.weight[:, :, 0] += 0.05 * torch.randn_like(video.patch_embed.proj.weight[:, :, 0])
        else:
            grid = video.pos_embed.shape[1] // num_frames
            video.pos_embed[:, 1 : 1 + grid] += 0.5 * torch.randn_like(video.pos_embed[:, 1 : 1 + grid])
        assert not torch.allclose(video(reverse), video(clip), atol=1e-3, rtol=0)


def test_inflate_patch_embed_weight_formula() -> None:
    weight = torch.randn(4, 3, 2, 2)
    out = inflate_patch_embed_weight(weight, 2)
    assert out.shape == (4, 3, 2, 2, 2)
    assert torch.equal(out[:, :, 0], weight / 2) and torch.equal(out[:, :, 1], weight / 2)


# ---- pos_embed ----------------------------------------------------------------------------------------------------
def test_temporal_resize_is_linear_interpolation_by_hand() -> None:
    """2 -> 4 positions, align_corners=False: sources at -0.25, 0.25, 0.75, 1.25, clamped at the ends."""
    cls, p0, p1 = torch.randn(3, 1, 1, 5).unbind(0)
    n = 3  # patches per frame; each frame's tokens differ by a row offset
    frame0 = p0.expand(1, n, 5) + torch.arange(n).view(1, n, 1)
    frame1 = p1.expand(1, n, 5) - torch.arange(n).view(1, n, 1)
    pos = torch.cat((cls, frame0, frame1), dim=1)
    out = resample_temporal_pos_embed(pos, n, 4)
    want = [frame0, 0.75 * frame0 + 0.25 * frame1, 0.25 * frame0 + 0.75 * frame1, frame1]
    torch.testing.assert_close(out, torch.cat((cls, *want), dim=1), atol=1e-6, rtol=0)


def test_temporal_resize_8_to_16_matches_trilinear_on_the_grid() -> None:
    """The official resize, written independently: (1, D, T, g, g) grid, F.interpolate trilinear to (16, g, g)."""
    g, dim = 3, 6
    pos = torch.randn(1, 1 + 8 * g * g, dim)
    grid = pos[:, 1:].reshape(1, 8, g, g, dim).permute(0, 4, 1, 2, 3)
    want = F.interpolate(grid, size=(16, g, g), mode="trilinear", align_corners=False)
    want = torch.cat((pos[:, :1], want.permute(0, 2, 3, 4, 1).reshape(1, 16 * g * g, dim)), dim=1)
    out = resample_temporal_pos_embed(pos, g * g, 16)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    # Frame 0 of 16 sits at source -0.25 (clamped): frame 0; frame 1 at 0.25: 3/4 frame 0 + 1/4 frame 1.
    per_frame = pos[:, 1:].reshape(8, g * g, dim)
    torch.testing.assert_close(out[0, 1 : 1 + g * g], per_frame[0], atol=1e-6, rtol=0)
    mid = 0.75 * per_frame[0] + 0.25 * per_frame[1]
    torch.testing.assert_close(out[0, 1 + g * g : 1 + 2 * g * g], mid, atol=1e-6, rtol=0)
    assert resample_temporal_pos_embed(pos, g * g, 8) is pos  # identity when equal
    with pytest.raises(CheckpointError, match="not a whole number of frames of 5"):
        resample_temporal_pos_embed(pos, 5, 16)


def test_load_from_a_video_checkpoint_of_another_frame_count(small: dict, perturb) -> None:
    """K722 (8 frames) -> K400 (16 frames): pos_embed resized over time, every other tensor copied."""
    source = perturb(_video(small, 8), 2)
    target = _video(small, 16)
    report = load_video_start(target, {"model": source.state_dict()})
    assert (report.source, report.source_grid, report.head) == ("video", (8, 7, 7), "loaded")
    want = resample_temporal_pos_embed(source.pos_embed.detach(), 49, 16)
    torch.testing.assert_close(target.pos_embed.detach(), want, atol=0, rtol=0)
    src = source.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in target.state_dict().items() if k != "pos_embed")


def test_video_checkpoint_at_another_image_size_is_resized_trilinearly(small: dict, perturb) -> None:
    """The official resize for a new frame count and size is one trilinear interpolation on (T, g, g); the frame
    count must then be known (the grid cannot be told from the token count alone)."""
    source = perturb(_video(small, 4, img_size=20), 2)  # 5x5 grid, 100 positions: not whole 7x7 frames
    target = _video(small, 2)
    with pytest.raises(CheckpointError, match="pass source_frames"):
        load_video_start(target, {"model": source.state_dict()})
    report = load_video_start(target, {"model": source.state_dict()}, source_frames=4)
    assert report.source_grid == (4, 5, 5)
    want = resample_video_pos_embed(source.pos_embed.detach(), (4, 5, 5), (2, 7, 7))
    grid = source.pos_embed.detach()[:, 1:].reshape(1, 4, 5, 5, -1).permute(0, 4, 1, 2, 3)
    direct = F.interpolate(grid, size=(2, 7, 7), mode="trilinear", align_corners=False)
    torch.testing.assert_close(want[:, 1:], direct.permute(0, 2, 3, 4, 1).reshape(1, 98, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(target.pos_embed.detach(), want, atol=0, rtol=0)


def test_image_grid_is_resized_bicubically_before_repeating(small: dict, perturb) -> None:
    image = _image(small, perturb)  # 7x7
    video = _video(small, 2, img_size=40)  # 10x10
    load_video_start(video, {"model": image.state_dict()})
    spatial = resample_abs_pos_embed(
        image.pos_embed.detach(), new_size=[10, 10], num_prefix_tokens=1, antialias=False
    )  # the EVA fine-tune resize, as load_official_checkpoint
    want = torch.cat((spatial[:, :1], spatial[:, 1:], spatial[:, 1:]), dim=1)
    torch.testing.assert_close(video.pos_embed.detach(), want, atol=1e-6, rtol=0)


def test_inflate_image_state_keys_and_refusals(small: dict, perturb) -> None:
    state = _image(small, perturb).state_dict()
    out = inflate_image_state(state, 4, tubelet=2)
    assert out.keys() == state.keys()
    assert out["pos_embed"].shape == (1, 1 + 2 * 49, small["embed_dim"])
    assert torch.equal(out["pos_embed"][:, 1:50], state["pos_embed"][:, 1:])
    assert torch.equal(out["pos_embed"][:, 50:], state["pos_embed"][:, 1:])
    assert all(torch.equal(out[k], v) for k, v in state.items() if k not in ("pos_embed", "patch_embed.proj.weight"))
    with pytest.raises(CheckpointError, match="needs no inflation"):
        inflate_image_state(out, 4, tubelet=2)
    with pytest.raises(ValueError, match="num_frames 5 is not divisible by tubelet 2"):
        inflate_image_state(state, 5, tubelet=2)


def test_mim_start_keeps_fresh_head_and_fc_norm(small: dict, perturb) -> None:
    mim = perturb(create_model(NAME, **small))
    video = _video(small, 2)
    fresh = {k: v.clone() for k, v in video.state_dict().items()}
    report = load_video_start(video, {"model": mim.state_dict()})
    assert report.head == "new"
    assert sorted(report.load.missing_keys) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert {"mask_token", "lm_head.weight", "norm.weight"} <= set(report.load.unexpected_keys)
    assert torch.equal(video.head.weight, fresh["head.weight"])
    torch.testing.assert_close(video.blocks[1].mlp.fc2.weight, mim.blocks[1].mlp.fc2.weight, atol=0, rtol=0)


# ---- head ---------------------------------------------------------------------------------------------------------
def test_class_index_picks_the_head_rows(small: dict, perturb) -> None:
    """K722 -> K400: target class j gets source row class_index[j]; on a still clip the logits are the (cls-key
    adjusted) image model's, indexed."""
    image = _image(small, perturb, num_classes=7)
    index = [5, 0, 3]
    for given in (index, np.asarray(index), torch.tensor(index)):
        video = _video(small, 2, num_classes=3)
        report = load_video_start(video, {"model": image.state_dict()}, class_index=given)
        assert report.head == "indexed"
        assert torch.equal(video.head.weight, image.head.weight[index])
        assert torch.equal(video.head.bias, image.head.bias[index])
    frame = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        got = video(frame.unsqueeze(2).repeat(1, 1, 2, 1, 1))
        want = _image_with_cls_key_bias(image, frame, -float(np.log(2)))[:, index]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_reinit_head_keeps_the_fresh_head(small: dict, perturb) -> None:
    image = _image(small, perturb, num_classes=7)
    video = _video(small, 2, num_classes=3)
    fresh = video.head.weight.detach().clone()
    assert load_video_start(video, {"model": image.state_dict()}, reinit_head=True).head == "reinitialised"
    assert torch.equal(video.head.weight, fresh)
    assert torch.equal(video.fc_norm.weight, image.fc_norm.weight)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"head has 7 classes, the model 3: pass class_index"),
        (
            {"class_index": [5, 0, 7]},
            r"out of range for a checkpoint head of 7 rows \(valid 0\.\.6\): 'class 2 -> row 7'",
        ),
        ({"class_index": [-1, 0, 1]}, r"'class 0 -> row -1'"),
        ({"class_index": [1, 2]}, "class_index has 2 entries but the model has 3 classes"),
        ({"class_index": [True, False, True]}, "a boolean mask is not accepted"),
        ({"class_index": [0.0, 1.0, 2.0]}, "integer rows"),
        ({"class_index": [0, 1, 2], "reinit_head": True}, "not both"),
    ],
)
def test_bad_head_choices_are_refused(small: dict, perturb, kwargs: dict, match: str) -> None:
    image = _image(small, perturb, num_classes=7)
    video = _video(small, 2, num_classes=3)
    before = {k: v.clone() for k, v in video.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_video_start(video, {"model": image.state_dict()}, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in video.state_dict().items())  # nothing half-loaded


def test_class_index_needs_a_head(small: dict) -> None:
    with pytest.raises(CheckpointError, match="checkpoint has no head"):
        load_video_start(
            _video(small, 2, 3), {"model": create_model(NAME, **small).state_dict()}, class_index=[0, 1, 2]
        )


# ---- other refusals -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source_overrides", "match"),
    [
        ({"depth": 3}, "checkpoint is a model of depth 3 and width 64, EvaVideoClassifier has depth 2 and width 64"),
        ({"embed_dim": 32, "num_heads": 2, "mlp_hidden_dim": 128}, "depth 2 and width 32, .* depth 2 and width 64"),
    ],
)
def test_checkpoint_of_another_model_size_is_refused(small: dict, perturb, source_overrides: dict, match: str) -> None:
    image = _image(small, perturb, **source_overrides)
    with pytest.raises(CheckpointError, match=match):
        load_video_start(_video(small, 2), {"model": image.state_dict()})


def test_unknown_or_missing_keys_are_refused(small: dict, perturb) -> None:
    state = dict(_image(small, perturb).state_dict())
    with pytest.raises(CheckpointError, match="unexpected in checkpoint: 'rel_pos_bias'"):
        load_video_start(_video(small, 2), {"model": {**state, "rel_pos_bias": torch.zeros(3)}})
    del state["blocks.1.attn.q_bias"]
    with pytest.raises(CheckpointError, match=r"missing from checkpoint: 'blocks\.1\.attn\.q_bias'"):
        load_video_start(_video(small, 2), {"model": state})


def test_video_checkpoint_of_another_tubelet_is_refused(small: dict, perturb) -> None:
    source = perturb(_video(small, 4, tubelet=2))
    with pytest.raises(CheckpointError, match="checkpoint has tubelet 2, the model 1"):
        load_video_start(_video(small, 4), {"model": source.state_dict()})


def test_clip_shape_errors_name_the_layout(small: dict) -> None:
    video = _video(small, 4)
    with pytest.raises(ValueError, match=r"\(batch, 3, 4, 28, 28\), got \(2, 4, 3, 28, 28\).*transpose\(1, 2\)"):
        video(torch.zeros(2, 4, 3, 28, 28))
    with pytest.raises(ValueError, match=r"got \(2, 3, 8, 28, 28\)$"):
        video(torch.zeros(2, 3, 8, 28, 28))
    with pytest.raises(ValueError, match=r"got \(2, 3, 28, 28\)"):
        video(torch.zeros(2, 3, 28, 28))


def test_construction_errors(small: dict) -> None:
    with pytest.raises(ValueError, match="img_size 30 is not divisible by the patch size 4 of eva_tiny_patch4_28"):
        create_video_classifier(NAME, 3, 4, img_size=30, **{k: v for k, v in small.items() if k != "img_size"})
    with pytest.raises(ValueError, match="num_frames 6 is not divisible by tubelet 4"):
        _video(small, 6, tubelet=4)
    with pytest.raises(ValueError, match="num_frames must be a positive int, got 0"):
        _video(small, 0)


# ---- module contract ----------------------------------------------------------------------------------------------
def test_state_dict_has_the_official_keys(small: dict, perturb) -> None:
    video, image = _video(small, 4, tubelet=2), _image(small, perturb)
    assert list(video.state_dict()) == list(image.state_dict())  # same names, same order
    shapes = {k: tuple(v.shape) for k, v in video.state_dict().items()}
    assert shapes["patch_embed.proj.weight"] == (64, 3, 2, 4, 4)
    assert shapes["pos_embed"] == (1, 1 + 2 * 49, 64)
    image_shapes = {k: tuple(v.shape) for k, v in image.state_dict().items()}
    assert {k for k in shapes if shapes[k] != image_shapes[k]} == {"patch_embed.proj.weight", "pos_embed"}


def test_init_covers_the_conv3d(small: dict) -> None:
    video = _video(small, 2)
    weight, std = video.patch_embed.proj.weight, video.config.init_std
    assert weight.abs().max() <= std and weight.std() > 0.3 * std  # EVA's +-1 sigma trunc-normal, not PyTorch's
    assert torch.equal(video.patch_embed.proj.bias, torch.zeros_like(video.patch_embed.proj.bias))
    assert video.pos_embed.abs().max() <= std and video.pos_embed.std() > 0.3 * std
    assert 0.5 * 0.02e-3 < video.head.weight.std() < 1.5 * 0.02e-3  # trunc-normal 0.02 scaled by 1e-3


def test_giant_video_parameter_count_on_meta() -> None:
    with torch.device("meta"):
        image = create_classifier("eva_giant_patch14_224", 400)
        video = create_video_classifier("eva_giant_patch14_224", 400, 16, drop_path_rate=0.2)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(video) == count(image) + 15 * 256 * 1408  # 15 more frames of positions, tubelet-1 kernel same size


def test_layer_decay_groups_match_the_image_model(small: dict, perturb) -> None:
    """timm's groups from our group_matcher: each parameter gets the same scale and decay as in the image model
    (embeddings 0, blocks i + 1, rest depth + 1), the trained Conv3d kernel included."""
    depth, decay = small["depth"], 0.75

    def scales(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
        groups = param_groups_layer_decay(
            model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=decay
        )
        name_of = {id(p): n for n, p in model.named_parameters()}
        return {name_of[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}

    video, image = _video(small, 4), _image(small, perturb)
    got, want = scales(video), scales(image)
    assert got == want and len(got) == len(list(video.parameters()))
    assert got["patch_embed.proj.weight"] == (pytest.approx(decay ** (depth + 1)), 0.05)
    layer_of = group_parameters(video, video.group_matcher(), reverse=True)
    assert all(layer_of[n] == get_layer_id(n, depth) for n, _ in video.named_parameters())


def test_backward_trains_the_patch_embedding(small: dict) -> None:
    direct = EvaVideoClassifier(get_config(NAME, **small), 5, num_frames=2)
    assert all(p.requires_grad for p in direct.patch_embed.parameters()) and not direct.detach_patch_embed
    video = _video(small, 2).train()
    assert all(p.requires_grad for p in video.patch_embed.parameters())
    video(torch.randn(2, 3, 2, 28, 28)).square().sum().backward()
    assert video.patch_embed.proj.weight.grad is not None and video.patch_embed.proj.weight.grad.abs().sum() > 0
    assert video.pos_embed.grad.abs().sum() > 0
    frozen = create_video_classifier(NAME, 5, 2, freeze_patch_embed=True, **small).train()
    frozen(torch.randn(2, 3, 2, 28, 28)).square().sum().backward()
    assert not frozen.patch_embed.proj.weight.requires_grad and frozen.patch_embed.proj.weight.grad is None


def test_grad_checkpointing_gives_the_same_gradients(small: dict, perturb) -> None:
    clip = torch.randn(2, 3, 2, 28, 28)
    grads = []
    for enable in (False, True):
        video = perturb(_video(small, 2)).train()
        video.set_grad_checkpointing(enable)
        video(clip).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in video.named_parameters()})
    assert all(torch.allclose(grads[1][n], g, atol=1e-6, rtol=1e-5) for n, g in grads[0].items())


def test_drop_path_rates_follow_the_config(small: dict) -> None:
    video = create_video_classifier(NAME, 5, 2, **{**small, "drop_path_rate": 0.2})
    assert [float(getattr(b.drop_path, "drop_prob", 0.0)) for b in video.blocks] == pytest.approx([0.0, 0.2])
    video.train()
    clip = torch.randn(4, 3, 2, 28, 28)
    torch.manual_seed(0)
    first = video(clip)
    torch.manual_seed(1)
    assert not torch.allclose(first, video(clip))  # the last block's residual branch is dropped per sample


def test_sdpa_equals_eager_in_fp32(small: dict, perturb) -> None:
    eager = perturb(_video(small, 2))
    sdpa = _video(small, 2, attn_impl="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    clip = torch.randn(2, 3, 2, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(clip), eager(clip), atol=1e-5, rtol=1e-5)


# ---- checkpoint ---------------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_rebuilds_the_video_classifier(small: dict, perturb, tmp_path) -> None:
    video, ema = (
        perturb(_video(small, 4, tubelet=2, num_classes=3)),
        perturb(_video(small, 4, tubelet=2, num_classes=3), 1),
    )
    ckpt = ClassifierCheckpoint.from_modules(video, ["a", "b", "c"], ema)
    assert ckpt.video == {"num_frames": 4, "tubelet": 2}
    assert ckpt.to_dict()[VIDEO_KEY] == {"num_frames": 4, "tubelet": 2}
    loaded = load_classifier_checkpoint(save_classifier_checkpoint(ckpt, tmp_path / "video.pt"))
    assert loaded.video == ckpt.video and loaded.classes == ["a", "b", "c"]
    rebuilt = loaded.classifier()
    assert isinstance(rebuilt, EvaVideoClassifier) and (rebuilt.num_frames, rebuilt.tubelet) == (4, 2)
    clip = torch.randn(2, 3, 4, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(clip), ema.eval()(clip), atol=0, rtol=0)  # the EMA is released
        torch.testing.assert_close(loaded.classifier(use_ema=False)(clip), video.eval()(clip), atol=0, rtol=0)


def test_image_checkpoints_stay_as_they_were(small: dict, perturb) -> None:
    ckpt = ClassifierCheckpoint.from_modules(_image(small, perturb, num_classes=2), ["a", "b"])
    assert ckpt.video is None and VIDEO_KEY not in ckpt.to_dict()
    rebuilt = ClassifierCheckpoint.from_dict(ckpt.to_dict()).classifier()
    assert type(rebuilt) is EvaClassifier


def test_checkpoint_video_entry_must_fit_the_weights(small: dict, perturb) -> None:
    video_state = ClassifierCheckpoint.from_modules(_video(small, 2, num_classes=2), ["a", "b"]).to_dict()
    image_state = ClassifierCheckpoint.from_modules(_image(small, perturb, num_classes=2), ["a", "b"]).to_dict()
    with pytest.raises(CheckpointError, match=r"image \(no video entry\) classifier but its patch_embed"):
        ClassifierCheckpoint.from_dict({k: v for k, v in video_state.items() if k != VIDEO_KEY})
    with pytest.raises(CheckpointError, match=r"is a video .* shape \(64, 3, 4, 4\)"):
        ClassifierCheckpoint.from_dict({**image_state, VIDEO_KEY: {"num_frames": 2, "tubelet": 1}})
    with pytest.raises(CheckpointError, match="num_frames 3 is not divisible by tubelet 2"):
        ClassifierCheckpoint.from_dict({**video_state, VIDEO_KEY: {"num_frames": 3, "tubelet": 2}})
    with pytest.raises(CheckpointError, match="exactly"):
        ClassifierCheckpoint.from_dict({**video_state, VIDEO_KEY: {"num_frames": 2}})


def test_start_from_a_saved_video_checkpoint_reads_its_frame_count(small: dict, perturb, tmp_path) -> None:
    """A K722-like file (8 frames, 7 classes) -> a 4-frame, 3-class model by class_index: frames from the file."""
    source = perturb(_video(small, 8, num_classes=7))
    path = save_classifier_checkpoint(ClassifierCheckpoint.from_modules(source, list("abcdefg")), tmp_path / "k722.pt")
    target = _video(small, 4, num_classes=3)
    report = load_video_start(target, path, class_index=[6, 2, 0])
    assert (report.source, report.source_grid, report.head) == ("video", (8, 7, 7), "indexed")
    assert torch.equal(target.head.weight, source.head.weight[[6, 2, 0]])
    want = resample_temporal_pos_embed(source.pos_embed.detach(), 49, 4)
    torch.testing.assert_close(target.pos_embed.detach(), want, atol=0, rtol=0)


def test_config_and_registry_agree(small: dict) -> None:
    video = _video(small, 2)
    assert video.config == get_config(NAME, **small)
    assert video.video == {"num_frames": 2, "tubelet": 1}
    assert (video.temporal_size, video.num_patches_per_frame, video.num_patches) == (2, 49, 98)
