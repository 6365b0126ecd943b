"""Feature extraction: batching is invisible, pooling is a plain mean, nothing is recorded for autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eva_pipeline.evaluation import extract_features

TOKENS = 5
DIM = 6


class _TokenEncoder(torch.nn.Module):
    """(B, 3, 8, 8) -> (B, TOKENS, DIM) with trainable weights, so a recorded graph would show."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 8 * 8, TOKENS * DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(1)).view(x.shape[0], TOKENS, DIM)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(23, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_batching_matches_one_batch(images: torch.Tensor) -> None:
    encoder = _TokenEncoder().eval()
    whole = extract_features(encoder, images, batch_size=len(images))
    for batch_size in (1, 4, 7):
        np.testing.assert_allclose(extract_features(encoder, images, batch_size=batch_size), whole, atol=1e-6)


def test_concat_readout_keeps_every_token_in_order(images: torch.Tensor) -> None:
    tokens = torch.randn(images.shape[0], 5, 3)
    out = extract_features(
        lambda x: tokens[: x.shape[0]] if x.shape[0] == images.shape[0] else None,
        images,
        batch_size=images.shape[0],
        pool="concat",
    )
    assert out.shape == (images.shape[0], 15)
    np.testing.assert_array_equal(out[:, 3:6], tokens[:, 1].numpy())  # token 1 sits in columns 3..5
    flat = extract_features(lambda x: x.flatten(1), images, batch_size=8, pool="concat")
    np.testing.assert_array_equal(flat, images.flatten(1).numpy())  # (B, D) passes through


def test_mean_pooling_and_dtype(images: torch.Tensor) -> None:
    encoder = _TokenEncoder().eval()
    feats = extract_features(encoder, images, batch_size=8)
    with torch.no_grad():
        tokens = encoder(images).numpy()
    assert feats.dtype == np.float32
    assert feats.shape == (len(images), DIM)
    np.testing.assert_allclose(feats, tokens.mean(axis=1), atol=1e-6)
    raw = extract_features(encoder, images, batch_size=8, pool="none")
    assert raw.shape == (len(images), TOKENS, DIM)
    np.testing.assert_allclose(raw, tokens, atol=1e-6)


def test_vector_outputs_pass_through_and_are_cast(images: torch.Tensor) -> None:
    feats = extract_features(lambda x: x.flatten(1).double(), images, batch_size=5)
    assert feats.dtype == np.float32
    np.testing.assert_allclose(feats, images.flatten(1).numpy(), atol=1e-6)


def test_no_grad_recorded(images: torch.Tensor) -> None:
    encoder = _TokenEncoder().eval()
    seen: list[tuple[bool, bool, bool]] = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        out = encoder(x)
        seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled(), out.requires_grad))
        return out

    extract_features(encode, images, batch_size=10)
    assert seen == [(False, True, False)] * 3
    assert all(p.grad is None for p in encoder.parameters())


def test_bad_inputs(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        extract_features(lambda x: x, images[0])
    with pytest.raises(ValueError, match="pool"):
        extract_features(lambda x: x.flatten(1), images, pool="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        extract_features(lambda x: x.flatten(1), images[:0])
    with pytest.raises(ValueError, match=r"\(B, D\) or \(B, T, D\)"):
        extract_features(lambda x: x, images)
    with pytest.warns(UserWarning, match="training mode"):
        extract_features(_TokenEncoder().train(), images)
