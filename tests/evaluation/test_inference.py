"""Features files and top-k: the Parquet file streams in row groups and reads back in order, is never left half
written, and top-k is the softmax's ranking."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from eva_pipeline.evaluation import inference
from eva_pipeline.evaluation.inference import read_features, top_k, write_features


def _batches(n_batches: int, size: int, shape: tuple[int, ...]):
    rng = np.random.default_rng(0)
    for b in range(n_batches):
        yield [f"img_{b}_{i}.png" for i in range(size)], rng.standard_normal((size, *shape)).astype(np.float32)


@pytest.mark.parametrize("shape", [(8,), (4, 8)])
def test_features_stream_in_row_groups_and_read_back_in_order(tmp_path, monkeypatch, shape):
    monkeypatch.setattr(inference, "ROW_GROUP_BYTES", 200)  # a row group every batch or two
    batches = list(_batches(5, 3, shape))
    rows = write_features(tmp_path / "f.parquet", iter(batches), {"readout": "x"})
    assert rows == 15
    assert pq.ParquetFile(tmp_path / "f.parquet").num_row_groups > 1
    features = read_features(tmp_path / "f.parquet")
    assert features.paths == [p for paths, _ in batches for p in paths]
    assert np.array_equal(features.embeddings, np.concatenate([v for _, v in batches]))
    assert features.embeddings.shape == (15, *shape) and features.metadata == {"readout": "x"}


def test_an_interrupted_or_inconsistent_stream_leaves_the_previous_file(tmp_path):
    out = tmp_path / "f.parquet"
    out.write_text("previous")

    def failing():
        yield from _batches(2, 3, (8,))
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_features(out, failing())
    with pytest.raises(ValueError, match=r"embedding shape changed from \(8,\) to \(9,\)"):
        write_features(out, iter([*_batches(1, 3, (8,)), *_batches(1, 3, (9,))]))
    with pytest.raises(ValueError, match="no image was embedded"):
        write_features(out, iter([]))
    assert out.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["f.parquet"]


def test_top_k_is_the_softmax_ranking_and_stops_at_the_number_of_classes():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 5.0]])
    probs, classes = top_k(logits, k=5)
    assert classes.tolist() == [[1, 2, 0], [2, 0, 1]]
    assert torch.allclose(probs, torch.softmax(logits, -1).sort(-1, descending=True).values)
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_k(logits, 0)
