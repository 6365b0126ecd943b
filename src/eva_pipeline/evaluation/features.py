"""Frozen-feature extraction for the linear probe.

The encoder is passed in as a plain callable so the same code serves the pre-trained student, the randomly
initialised student, the teacher and raw pixels. For our ViT, pass a function that returns the *patch* tokens, e.g.
``lambda x: model.forward_features(x)[:, 1:]`` (dropping the CLS token, which masked image modelling does not
train), and let ``pool`` read them out: ``"concat"`` keeps every token in place (B, T*D), ``"mean"`` averages them
(B, D). An encoder that already returns one vector per image passes through unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from eva_pipeline.evaluation.probe import DEFAULT_PROBE_CONFIG

Pool = Literal["concat", "mean", "none"]
_POOLS: tuple[str, ...] = ("concat", "mean", "none")
_TOKEN_AXIS = 1  # (B, T, D): tokens lie on axis 1


def _pool(out: Tensor, pool: Pool) -> Tensor:
    if out.ndim == 2 or pool == "none":
        return out
    if out.ndim == 3:
        return out.flatten(_TOKEN_AXIS) if pool == "concat" else out.mean(dim=_TOKEN_AXIS)
    raise ValueError(f"encode must return (B, D) or (B, T, D), got shape {tuple(out.shape)}")


def extract_features(
    encode: Callable[[Tensor], Tensor],
    images: Tensor,
    batch_size: int = DEFAULT_PROBE_CONFIG.batch_size,
    progress: bool = False,
    pool: Pool = "mean",
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Features of ``images`` (N, C, H, W) as a float32 array: (N, D) or (N, T*D), as ``encode`` returns them if
    pool="none".

    Runs under ``torch.inference_mode()`` (no autograd graph, so 5,000 images fit in memory) and in batches of
    ``batch_size``; each batch is moved to ``device`` (when given) and handed to ``encode`` as is, so preprocessing
    (dtype, normalisation) belongs in ``encode``. ``encode`` returns (B, D) or (B, T, D) tokens; ``pool="mean"``
    averages them over T, ``pool="concat"`` lays them side by side in token order. Put modules in eval mode first:
    dropout or drop-path would make features random.
    """
    if pool not in _POOLS:
        raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    total = images.shape[0]
    if total == 0:
        raise ValueError("images is empty (N = 0)")
    if isinstance(encode, torch.nn.Module) and encode.training:
        warnings.warn("encode is a module in training mode; call .eval() for deterministic features", stacklevel=2)

    chunks: list[np.ndarray] = []
    with torch.inference_mode(), tqdm(total=total, unit="img", desc="features", disable=not progress) as bar:
        for start in range(0, total, batch_size):
            batch = images[start : start + batch_size]
            if device is not None:
                batch = batch.to(device, non_blocking=True)
            out = encode(batch)
            if out.shape[0] != batch.shape[0]:
                raise ValueError(f"encode returned {out.shape[0]} rows for a batch of {batch.shape[0]} images")
            chunks.append(_pool(out, pool).to(device="cpu", dtype=torch.float32).numpy())
            bar.update(batch.shape[0])
    if len({chunk.shape[1:] for chunk in chunks}) > 1:
        raise ValueError("encode returned different shapes across batches; use pool='mean' for token outputs")
    return np.concatenate(chunks, axis=0)
