"""A small fine-tune classifier for CPU tests: 2 blocks on 28x28 images (7x7 grid), drop path off."""

from __future__ import annotations

import pytest
import torch

from eva_pipeline.models import EvaClassifier, create_classifier

SMALL = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_hidden_dim": 64, "drop_path_rate": 0.0}
NUM_CLASSES = 5


@pytest.fixture
def small() -> dict:
    return dict(SMALL)


@pytest.fixture
def classifier() -> EvaClassifier:
    torch.manual_seed(0)
    return create_classifier("eva_tiny_patch4_28", NUM_CLASSES, **SMALL)
