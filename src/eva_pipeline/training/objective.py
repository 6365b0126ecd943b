"""The EVA pre-training objective: negative cosine similarity to the teacher's features on masked patches (EVA paper,
Sec. 2.2; EVA-01 ``engine_for_pretraining.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mim_cosine_loss(pred: torch.Tensor, target: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Negative cosine similarity averaged over all masked tokens of the batch (a token mean, not per image).

    ``pred`` and ``target`` are (num_masked_tokens, D); both are upcast to fp32 so an fp16 student is compared
    in full precision, as the official code does. ``num_tokens`` divides the sum instead of the local count: with data
    parallelism, each rank passes (global masked tokens / ranks) so the averaged gradient is the global token mean.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} shapes differ")
    if pred.ndim != 2 or pred.shape[0] == 0:
        raise ValueError(f"expected (num_masked_tokens > 0, D) tensors, got {tuple(pred.shape)}")
    similarity = F.cosine_similarity(pred.float(), target.float(), dim=-1)
    if num_tokens is None:
        return -similarity.mean()
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    return -similarity.sum() / num_tokens
