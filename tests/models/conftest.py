"""Shared small configs for the model tests: tiny enough for CPU, with non-trivial weights."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

# A 2-block model on 28x28 images (7x7 grid) with drop path off, so eval and train agree.
SMALL = {
    "img_size": 28,
    "patch_size": 4,
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 4,
    "mlp_hidden_dim": 256,
    "drop_path_rate": 0.0,
}


@pytest.fixture
def small() -> dict:
    return dict(SMALL)


@pytest.fixture
def perturb() -> Callable[[nn.Module, int], nn.Module]:
    """Add noise to every parameter: zero biases / unit LayerNorms at init would hide ordering bugs (q vs v bias)."""

    def _perturb(model: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
        return model

    return _perturb
