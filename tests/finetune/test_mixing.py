"""CutMix targets are the area-corrected mix of label-smoothed one-hots; the losses agree with their hand formulas;
odd batches are refused with a message that says what to change."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from eva_pipeline.finetune.mixing import EvenBatchMixup, build_mixing

NUM_CLASSES = 4
SMOOTHING = 0.1


def _smoothed(labels: torch.Tensor) -> torch.Tensor:
    """Label smoothing as timm's ``mixup_target``: off = s / C, on = 1 - s + s / C."""
    off = SMOOTHING / NUM_CLASSES
    return torch.full((len(labels), NUM_CLASSES), off).scatter_(1, labels[:, None], 1.0 - SMOOTHING + off)


def test_smoothing_values_by_hand() -> None:
    got = _smoothed(torch.tensor([2]))
    assert got.tolist() == [[pytest.approx(0.025), pytest.approx(0.025), pytest.approx(0.925), pytest.approx(0.025)]]


def test_cutmix_targets_follow_the_pasted_area() -> None:
    """Image i is the constant i + 1; CutMix pastes image B-1-i into a box. The measured share of pasted pixels is
    1 - lambda, and the target must be lambda * smooth(y_i) + (1 - lambda) * smooth(y_{B-1-i}) with that lambda
    (timm's correct_lam: the drawn lambda is replaced by the clipped box's area, so boxes cut by the border count)."""
    mixer, loss = build_mixing(NUM_CLASSES, cutmix_alpha=1.0, label_smoothing=SMOOTHING)
    assert isinstance(mixer, EvenBatchMixup) and isinstance(loss, SoftTargetCrossEntropy)
    labels = torch.tensor([0, 3, 1, 2, 2, 0])
    batch, side = len(labels), 13
    clipped = 0
    for seed in range(30):
        np.random.seed(seed)
        images = torch.arange(1.0, batch + 1)[:, None, None, None].expand(batch, 1, side, side).clone()
        mixed, targets = mixer(images, labels)
        pasted = mixed == torch.arange(batch, 0, -1.0)[:, None, None, None]  # value of image B-1-i
        share = pasted.float().mean(dim=(1, 2, 3))
        assert torch.allclose(share, share[0].expand(batch))  # one box for the whole batch
        lam = 1.0 - share[0].item()
        want = lam * _smoothed(labels) + (1.0 - lam) * _smoothed(labels.flip(0))
        assert torch.allclose(targets, want, atol=1e-6), seed
        assert torch.allclose(targets.sum(1), torch.ones(batch))
        rows, cols = pasted[0, 0].any(1).nonzero(), pasted[0, 0].any(0).nonzero()
        if len(rows) and (rows.min() == 0 or rows.max() == side - 1 or cols.min() == 0 or cols.max() == side - 1):
            clipped += 1
    assert clipped > 0  # some boxes were cut by the border, and their area still gave the target


def test_cutmix_lambda_hand_case() -> None:
    """A 10x10 image with a 4x7 pasted box keeps 72 of 100 pixels: lambda 0.72, so with smoothing 0.1 over 4
    classes the own class gets 0.72 * 0.925 + 0.28 * 0.025 = 0.673 and the partner's 0.28 * 0.925 + 0.72 * 0.025."""
    from timm.data.mixup import mixup_target

    lam = 1.0 - (4 * 7) / (10 * 10)
    target = mixup_target(torch.tensor([1, 3]), NUM_CLASSES, lam=lam, smoothing=SMOOTHING)
    assert target[0].tolist() == pytest.approx([0.025, 0.673, 0.025, 0.277])
    assert target[1].tolist() == pytest.approx([0.025, 0.277, 0.025, 0.673])


def test_odd_batch_is_refused_clearly() -> None:
    mixer, _ = build_mixing(NUM_CLASSES, cutmix_alpha=1.0, label_smoothing=SMOOTHING)
    with pytest.raises(ValueError, match=r"even batch .* got 5 images: .*drop_last=True"):
        mixer(torch.zeros(5, 3, 8, 8), torch.zeros(5, dtype=torch.long))


def test_losses_match_their_formulas() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, -0.4]])
    labels = torch.tensor([0, 3])
    logp = F.log_softmax(logits, dim=-1)
    # Hand value of sample 0: (1 - s) * -log p_y + s * mean_c(-log p_c).
    z = math.log(sum(math.exp(v) for v in (2.0, 0.0, -1.0, 0.5)))
    hand0 = 0.9 * (z - 2.0) + 0.1 * sum(z - v for v in (2.0, 0.0, -1.0, 0.5)) / 4
    per_sample = (1 - SMOOTHING) * -logp.gather(1, labels[:, None])[:, 0] + SMOOTHING * -logp.mean(-1)
    assert per_sample[0].item() == pytest.approx(hand0, rel=1e-6)
    smooth = LabelSmoothingCrossEntropy(smoothing=SMOOTHING)(logits, labels)
    soft = SoftTargetCrossEntropy()(logits, _smoothed(labels))
    assert smooth.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    assert soft.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)  # no mixing: the two routes agree
    assert smooth.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=SMOOTHING).item(), rel=1e-6)


def test_stage_choices() -> None:
    """IN-21K intermediate: CutMix 1.0 + smoothing 0.1 -> soft-target loss; IN-1K: smoothing 0.3 alone."""
    mixer, loss = build_mixing(21841, cutmix_alpha=1.0, label_smoothing=0.1)
    assert (mixer.cutmix_alpha, mixer.mixup_alpha, mixer.mix_prob, mixer.mode) == (1.0, 0.0, 1.0, "batch")
    assert mixer.label_smoothing == 0.1 and mixer.correct_lam and isinstance(loss, SoftTargetCrossEntropy)
    mixer, loss = build_mixing(1000, label_smoothing=0.3)
    assert mixer is None and isinstance(loss, LabelSmoothingCrossEntropy) and loss.smoothing == 0.3
    mixer, loss = build_mixing(1000)
    assert mixer is None and type(loss) is nn.CrossEntropyLoss
    with pytest.raises(ValueError, match="label_smoothing"):
        build_mixing(10, label_smoothing=1.0)


def test_cutmix_on_clips_cuts_one_box_through_every_frame() -> None:
    """A clip (B, C, T, H, W) is mixed as (B, C*T, H, W): every frame of a clip gets the same pasted box, and the
    target's lambda is that box's area (timm would otherwise index time and height as if they were height and width)."""
    mixer, _ = build_mixing(NUM_CLASSES, cutmix_alpha=1.0, label_smoothing=SMOOTHING)
    labels = torch.tensor([0, 3, 1, 2])
    batch, frames, side = len(labels), 5, 12
    for seed in range(10):
        np.random.seed(seed)
        clips = torch.arange(1.0, batch + 1)[:, None, None, None, None].expand(batch, 3, frames, side, side).clone()
        mixed, targets = mixer(clips, labels)
        assert mixed.shape == (batch, 3, frames, side, side)
        pasted = mixed == torch.arange(batch, 0, -1.0)[:, None, None, None, None]
        assert torch.equal(pasted, pasted[:, :1, :1].expand_as(pasted))  # the same box in every channel and frame
        lam = 1.0 - pasted.float().mean().item()
        want = lam * _smoothed(labels) + (1.0 - lam) * _smoothed(labels.flip(0))
        assert torch.allclose(targets, want, atol=1e-6), seed


def test_mixup_on_non_contiguous_clips_is_refused() -> None:
    mixer, _ = build_mixing(NUM_CLASSES, cutmix_alpha=1.0)
    clips = torch.zeros(2, 4, 3, 8, 8).transpose(1, 2)  # (B, C, T, H, W) view, not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        mixer(clips, torch.tensor([0, 1]))
