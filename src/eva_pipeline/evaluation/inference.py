"""What a trained model gives for new images, outside the pipeline: embeddings (pooled, cls or per patch) streamed
into a Parquet file, and a classifier's top-k classes.

Readouts, for both kinds of checkpoint (the final LayerNorm is ``norm`` for a MIM encoder, ``fc_norm`` for a
fine-tuned classifier):

- ``mean``: the model's pooled feature. A MIM encoder: the mean of its patch tokens after the final norm (the probe's
  ``mean`` readout); a classifier: ``fc_norm`` of the mean of its patch tokens, exactly what its head reads.
- ``cls``: the cls token after the final norm.
- ``patch``: every patch token after the final norm, (N, D) per image in row-major grid order.

The Parquet file has one row per image: ``path`` (string) and ``embedding``, a fixed-size list of float32 (D
values, or for ``patch`` N fixed-size lists of D); the schema metadata (``eva_pipeline.features``, JSON) records the
readout, the grid and the model. :func:`read_features` gives the paths and one (n, D) or (n, N, D) array back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from eva_pipeline.fileio import replace_atomically
from eva_pipeline.models import EvaClassifier, EvaMIM

Readout = Literal["mean", "cls", "patch"]
READOUTS: tuple[str, ...] = ("mean", "cls", "patch")
METADATA_KEY = b"eva_pipeline.features"
#: Rows are buffered into row groups of about this many bytes of embeddings (one batch at least).
ROW_GROUP_BYTES = 64 * 2**20


def embed(model: EvaMIM | EvaClassifier, images: torch.Tensor, readout: Readout = "mean") -> torch.Tensor:
    """(B, 3, H, W) model inputs -> (B, D) for ``mean``/``cls``, (B, N, D) for ``patch`` (see the module doc)."""
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
    if isinstance(model, EvaMIM):
        tokens = model.forward_features(images)  # after the final norm
        if readout == "mean":
            return tokens[:, 1:].mean(dim=1)
        return tokens[:, 0] if readout == "cls" else tokens[:, 1:]
    if isinstance(model, EvaClassifier):
        tokens = model.forward_features(images)  # block output: fc_norm comes after pooling
        if readout == "mean":
            return model.forward_head(tokens, pre_logits=True)
        return model.fc_norm(tokens[:, 0] if readout == "cls" else tokens[:, 1:])
    raise TypeError(f"expected an EvaMIM or EvaClassifier, got {type(model).__name__}")


def _column(values: np.ndarray) -> pa.Array:
    """(n, D) or (n, N, D) float32 -> nested fixed-size lists, without a copy of the values."""
    array: pa.Array = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    for size in reversed(values.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def write_features(
    path: str | os.PathLike[str],
    batches: Iterable[tuple[list[str], np.ndarray]],
    metadata: Mapping[str, Any] | None = None,
) -> int:
    """Stream ``(paths, embeddings)`` batches into a Parquet file at ``path``; -> the number of rows.

    Written to a temporary file beside ``path`` and renamed at the end, so an interrupted run leaves the previous
    file (or none), never half of one. Every batch must have the first batch's embedding shape. No batch at all is
    an error (an empty file would look like a result).
    """
    meta = {METADATA_KEY: json.dumps(dict(metadata or {}), sort_keys=True).encode()}
    rows = 0

    def write(tmp: Path) -> None:
        nonlocal rows
        writer: pq.ParquetWriter | None = None
        shape: tuple[int, ...] | None = None
        names: list[str] = []
        chunks: list[np.ndarray] = []
        buffered = 0

        def flush() -> None:
            nonlocal buffered
            if names:
                values = np.concatenate(chunks)
                table = pa.table({"path": pa.array(names, pa.string()), "embedding": _column(values)})
                writer.write_table(table.replace_schema_metadata(meta))
            names.clear()
            chunks.clear()
            buffered = 0

        try:
            for paths, values in batches:
                if len(paths) != len(values):
                    raise ValueError(f"a batch of {len(paths)} paths has {len(values)} embeddings")
                if shape is None:
                    shape = tuple(values.shape[1:])
                    column = _column(np.zeros((0, *shape), np.float32))
                    schema = pa.schema([("path", pa.string()), ("embedding", column.type)], metadata=meta)
                    writer = pq.ParquetWriter(tmp, schema)
                elif tuple(values.shape[1:]) != shape:
                    raise ValueError(f"embedding shape changed from {shape} to {tuple(values.shape[1:])}")
                names.extend(paths)
                chunks.append(values)
                rows += len(paths)
                buffered += values.nbytes
                if buffered >= ROW_GROUP_BYTES:
                    flush()
            if writer is None:
                raise ValueError("no embeddings to write: no image was embedded")
            flush()
        finally:
            if writer is not None:
                writer.close()

    replace_atomically(path, write)
    return rows


@dataclass(frozen=True)
class Features:
    """A features file read back: the image paths, their embeddings ((n, D) or (n, N, D)) and the metadata."""

    paths: list[str]
    embeddings: np.ndarray
    metadata: dict[str, Any]


def read_features(path: str | os.PathLike[str]) -> Features:
    """A file of :func:`write_features` -> :class:`Features` (the nested lists as one float32 array)."""
    table = pq.read_table(path)
    column = table.column("embedding").combine_chunks()
    shape = []
    values: pa.Array = column
    while pa.types.is_fixed_size_list(values.type):
        shape.append(values.type.list_size)
        values = values.flatten()
    embeddings = np.array(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(table), *shape)
    raw = (table.schema.metadata or {}).get(METADATA_KEY, b"{}")
    return Features(table.column("path").to_pylist(), embeddings, json.loads(raw))


def top_k(logits: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) logits -> softmax probabilities and class indices of the ``min(k, C)`` most likely classes, in
    decreasing order (softmax in float32)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    probs = torch.softmax(logits.float(), dim=-1)
    return probs.topk(min(k, probs.shape[-1]), dim=-1)
