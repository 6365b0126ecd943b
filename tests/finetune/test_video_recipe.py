"""The video stages' recipe: clips and labels from the clip manifest, the classifier at the stage's frames, its start
weights (inflated image weights; K722 head rows by the class mapping), and a short training run through the image
stages' loop with CutMix on clips."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from video_fakes import FakeDecode

from eva_pipeline.config import ModelParams, VideoFinetuneParams
from eva_pipeline.finetune.video import (
    NORMALISATION,
    clip_rows,
    dataset_classes,
    head_rows,
    make_video_classifier,
    start_from_image,
    start_from_k722,
    train_clips,
)
from eva_pipeline.models import ClassifierCheckpoint, EvaVideoClassifier, create_classifier, create_model
from eva_pipeline.pipelines.finetune_common import fit

SMALL = {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_hidden_dim": 64}
STUDENT = ModelParams(name="eva_tiny_patch4_28", overrides=SMALL)
MAPPING = {
    "k722_classes": ["a", "b", "c", "d"],
    "versions": {
        "v1": {"classes": ["b", "d"], "k722_index": [1, 3]},
        "v2": {"classes": ["a", "c", "d"], "k722_index": [0, 2, 3]},
    },
}


def _params(**changes) -> VideoFinetuneParams:
    base = {
        "data": {"dataset": "k722"},
        "num_frames": 4,
        "img_size": 12,
        "optimizer": {"lr": 1e-3, "min_lr": 0.0, "weight_decay": 0.05, "layer_decay": 0.75, "warmup_epochs": 0},
        "augmentation": {"hflip": False},
        "epochs": 1,
        "batch_size": 4,
        "device": "cpu",
        "drop_path_rate": 0.0,
        "checkpoint": {"every_steps": 100},
    }
    return VideoFinetuneParams.model_validate({**base, **changes})


def _manifest() -> pd.DataFrame:
    rows = []
    for dataset, split, labels in (("k722", "train", [0, 1, 2, 3, 0, 1, 2, 3]), ("k722", "validate", [3, 2]),
                                   ("v1", "train", [0, 1, 1])):  # fmt: skip
        for i, label in enumerate(labels):
            rows.append({"dataset": dataset, "split": split, "clip_id": f"{dataset}{split}{i}", "label": label,
                         "path": f"v{len(rows)}.mp4", "num_frames": 16})  # fmt: skip
    return pd.DataFrame(rows)


def test_classes_and_head_rows_come_from_the_mapping() -> None:
    assert dataset_classes(MAPPING, "k722") == ["a", "b", "c", "d"]
    assert dataset_classes(MAPPING, "v2") == ["a", "c", "d"]
    rows = head_rows(MAPPING, "v2")
    assert [MAPPING["k722_classes"][i] for i in rows] == dataset_classes(MAPPING, "v2")  # rows by name
    with pytest.raises(ValueError, match="no dataset 'v9'"):
        dataset_classes(MAPPING, "v9")
    with pytest.raises(ValueError, match="target 'k722' is not a version"):
        head_rows(MAPPING, "k722")


def test_clip_rows_select_one_dataset_split_with_a_budget() -> None:
    manifest = _manifest()
    rows, labels = clip_rows(manifest, "k722", "train", per_class=1)
    assert labels.tolist() == [0, 1, 2, 3] and rows["clip_id"].tolist() == [f"k722train{i}" for i in range(4)]
    rows, labels = clip_rows(manifest, "k722", "train", keep=3)
    assert rows["clip_id"].tolist() == ["k722train0", "k722train4", "k722train7"]  # evenly spaced: 0, 3.5 -> 4, 7
    assert labels.tolist() == [0, 0, 3]
    with pytest.raises(ValueError, match="no 'test' clips of 'k722'"):
        clip_rows(manifest, "k722", "test")
    unlabelled = manifest.assign(label=-1)
    with pytest.raises(ValueError, match="have no label"):
        clip_rows(unlabelled, "v1", "train")


def test_the_classifier_has_the_stage_frames_size_and_trains_its_patch_embedding() -> None:
    model = make_video_classifier(_params(), STUDENT, 4)
    assert isinstance(model, EvaVideoClassifier) and model.num_frames == 4 and model.config.img_size == 12
    assert model.patch_embed.proj.weight.requires_grad  # EVA's video fine-tunes train it
    assert model(torch.zeros(2, 3, 4, 12, 12)).shape == (2, 4)
    with pytest.raises(ValueError, match="divisible"):
        make_video_classifier(_params(img_size=13), STUDENT, 4)


def test_a_student_start_is_the_image_model_on_a_one_frame_clip() -> None:
    """From the MIM weights, a 1-frame clip through the inflated model equals the image classifier on that frame
    (same fresh head and fc_norm: both seeded alike)."""
    torch.manual_seed(1)
    mim = create_model("eva_tiny_patch4_28", **SMALL)
    state = mim.state_dict()
    torch.manual_seed(2)
    video = make_video_classifier(_params(num_frames=1, img_size=28), STUDENT, 4)
    torch.manual_seed(2)
    image = create_classifier("eva_tiny_patch4_28", 4, **SMALL, drop_path_rate=0.0)
    start_from_image(video, state)
    image.load_state_dict({k: v for k, v in state.items() if k in image.state_dict()}, strict=False)
    image.head.load_state_dict(video.head.state_dict())
    image.fc_norm.load_state_dict(video.fc_norm.state_dict())
    frames = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(video.eval()(frames[:, :, None]), image.eval()(frames), atol=1e-5, rtol=1e-5)
    assert not torch.equal(video.blocks[0].attn.qkv.weight, make_video_classifier(_params(), STUDENT, 4).blocks[0]
                           .attn.qkv.weight)  # fmt: skip


def test_a_target_start_takes_the_k722_head_rows_of_its_classes() -> None:
    torch.manual_seed(0)
    k722 = make_video_classifier(_params(num_frames=2), STUDENT, 4)
    with torch.no_grad():
        k722.head.weight.copy_(torch.arange(4.0)[:, None].expand(4, 32))
        k722.head.bias.copy_(torch.arange(4.0) * 10)
    checkpoint = ClassifierCheckpoint.from_modules(k722, MAPPING["k722_classes"])
    target = make_video_classifier(_params(num_frames=4), STUDENT, 3)
    start_from_k722(target, checkpoint, head_rows(MAPPING, "v2"))
    assert target.head.bias.tolist() == [0.0, 20.0, 30.0]  # rows of a, c, d
    assert target.pos_embed.shape[1] == 1 + 4 * 9  # resized over time: 2 -> 4 frames of a 3x3 grid
    torch.testing.assert_close(target.blocks[1].mlp.fc1.weight, k722.blocks[1].mlp.fc1.weight)


def test_normalisations_are_imagenet_and_clip() -> None:
    assert NORMALISATION["imagenet"][0] == pytest.approx((0.485, 0.456, 0.406))
    assert NORMALISATION["clip"][0] == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_a_short_run_with_cutmix_on_clips_trains_and_resumes(tmp_path) -> None:
    """The image loop on clips: CutMix (B, C, T, H, W) -> soft targets, a finite loss, a checkpoint with its video
    entry; run again, it resumes at the end and trains nothing."""
    manifest = _manifest()
    params = _params(mixing={"cutmix_alpha": 1.0, "mixup_alpha": 0.8, "label_smoothing": 0.1}, epochs=2)
    rows, labels = clip_rows(manifest, "k722", "train")
    torch.manual_seed(0)
    model = make_video_classifier(params, STUDENT, 4)
    dataset = train_clips(rows, labels, params)
    dataset.clips.decode = FakeDecode(height=16, width=20)
    before = model.patch_embed.proj.weight.detach().clone()
    checkpoint, history, summary = fit("video", params, model, list("abcd"), dataset, None, "id", tmp_path)
    assert [r["step"] for r in history] == [1, 2, 3, 4] and np.isfinite([r["loss"] for r in history]).all()
    assert not torch.equal(before, checkpoint.model["patch_embed.proj.weight"])
    assert checkpoint.video == {"num_frames": 4, "tubelet": 1} and summary["steps"] == 4
    model = make_video_classifier(params, STUDENT, 4)
    _, again, _ = fit("video", params, model, list("abcd"), dataset, None, "id", tmp_path)
    assert again == history  # resumed at the last step: the whole run's records, nothing retrained


def test_the_stage_head_init_scale_reaches_the_video_head() -> None:
    """``head_init_scale`` (EVA's --init_scale) sets the new K722 head's std: 0.02 x scale."""
    stds = {}
    for scale in (1e-3, 1.0):
        torch.manual_seed(0)
        model = make_video_classifier(_params(head_init_scale=scale), STUDENT, 600)
        stds[scale] = model.head.weight.std().item()
    assert stds[1.0] / 0.02 == pytest.approx(1.0, abs=0.05)
    assert stds[1.0] / stds[1e-3] == pytest.approx(1000.0, rel=1e-4)
    with pytest.raises(ValueError, match="head_init_scale"):
        _params(head_init_scale=0.0)
