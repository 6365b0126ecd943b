"""Official EVA-01 checkpoint I/O: fp16 {"model": ...}, wrappers, clear mismatch errors, pos_embed resample."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eva_pipeline.models import (
    CheckpointError,
    EvaMIM,
    create_classifier,
    create_model,
    load_official_checkpoint,
    save_official_checkpoint,
)


@pytest.fixture
def trained(small: dict, perturb: Callable) -> EvaMIM:
    torch.manual_seed(0)
    return perturb(create_model("eva_tiny_patch4_28", **small)).eval()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    return torch.randn(2, 3, 28, 28, generator=gen), torch.rand(2, 49, generator=gen) < 0.4


def test_round_trip_fp16(tmp_path: Path, small: dict, trained: EvaMIM, batch) -> None:
    path = save_official_checkpoint(trained, tmp_path / "sub" / "eva.pt")
    assert path.exists() and sorted(p.name for p in path.parent.iterdir()) == ["eva.pt"]  # no temp file left
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert list(raw) == ["model"]
    assert list(raw["model"]) == list(trained.state_dict())
    assert all(v.dtype == torch.float16 for v in raw["model"].values())

    torch.manual_seed(123)
    fresh = create_model("eva_tiny_patch4_28", **small).eval()
    report = load_official_checkpoint(fresh, path)
    assert report.missing_keys == report.unexpected_keys == report.resampled_keys == []
    assert all(p.dtype == torch.float32 for p in fresh.parameters())  # cast to the model's dtype
    # Exactly the fp16-rounded weights, and outputs within fp16 tolerance of the original.
    for k, v in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v.half().float()), k
    images, mask = batch
    with torch.no_grad():
        want, got = trained(images, mask), fresh(images, mask)
    assert (want - got).abs().max().item() < 5e-3 * want.abs().max().item()


@pytest.mark.parametrize("wrapper", ["model", "module", "model_ema", None, "ddp_prefix"])
def test_wrappers_accepted(small: dict, trained: EvaMIM, wrapper: str | None) -> None:
    state = trained.state_dict()
    if wrapper is None:
        ckpt = state
    elif wrapper == "ddp_prefix":
        ckpt = {"module": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    else:
        ckpt = {wrapper: state, "epoch": 3}
    fresh = create_model("eva_tiny_patch4_28", **small)
    load_official_checkpoint(fresh, ckpt)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path, trained: EvaMIM, monkeypatch) -> None:
    path = save_official_checkpoint(trained, tmp_path / "eva.pt")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_official_checkpoint(trained, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["eva.pt"]


def test_shape_mismatch_names_keys_and_shapes(small: dict, trained: EvaMIM) -> None:
    wider = create_model("eva_tiny_patch4_28", **dict(small, embed_dim=96, num_heads=4))
    with pytest.raises(CheckpointError) as info:
        load_official_checkpoint(wider, trained.state_dict())
    msg = str(info.value)
    assert "blocks.0.attn.qkv.weight: expected (288, 96), got (192, 64)" in msg
    assert "lm_head.weight: expected (768, 96), got (768, 64)" in msg
    assert "pos_embed: expected (1, 50, 96), got (1, 50, 64)" in msg


def test_missing_and_unexpected_keys_listed(small: dict, trained: EvaMIM) -> None:
    state = trained.state_dict()
    state.pop("mask_token")
    state["blocks.0.attn.k_bias"] = torch.zeros(64)
    fresh = create_model("eva_tiny_patch4_28", **small)
    with pytest.raises(
        CheckpointError,
        match=r"(?s)missing.*mask_token: expected \(1, 1, 64\).*"
        r"unexpected.*blocks\.0\.attn\.k_bias: got \(64,\)",
    ):
        load_official_checkpoint(fresh, state)
    report = load_official_checkpoint(fresh, state, strict=False)
    assert report.missing_keys == ["mask_token"] and report.unexpected_keys == ["blocks.0.attn.k_bias"]


def test_mim_into_larger_classifier_resamples_pos_embed(small: dict, trained: EvaMIM) -> None:
    clf = create_classifier(
        "eva_tiny_patch4_28", 10, img_size=40, **{k: v for k, v in small.items() if k != "img_size"}
    )
    assert clf.pos_embed.shape == (1, 1 + 100, 64)
    with pytest.raises(CheckpointError, match=r"pos_embed: expected \(1, 101, 64\), got \(1, 50, 64\)"):
        load_official_checkpoint(clf, trained.state_dict(), strict=False)

    report = load_official_checkpoint(clf, {"model": trained.state_dict()}, strict=False, resample_pos_embed=True)
    assert report.resampled_keys == ["pos_embed"]
    assert report.missing_keys == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report.unexpected_keys == ["lm_head.bias", "lm_head.weight", "mask_token", "norm.bias", "norm.weight"]
    old = trained.pos_embed.detach()
    grid = old[:, 1:].reshape(1, 7, 7, 64).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(10, 10), mode="bicubic", align_corners=False)  # the EVA code's resize
    want = want.permute(0, 2, 3, 1).reshape(1, 100, 64)
    assert torch.equal(clf.pos_embed[:, :1], old[:, :1])
    assert torch.allclose(clf.pos_embed[:, 1:], want, atol=1e-6)
    assert torch.equal(clf.blocks[1].mlp.fc2.weight, trained.blocks[1].mlp.fc2.weight)
    # The frozen patch embedding stays frozen after loading.
    assert not clf.patch_embed.proj.weight.requires_grad


def test_not_a_checkpoint(small: dict) -> None:
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_official_checkpoint(create_model("eva_tiny_patch4_28", **small), {"epoch": 3, "args": "x"})
