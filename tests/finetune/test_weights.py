"""A stage's starting weights: pos_embed resampled exactly as timm's ``resample_abs_pos_embed`` (cls kept), MIM
weights loaded with a fresh head and fc_norm, a previous stage's head mapped to the new classes by name."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.eva import Eva, checkpoint_filter_fn

from eva_pipeline.finetune.weights import HeadMappingError, load_finetune_start, remap_head
from eva_pipeline.models import EvaClassifier, EvaMIM, create_classifier, create_model, load_official_checkpoint


def _perturbed(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.fixture
def mim(small: dict) -> EvaMIM:
    return _perturbed(create_model("eva_tiny_patch4_28", **small))


def _classifier(small: dict, img_size: int = 28, num_classes: int = 5) -> EvaClassifier:
    torch.manual_seed(1)
    return create_classifier("eva_tiny_patch4_28", num_classes, img_size=img_size, **small)


# ---- pos_embed resampling ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("img_size", "grid"), [(40, 10), (20, 5)])  # up (224 -> 336 like) and down
@pytest.mark.parametrize("antialias", [False, True])
def test_pos_embed_resampling_matches_timm(small: dict, mim: EvaMIM, img_size: int, grid: int, antialias: bool):
    clf = _classifier(small, img_size)
    load_official_checkpoint(clf, mim.state_dict(), strict=False, resample_pos_embed=True, antialias=antialias)
    old = mim.pos_embed.detach()
    want = resample_abs_pos_embed(old, new_size=[grid, grid], num_prefix_tokens=1, antialias=antialias)
    assert clf.pos_embed.shape == (1, 1 + grid * grid, small["embed_dim"])
    assert torch.allclose(clf.pos_embed, want, atol=1e-6, rtol=0)
    assert torch.equal(clf.pos_embed[:, 0], old[:, 0])  # cls position kept


def test_timms_default_filter_antialiases_the_official_code_does_not(small: dict, mim: EvaMIM) -> None:
    """timm's ``checkpoint_filter_fn`` resamples with antialias=True (a=-0.5 cubic kernel, also when upsampling);
    EVA-01's ``F.interpolate(mode='bicubic')`` does not. Ours defaults to the official resize and equals timm's filter
    only with ``antialias=True``."""
    clf = _classifier(small, 40)
    cfg = clf.config
    timm_eva = Eva(
        img_size=40, patch_size=4, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_hidden_dim / cfg.embed_dim, qkv_bias=True, global_pool="avg", num_classes=0,
    )  # fmt: skip
    via_timm = checkpoint_filter_fn(mim.state_dict(), timm_eva)["pos_embed"]
    load_official_checkpoint(clf, mim.state_dict(), strict=False, resample_pos_embed=True, antialias=True)
    assert torch.allclose(clf.pos_embed, via_timm, atol=1e-6, rtol=0)
    load_official_checkpoint(clf, mim.state_dict(), strict=False, resample_pos_embed=True)
    assert (clf.pos_embed - via_timm).abs().max().item() > 1e-3


# ---- starting from a MIM checkpoint --------------------------------------------------------------------------------
def test_mim_start_loads_the_encoder_and_keeps_a_fresh_head(small: dict, mim: EvaMIM) -> None:
    clf = _classifier(small, 40)
    fresh_head = clf.head.weight.detach().clone()
    report = load_finetune_start(clf, {"model": mim.state_dict()})
    assert report.head == "new" and report.load.resampled_keys == ["pos_embed"]
    assert report.load.unexpected_keys == ["lm_head.bias", "lm_head.weight", "mask_token", "norm.bias", "norm.weight"]
    mim_state = mim.state_dict()
    for name, value in clf.state_dict().items():
        if name.startswith(("fc_norm.", "head.")) or name == "pos_embed":
            continue
        assert torch.equal(value, mim_state[name]), name
    assert torch.equal(clf.head.weight, fresh_head)
    assert torch.equal(clf.fc_norm.weight, torch.ones_like(clf.fc_norm.weight))  # as the official loader: no norm move
    assert not clf.patch_embed.proj.weight.requires_grad


# ---- starting from the previous stage's classifier -----------------------------------------------------------------
SOURCE = ["ankle boot", "bag", "coat", "dress", "pullover"]


def test_head_mapped_by_name_gives_the_same_logits(small: dict) -> None:
    """The target stage's logits equal the intermediate model's logits for the same classes, in the new order."""
    intermediate = _perturbed(_classifier(small, num_classes=5), seed=3).eval()
    target_classes = ["pullover", "ankle boot", "dress"]
    target = _classifier(small, num_classes=3).eval()
    report = load_finetune_start(
        target, intermediate.state_dict(), source_classes=SOURCE, target_classes=target_classes
    )
    assert report.head == "mapped" and report.new_classes == []
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = intermediate(images)[:, [4, 0, 3]]
        got = target(images)
    assert torch.allclose(got, want, atol=1e-6) and want.abs().max() > 1e-3


def test_missing_target_classes_are_named(small: dict) -> None:
    state = _perturbed(_classifier(small), seed=4).state_dict()
    with pytest.raises(HeadMappingError, match=r"2 of the 3 target classes .*: 'sandal', 'shirt'; .*reinit_missing"):
        remap_head(state, SOURCE, ["bag", "sandal", "shirt"])
    out, missing = remap_head(
        state, SOURCE, ["bag", "sandal", "shirt"], reinit_missing=True, generator=torch.Generator().manual_seed(0)
    )
    assert missing == ["sandal", "shirt"]
    assert torch.equal(out["head.weight"][0], state["head.weight"][1])
    assert out["head.bias"][0] == state["head.bias"][1] and out["head.bias"][1:].abs().sum() == 0
    # EVA's head init (run_class_finetuning.py: trunc_normal_(std=0.02), then times init_scale 0.001), same draw:
    want = torch.nn.init.trunc_normal_(torch.empty(2, 32), std=0.02, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out["head.weight"][1:], want * 1e-3, atol=0, rtol=1e-6)
    again, _ = remap_head(
        state, SOURCE, ["bag", "sandal", "shirt"], reinit_missing=True, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(again["head.weight"], out["head.weight"])
    assert out["head.weight"] is not state["head.weight"] and state["head.weight"].shape[0] == 5  # input unchanged


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        (["a", "b", "a", "c", "d"], ["a"], "source classes repeat names: 'a'"),
        (SOURCE, ["bag", "bag"], "target classes repeat names: 'bag'"),
        (SOURCE[:4], ["bag"], "head has 5 rows but 4 source class names"),
    ],
)
def test_bad_class_lists(small: dict, source: list[str], target: list[str], message: str) -> None:
    with pytest.raises(HeadMappingError, match=message):
        remap_head(_classifier(small).state_dict(), source, target)


def test_head_of_another_size_needs_a_decision(small: dict) -> None:
    state = _perturbed(_classifier(small, num_classes=5), seed=5).state_dict()
    target = _classifier(small, num_classes=3)
    with pytest.raises(Exception, match=r"head has 5 classes, the model 3: .*source_classes.*reinit_head=True"):
        load_finetune_start(target, state)
    fresh_head = target.head.weight.detach().clone()
    report = load_finetune_start(target, state, reinit_head=True)
    assert report.head == "reinitialised" and torch.equal(target.head.weight, fresh_head)
    assert torch.equal(target.fc_norm.weight, state["fc_norm.weight"])  # the rest of the classifier is loaded
    with pytest.raises(HeadMappingError, match="3 target class names for a model with 2 classes"):
        load_finetune_start(_classifier(small, num_classes=2), state, source_classes=SOURCE, target_classes=SOURCE[:3])
