"""Shared fixtures: paths of the embedded Fashion-MNIST subset and its manifest (built once per session).

Fixtures rather than a helper module: under pytest's importlib import mode, test modules cannot import siblings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from eva_pipeline.ingest.build import build_manifest
from eva_pipeline.ingest.scan import SourceSpec

RAW = Path(__file__).resolve().parents[2] / "data" / "01_raw" / "fashion_mnist"


@dataclass(frozen=True)
class EmbeddedData:
    train_images: Path = RAW / "train-images-idx3-ubyte.gz"
    train_labels: Path = RAW / "train-labels-idx1-ubyte.gz"
    test_images: Path = RAW / "t10k-images-idx3-ubyte.gz"
    test_labels: Path = RAW / "t10k-labels-idx1-ubyte.gz"

    def specs(self, train_limit: int | None = None, test_limit: int | None = None) -> list[SourceSpec]:
        """Train -> pre-training pool, t10k -> held-out probe split (as the ingestion parameters will say)."""
        return [
            SourceSpec("fmnist_train", "idx", "pretrain", self.train_images, self.train_labels, limit=train_limit),
            SourceSpec("fmnist_test", "idx", "probe", self.test_images, self.test_labels, limit=test_limit),
        ]


@pytest.fixture(scope="session")
def fmnist() -> EmbeddedData:
    return EmbeddedData()


@pytest.fixture(scope="session")
def embedded(fmnist: EmbeddedData) -> tuple[pd.DataFrame, dict]:
    """(manifest, report) of the two embedded sources; tests must not modify it (copy first)."""
    return build_manifest(fmnist.specs())
