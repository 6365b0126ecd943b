"""The MIM loss is EVA's: negative cosine similarity, a mean over tokens, in fp32."""

import pytest
import torch
import torch.nn.functional as F

from eva_pipeline.training import mim_cosine_loss


def test_token_mean_not_image_mean():
    torch.manual_seed(0)
    # Two images with 3 and 1 masked tokens: a per-image mean would weigh the lone token 3x more.
    pred, target = torch.randn(4, 8), torch.randn(4, 8)
    per_token = F.cosine_similarity(pred, target, dim=-1)
    loss = mim_cosine_loss(pred, target)
    assert loss.item() == pytest.approx(-per_token.mean().item(), abs=1e-7)
    per_image = -(per_token[:3].mean() + per_token[3]) / 2
    assert loss.item() != pytest.approx(per_image.item(), abs=1e-4)


def test_sign_and_bounds():
    x = torch.randn(5, 16)
    assert mim_cosine_loss(x, 3 * x).item() == pytest.approx(-1.0, abs=1e-6)  # scale-invariant, minimised at -1
    assert mim_cosine_loss(x, -x).item() == pytest.approx(1.0, abs=1e-6)


def test_half_precision_inputs_computed_in_fp32():
    torch.manual_seed(1)
    pred, target = torch.randn(64, 768), torch.randn(64, 768)
    loss_half = mim_cosine_loss(pred.half(), target.half())
    assert loss_half.dtype == torch.float32
    expected = mim_cosine_loss(pred.half().float(), target.half().float())
    assert loss_half.item() == expected.item()


def test_gradient_flows_to_prediction_only():
    pred = torch.randn(3, 4, requires_grad=True)
    target = torch.randn(3, 4)
    mim_cosine_loss(pred, target).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (torch.zeros(3, 4), torch.zeros(3, 5), "shapes differ"),
        (torch.zeros(0, 4), torch.zeros(0, 4), "num_masked_tokens > 0"),
    ],
)
def test_bad_shapes_are_named(pred, target, message):
    with pytest.raises(ValueError, match=message):
        mim_cosine_loss(pred, target)
