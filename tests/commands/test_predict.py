"""``eva-pipeline predict``: the top-k printed and written are the classifier's softmax on the preprocessed images,
with the class names the checkpoint carries or the ones given; wrong inputs are click errors."""

from __future__ import annotations

import csv
import json

import torch

from eva_pipeline.models import EvaClassifier


def _expected(model, x, names, k=5):
    with torch.no_grad():
        probs = torch.softmax(model.eval()(x), dim=-1)
    top = probs.topk(k, dim=-1)
    return [
        [(names[c], p) for p, c in zip(row_p, row_c, strict=True)]
        for row_p, row_c in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]


def test_top5_is_the_classifiers_softmax_with_the_checkpoints_class_names(
    tmp_path, invoke, image_dir, images, classifiers, classifier_file, class_names, preprocessed
):
    out = tmp_path / "predictions.json"
    result = invoke("predict", image_dir, "-c", classifier_file, "-o", out, "--batch-size", 4)
    want = _expected(classifiers[1], preprocessed(images), class_names)  # the EMA weights, as released
    written = json.loads(out.read_text())
    assert [p["image"] for p in written] == [str(p) for p in images]
    for row, expected in zip(written, want, strict=True):
        assert [g["rank"] for g in row["top"]] == [1, 2, 3, 4, 5]
        assert [g["class"] for g in row["top"]] == [name for name, _ in expected]
        assert all(abs(g["probability"] - p) < 1e-5 for g, (_, p) in zip(row["top"], expected, strict=True))
        assert all(class_names[g["index"]] == g["class"] for g in row["top"])
    assert max(row["top"][0]["probability"] for row in written) > 0.3  # not a uniform (meaningless) softmax
    # the table on stdout: a header, then each image's first row with its top class and probability
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["image", "rank", "class", "probability"]
    first = want[0][0]
    assert str(images[0]) in lines[1] and first[0] in lines[1] and f"{first[1]:.4f}" in lines[1]
    assert len(lines) == 1 + 5 * len(images)


def test_an_official_fine_tuned_file_with_class_names_from_json_and_a_csv(
    tmp_path, invoke, images, classifiers, official_classifier_file, class_names, preprocessed
):
    names_file = tmp_path / "class_names.json"  # ingestion's layout: {source: [names]}
    names_file.write_text(json.dumps({"fashion_mnist_train": class_names, "animal_mnist": ["cat"] * 10}))
    out = tmp_path / "predictions.csv"
    invoke(
        "predict", *images[:2], "-c", official_classifier_file, "--num-heads", 2, "--class-names", names_file,
        "--class-names-key", "fashion_mnist_train", "--top-k", 3, "-o", out,
    )  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * 3
    official = EvaClassifier(classifiers[0].config, 10, initialise=False)
    state = torch.load(official_classifier_file, weights_only=True)["model"]
    official.load_state_dict({k: v.float() for k, v in state.items()})  # the fp16 weights of the file
    want = _expected(official, preprocessed(images[:2]), class_names, k=3)
    got = [[(r["class"], float(r["probability"])) for r in rows[i * 3 : i * 3 + 3]] for i in range(2)]
    for g_row, w_row in zip(got, want, strict=True):
        assert [n for n, _ in g_row] == [n for n, _ in w_row]
        assert all(abs(gp - wp) < 1e-5 for (_, gp), (_, wp) in zip(g_row, w_row, strict=True))
    # without names the indices are shown, and said so
    result = invoke("predict", images[0], "-c", official_classifier_file, "--num-heads", 2)
    assert "carries no class names" in result.output


def test_predict_refuses_what_it_cannot_classify(tmp_path, invoke, images, mim_file, classifier_file, class_names):
    result = invoke("predict", images[0], "-c", mim_file, "--num-heads", 2, expect=1)
    assert "pre-trained encoder without a classifier head" in result.output and "features" in result.output
    short = tmp_path / "short.json"
    short.write_text(json.dumps(class_names[:3]))
    result = invoke("predict", images[0], "-c", classifier_file, "--class-names", short, expect=1)
    assert "3 class names for a head of 10 classes" in result.output
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"a": class_names, "b": class_names}))
    result = invoke("predict", images[0], "-c", classifier_file, "--class-names", two, expect=2)
    assert "choose one with --class-names-key" in result.output
    result = invoke("predict", images[0], "-c", classifier_file, "-o", tmp_path / "out.txt", expect=2)
    assert "must end in .json or .csv" in result.output
    assert "Traceback" not in result.output
