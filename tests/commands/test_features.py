"""``eva-pipeline features``: the embeddings written are the model's own outputs on the same preprocessed images,
for every kind of checkpoint and readout; bad inputs are click errors that name the problem and write nothing."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from eva_pipeline.evaluation.inference import read_features
from eva_pipeline.models import EvaMIM, load_official_checkpoint

TOL = 1e-5


def test_pooled_features_of_the_mim_student_equal_its_forward(
    tmp_path, invoke, image_dir, images, mim, mim_file, preprocessed
):
    out = tmp_path / "features.parquet"
    result = invoke("features", image_dir, "-c", mim_file, "-o", out, "--num-heads", 2, "--batch-size", 4)
    assert f"wrote {len(images)} embeddings (32 float32 each)" in result.stdout
    features = read_features(out)
    assert features.paths == [str(p) for p in images]  # recursive, sorted, in order
    with torch.no_grad():
        want = mim.forward_features(preprocessed(images))[:, 1:].mean(dim=1)  # final-norm patch tokens, averaged
    assert features.embeddings.shape == (len(images), 32)
    assert torch.allclose(torch.from_numpy(features.embeddings), want, atol=TOL)
    assert features.metadata["readout"] == "mean" and features.metadata["kind"] == "mim"
    assert features.metadata["eva_config"]["num_heads"] == 2
    # the schema is the documented one: a string path and a fixed-size list of float32
    schema = pq.read_schema(out)
    assert schema.field("path").type == pa.string()
    embedding = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(embedding) and embedding.list_size == 32
    assert embedding.value_type == pa.float32()


def test_cls_and_per_patch_readouts_of_the_mim_student(tmp_path, invoke, images, mim, mim_file, preprocessed):
    with torch.no_grad():
        tokens = mim.forward_features(preprocessed(images))
    invoke("features", *images, "-c", mim_file, "-o", tmp_path / "cls.parquet", "--num-heads", 2, "--pool", "cls")
    cls = read_features(tmp_path / "cls.parquet").embeddings
    assert torch.allclose(torch.from_numpy(cls), tokens[:, 0], atol=TOL)
    invoke("features", *images, "-c", mim_file, "-o", tmp_path / "patch.parquet", "--num-heads", 2, "--per-patch")
    patch = read_features(tmp_path / "patch.parquet")
    assert patch.embeddings.shape == (len(images), 49, 32)
    assert torch.allclose(torch.from_numpy(patch.embeddings), tokens[:, 1:], atol=TOL)
    assert patch.metadata["grid"] == 7


def test_classifier_features_are_what_its_head_reads_with_the_ema_weights_by_default(
    tmp_path, invoke, image_dir, images, classifiers, classifier_file, preprocessed
):
    model, ema = classifiers
    x = preprocessed(images)
    invoke("features", image_dir, "-c", classifier_file, "-o", tmp_path / "ema.parquet")
    invoke("features", image_dir, "-c", classifier_file, "-o", tmp_path / "trained.parquet", "--no-ema")
    with torch.no_grad():
        want_ema = ema.forward_head(ema.forward_features(x), pre_logits=True)
        want_trained = model.forward_head(model.forward_features(x), pre_logits=True)
    got_ema = torch.from_numpy(read_features(tmp_path / "ema.parquet").embeddings)
    got_trained = torch.from_numpy(read_features(tmp_path / "trained.parquet").embeddings)
    assert torch.allclose(got_ema, want_ema, atol=TOL)
    assert torch.allclose(got_trained, want_trained, atol=TOL)
    assert (want_ema - want_trained).abs().max() > 1e-2  # the two weights differ: the test can tell them apart
    invoke("features", image_dir, "-c", classifier_file, "-o", tmp_path / "patch.parquet", "--per-patch")
    with torch.no_grad():
        want_patch = ema.fc_norm(ema.forward_features(x)[:, 1:])
    assert torch.allclose(torch.from_numpy(read_features(tmp_path / "patch.parquet").embeddings), want_patch, atol=TOL)


def test_a_list_file_and_a_student_config_and_a_larger_input(
    tmp_path, invoke, image_dir, images, mim, mim_file, student_config, preprocessed
):
    listing = image_dir / "list.txt"  # relative paths against the list's folder, a label and a comment ignored
    lines = ["# two of the images", f"{images[3].relative_to(image_dir)}\t3", str(images[0])]
    listing.write_text("\n".join(lines) + "\n")
    try:
        out = tmp_path / "listed.parquet"
        invoke("features", listing, "-c", mim_file, "-o", out, "--config", student_config, "--img-size", 32)
    finally:
        listing.unlink()
    features = read_features(out)
    assert features.paths == [str(images[3]), str(images[0])]
    at_32 = EvaMIM(dataclasses.replace(mim.config, img_size=32), initialise=False)
    load_official_checkpoint(at_32, mim.state_dict(), resample_pos_embed=True)  # pos_embed 7x7 -> 8x8
    with torch.no_grad():
        want = at_32.eval().forward_features(preprocessed([images[3], images[0]], 32))[:, 1:].mean(dim=1)
    assert torch.allclose(torch.from_numpy(features.embeddings), want, atol=TOL)
    assert features.metadata["eva_config"]["img_size"] == 32


def test_bad_inputs_are_click_errors_and_leave_the_output_untouched(tmp_path, invoke, image_dir, images, mim_file):
    out = tmp_path / "features.parquet"
    out.write_text("previous result")
    # no heads: the tensors do not show them, and no registered model has this shape
    result = invoke("features", image_dir, "-c", mim_file, "-o", out, expect=1)
    assert "cannot tell the number of attention heads" in result.output and "Traceback" not in result.output
    # a file that is not a checkpoint
    result = invoke("features", image_dir, "-c", images[0], "-o", out, "--num-heads", 2, expect=1)
    assert f"{images[0]} is not a PyTorch checkpoint" in result.output
    # a missing checkpoint, an empty folder, --pool with --per-patch: usage errors
    assert "does not exist" in invoke("features", image_dir, "-c", tmp_path / "nope.pt", "-o", out, expect=2).output
    (tmp_path / "empty").mkdir()
    result = invoke("features", tmp_path / "empty", "-c", mim_file, "-o", out, "--num-heads", 2, expect=2)
    assert "no images in folder" in result.output
    result = invoke("features", image_dir, "-c", mim_file, "-o", out, "--per-patch", "--pool", "cls", expect=2)
    assert "takes no --pool" in result.output
    result = invoke("features", image_dir, "-c", mim_file, "-o", out, "--model", "eva_base_patch14_224", expect=1)
    assert "does not fit the checkpoint" in result.output and "embed_dim 768 vs 32" in result.output
    # an unreadable image stops the run, naming it; the previous output is intact
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    result = invoke("features", image_dir, broken, "-c", mim_file, "-o", out, "--num-heads", 2, expect=1)
    assert f"cannot read image {broken}: not an image" in result.output and "--skip-bad" in result.output
    assert out.read_text() == "previous result"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".features.parquet.tmp")]
    # ... or is left out with --skip-bad
    result = invoke("features", image_dir, broken, "-c", mim_file, "-o", out, "--num-heads", 2, "--skip-bad")
    assert f"skipped {broken}" in result.output
    assert read_features(out).paths == [str(p) for p in images]
