"""to_model_input: CLIP normalisation checked numerically, channel replication, resize only when needed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eva_pipeline.loader.transforms import CLIP_MEAN, CLIP_STD, to_model_input

MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def _random_uint8(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_extreme_pixels_map_to_clip_values() -> None:
    images = torch.zeros((2, 1, 4, 4), dtype=torch.uint8)
    images[0] = 255
    out = to_model_input(images, 4)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    for c in range(3):
        assert torch.allclose(out[0, c], torch.full((4, 4), (1 - CLIP_MEAN[c]) / CLIP_STD[c]), atol=1e-6)
        assert torch.allclose(out[1, c], torch.full((4, 4), -CLIP_MEAN[c] / CLIP_STD[c]), atol=1e-6)
    assert abs(out[0, 0, 0, 0].item() - 1.9303361) < 1e-5  # (1 - 0.48145466) / 0.26862954


def test_grayscale_is_replicated_and_normalised_exactly() -> None:
    images = _random_uint8(37, 1, 7, 7)
    out = to_model_input(images, 7, chunk_size=5)
    pixels = out * STD + MEAN  # back to [0, 1]: all three channels are the same image
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-6)
    assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-6)
    assert torch.allclose(pixels[:, 0], images[:, 0].float() / 255, atol=1e-6)
    expected = (images.float() / 255 - MEAN) / STD
    assert torch.allclose(out, expected, atol=1e-6)


def test_rgb_channels_keep_their_statistics() -> None:
    images = _random_uint8(5, 3, 8, 8, seed=3)
    out = to_model_input(images, 8)
    assert torch.allclose(out, (images.float() / 255 - MEAN) / STD, atol=1e-6)


def test_resize_only_when_size_differs(monkeypatch) -> None:
    calls = []
    real = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(k) or real(*a, **k))
    images = _random_uint8(10, 1, 28, 28)
    to_model_input(images, 28)
    assert calls == []
    out = to_model_input(images, 56, chunk_size=4)
    assert out.shape == (10, 3, 56, 56) and len(calls) == 3  # 3 chunks
    assert calls[0]["mode"] == "bicubic" and calls[0]["antialias"] is True
    reference = real(images.float(), size=(56, 56), mode="bicubic", antialias=True, align_corners=False)
    reference = (reference.clamp(0, 255).round() / 255 - MEAN) / STD
    assert torch.allclose(out, reference, atol=1e-5)


def test_resize_preserves_constant_images_and_value_range() -> None:
    images = torch.full((3, 1, 28, 28), 200, dtype=torch.uint8)
    images[1] = 0
    images[2, :, ::2] = 255  # stripes overshoot under bicubic: clamped back to the pixel range
    for size in (14, 224):
        out = to_model_input(images, size)
        pixels = (out * STD + MEAN) * 255
        assert torch.allclose(pixels[0], torch.full_like(pixels[0], 200.0), atol=1e-3)
        assert torch.allclose(pixels[1], torch.zeros_like(pixels[1]), atol=1e-3)
        assert pixels[2].min() >= -1e-3 and pixels[2].max() <= 255 + 1e-3


def test_chunking_does_not_change_results() -> None:
    images = _random_uint8(23, 1, 28, 28, seed=5)
    assert torch.equal(to_model_input(images, 32, chunk_size=4), to_model_input(images, 32, chunk_size=256))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="expected uint8"):
        to_model_input(torch.zeros((1, 1, 4, 4)), 4)
    with pytest.raises(ValueError, match="expected uint8"):
        to_model_input(torch.zeros((1, 4, 4, 4), dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="must be positive"):
        to_model_input(torch.zeros((1, 1, 4, 4), dtype=torch.uint8), 0)
