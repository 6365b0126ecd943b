"""``eva-pipeline convert``: official -> timm is timm's own filter and timm's Eva then computes what ours does; the
round trip official -> timm -> official is exact; the patch 14 -> 16 conversion equals timm's resample functions
applied by hand (and timm's loader for ``--method timm``), and the converted model runs at the new patch size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.eva import Eva, checkpoint_filter_fn

from eva_pipeline.models import (
    EvaClassifier,
    EvaMIM,
    create_model,
    get_config,
    load_official_checkpoint,
    save_official_checkpoint,
)
from eva_pipeline.models.convert import timm_metadata

TOL = 1e-5
PATCH14 = {"img_size": 224, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_hidden_dim": 64, "drop_path_rate": 0.0}


def _official(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _timm_model(path) -> Eva:
    """timm's Eva as the file's metadata describes it, loaded strictly with the file's tensors."""
    args, _ = timm_metadata(path)
    model = Eva(**args).eval()
    model.load_state_dict(load_file(path), strict=True)
    return model


def test_mim_to_timm_is_timms_filter_and_computes_our_tokens_and_comes_back_exactly(
    tmp_path, invoke, images, mim, mim_file, preprocessed
):
    out = tmp_path / "mim.safetensors"
    result = invoke("convert", "to-timm", mim_file, out, "--num-heads", 2)
    assert "checked: our model and timm's Eva agree" in result.output
    assert "dropped: lm_head.bias, lm_head.weight, mask_token; norm -> fc_norm" in result.output
    theirs = _timm_model(out)
    converted = load_file(out)
    filtered = checkpoint_filter_fn(_official(mim_file), theirs)  # what timm's pretrained loader applies
    assert converted.keys() == filtered.keys()
    assert all(torch.equal(converted[k], filtered[k]) for k in filtered)
    x = preprocessed(images)
    with torch.no_grad():
        want = mim.forward_features(x)
        got = theirs.fc_norm(theirs.forward_features(x))  # timm moved our final norm to fc_norm
    assert (got - want).abs().max() < TOL
    # back to the official layout: every tensor timm keeps comes back bit for bit
    back = tmp_path / "mim_back.pt"
    invoke("convert", "from-timm", out, back)
    original, returned = _official(mim_file), _official(back)
    assert set(original) - set(returned) == {"mask_token", "lm_head.weight", "lm_head.bias"}
    assert set(returned) <= set(original)
    assert all(torch.equal(returned[k], original[k]) and returned[k].dtype == original[k].dtype for k in returned)
    # ... and converts to the same timm file again (without its mask_token, timm's filter would keep `norm`)
    again = tmp_path / "again.safetensors"
    invoke("convert", "to-timm", back, again, "--num-heads", 2)
    assert all(torch.equal(load_file(again)[k], v) for k, v in converted.items())


def test_fine_tuned_round_trip_is_exact_in_fp16_and_timm_gives_our_logits(
    tmp_path, invoke, images, classifiers, official_classifier_file, preprocessed
):
    out = tmp_path / "clf.safetensors"
    invoke("convert", "to-timm", official_classifier_file, out, "--num-heads", 2)
    back = tmp_path / "clf_back.pt"
    invoke("convert", "from-timm", out, back)
    original, returned = _official(official_classifier_file), _official(back)
    assert returned.keys() == original.keys()
    assert all(torch.equal(returned[k], original[k]) for k in original)
    assert {v.dtype for v in returned.values()} == {torch.float16}
    theirs = _timm_model(out)
    ours = EvaClassifier(classifiers[0].config, 10, initialise=False)
    load_official_checkpoint(ours, original)  # the same fp16 weights, cast to fp32 by both loaders
    x = preprocessed(images)
    with torch.no_grad():
        got, want = theirs(x), ours.eval()(x)
    assert (got - want).abs().max() < TOL * max(1.0, float(want.abs().max()))


def test_our_classifier_checkpoint_carries_its_class_names_into_timms_file(
    tmp_path, invoke, classifier_file, class_names
):
    out = tmp_path / "clf.safetensors"
    invoke("convert", "to-timm", classifier_file, out)  # the architecture is in the checkpoint: no --num-heads
    args, classes = timm_metadata(out)
    assert classes == class_names and args["num_heads"] == 2 and args["num_classes"] == 10


@pytest.fixture
def patch14_file(tmp_path):
    """A tiny MIM model at EVA's 224 px / patch 14 (16 x 16 grid) in the official format, fp32."""
    torch.manual_seed(0)
    model = create_model("eva_tiny_patch4_28", **PATCH14, patch_size=14)
    with torch.no_grad():
        model.pos_embed.normal_()
    return save_official_checkpoint(model, tmp_path / "p14.pt", dtype=None)


def test_patch_14_to_16_is_evas_bicubic_resize_and_the_model_runs_at_patch_16(tmp_path, invoke, patch14_file):
    out = tmp_path / "p16.pt"
    result = invoke("convert", "patch", patch14_file, out, "--num-heads", 2)
    assert "patch 14, 16 x 16 -> patch 16, 14 x 14 grid at 224 px (eva)" in result.output
    old, new = _official(patch14_file), _official(out)
    kernel = F.interpolate(old["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False)
    pos = resample_abs_pos_embed(old["pos_embed"], [14, 14], num_prefix_tokens=1, antialias=False)
    assert torch.equal(new["patch_embed.proj.weight"], kernel)
    assert torch.equal(new["pos_embed"], pos)
    assert all(torch.equal(new[k], old[k]) for k in old if k not in ("patch_embed.proj.weight", "pos_embed"))
    model = EvaMIM(get_config("eva_tiny_patch4_28", **PATCH14, patch_size=16, target_dim=768), initialise=False)
    load_official_checkpoint(model, new, strict=True)
    with torch.no_grad():
        tokens = model.eval().forward_features(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 1 + 14 * 14, 32) and torch.isfinite(tokens).all()


def test_patch_conversion_with_timms_method_equals_timms_loader(tmp_path, invoke, patch14_file):
    out = tmp_path / "p16_timm.pt"
    invoke("convert", "patch", patch14_file, out, "--num-heads", 2, "--method", "timm")
    old, new = _official(patch14_file), _official(out)
    timm16 = Eva(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=0)
    loaded = checkpoint_filter_fn(old, timm16)  # timm's pretrained loader into a patch 16 model
    assert torch.equal(new["patch_embed.proj.weight"], loaded["patch_embed.proj.weight"])
    assert torch.equal(new["pos_embed"], loaded["pos_embed"])
    by_hand = resample_patch_embed(old["patch_embed.proj.weight"], [16, 16], interpolation="bicubic", antialias=True)
    assert torch.equal(new["patch_embed.proj.weight"], by_hand)
    # the two methods differ (pseudo-inverse vs plain resize): the option matters
    invoke("convert", "patch", patch14_file, tmp_path / "p16_eva.pt", "--num-heads", 2)
    eva = _official(tmp_path / "p16_eva.pt")["patch_embed.proj.weight"]
    assert (eva - new["patch_embed.proj.weight"]).abs().max() > 1e-3


def test_bad_conversions_are_click_errors_and_write_nothing(tmp_path, invoke, mim_file, monkeypatch):
    result = invoke("convert", "to-timm", mim_file, tmp_path / "out.pt", "--num-heads", 2, expect=2)
    assert "must end in .safetensors" in result.output
    result = invoke("convert", "patch", mim_file, tmp_path / "p.pt", "--num-heads", 2, "--patch-size", 5, expect=2)
    assert "image size 28 is not a multiple of patch size 5" in result.output
    # a timm file of another layout (layer scale) is refused by key
    out = tmp_path / "mim.safetensors"
    invoke("convert", "to-timm", mim_file, out, "--num-heads", 2)
    state = load_file(out)
    state["blocks.0.gamma_1"] = torch.ones(32)
    save_file(state, tmp_path / "scaled.safetensors")
    result = invoke("convert", "from-timm", tmp_path / "scaled.safetensors", tmp_path / "x.pt", expect=1)
    assert "not the EVA-01 layout of timm's Eva" in result.output and "blocks.0.gamma_1" in result.output
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    result = invoke("convert", "from-timm", tmp_path / "junk.safetensors", tmp_path / "x.pt", expect=1)
    assert "not a readable safetensors file" in result.output
    assert not (tmp_path / "x.pt").exists()

    # the numerical check can fail: weights that timm's Eva does not compute like ours are not written
    from eva_pipeline.commands import convert

    original = convert.official_to_timm

    def swapped(state, config):
        out = original(state, config)
        q, v = "blocks.0.attn.q_bias", "blocks.0.attn.v_bias"
        out[q], out[v] = out[v], out[q]
        return out

    monkeypatch.setattr(convert, "official_to_timm", swapped)
    result = invoke("convert", "to-timm", mim_file, tmp_path / "bad.safetensors", "--num-heads", 2, expect=1)
    assert "our model and timm's Eva disagree" in result.output
    assert not (tmp_path / "bad.safetensors").exists()
