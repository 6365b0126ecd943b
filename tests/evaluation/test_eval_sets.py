"""Evaluation sets of the classification table: row selection, labels by class name (ReaL, class_map, subsets),
streamed logits equal to a direct computation, scores by hand and equal to the existing scorers, and the
natural-adversarial selection equal to a direct call, on the embedded Fashion-MNIST."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from eva_pipeline.config import EvalSetParams
from eva_pipeline.evaluation.classification import real_accuracy, subset_accuracy, topk_accuracy
from eva_pipeline.evaluation.robustness import inverted, natural_adversarial, sketch
from eva_pipeline.evaluation.sets import (
    EvalSet,
    NaturalAdversarialReference,
    RenderedPixels,
    build_eval_set,
    file_name,
    label_set,
    natural_adversarial_reference,
    row_class_names,
    score_set,
    select_set_rows,
    set_logits,
)
from eva_pipeline.finetune.augment import eval_transform
from eva_pipeline.ingest.readers.idx import read_idx
from eva_pipeline.loader.classification import to_pil
from eva_pipeline.loader.pixels import TensorPixels, load_images
from eva_pipeline.models.registry import create_classifier

RAW = Path(__file__).resolve().parents[2] / "data" / "01_raw" / "fashion_mnist"
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def fashion_rows(source: str, prefix: str, count: int, split: str = "probe") -> pd.DataFrame:
    """The first ``count`` images of an embedded Fashion-MNIST IDX pair as manifest rows (absolute locations)."""
    labels = read_idx(RAW / f"{prefix}-labels-idx1-ubyte.gz")[:count]
    images = RAW / f"{prefix}-images-idx3-ubyte.gz"
    return pd.DataFrame(
        {
            "id": [f"{source}/{i}" for i in range(count)],
            "source": source,
            "location": [f"{images}#{i}" for i in range(count)],
            "label": pd.array(labels.astype(np.int64), dtype="Int64"),
            "width": 28,
            "height": 28,
            "split": split,
        }
    )


def hand_rows(source: str, labels: list[int], names: list[str] | None = None) -> pd.DataFrame:
    """Rows that are never read (labels and selection only); ``names``: file names of the locations."""
    names = names or [f"{source}_{i}.png" for i in range(len(labels))]
    return pd.DataFrame(
        {
            "id": [f"{source}/{n}" for n in names],
            "source": source,
            "location": [f"images/{source}/{n}" for n in names],
            "label": pd.array(labels, dtype="Int64"),
            "width": 8,
            "height": 8,
            "split": "probe",
        }
    )


def params(**fields) -> EvalSetParams:
    return EvalSetParams(**{"name": "s", "sources": ["a"], **fields})


# ---------------------------------------------------------------------------------------------------- rows
def test_rows_of_the_sources_classes_then_evenly_spaced_with_the_set_or_default_limit() -> None:
    rows = pd.concat([hand_rows("a", [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]), hand_rows("b", [0, 0])], ignore_index=True)
    names = {"a": ["x", "y", "z"], "b": ["x", "y"]}
    everything = select_set_rows(params(), rows, names, default_max_images=None)
    assert everything.rows["id"].tolist() == [f"a/a_{i}.png" for i in range(10)]
    assert everything.set_classes == ("x", "y", "z") and everything.candidates == 10
    spaced = select_set_rows(params(), rows, names, default_max_images=4)
    assert spaced.rows["id"].tolist() == [f"a/a_{i}.png" for i in (0, 2, 5, 7)]  # floor(i * 10 / 4)
    own = select_set_rows(params(max_images=5), rows, names, default_max_images=4)
    assert own.rows["id"].tolist() == [f"a/a_{i}.png" for i in (0, 2, 4, 6, 8)]
    # the classes filter comes first, the subsample after it; set_classes stay the set's, not the sample's
    xz = select_set_rows(params(classes=["z", "x"], max_images=2), rows, names, default_max_images=None)
    assert xz.rows["id"].tolist() == ["a/a_0.png", "a/a_5.png"] and xz.candidates == 7
    assert xz.set_classes == ("z", "x")
    few = select_set_rows(params(max_images=1), rows, names, default_max_images=None)
    assert few.set_classes == ("x", "y", "z") and len(few.rows) == 1
    both = select_set_rows(params(sources=["b", "a"]), rows, names, default_max_images=None)
    assert len(both.rows) == 12 and both.rows["source"].tolist()[:10] == ["a"] * 10  # manifest order


def test_row_errors_name_what_is_wrong() -> None:
    rows = hand_rows("a", [0, 1])
    with pytest.raises(ValueError, match=r"sources \['b'\] have no rows"):
        select_set_rows(params(sources=["a", "b"]), rows, {"a": ["x", "y"]}, default_max_images=None)
    with pytest.raises(ValueError, match=r"classes 'w' are not classes of \['a'\]"):
        select_set_rows(params(classes=["x", "w"]), rows, {"a": ["x", "y", "z"]}, default_max_images=None)
    with pytest.raises(ValueError, match="has no images"):
        select_set_rows(params(classes=["z"]), rows, {"a": ["x", "y", "z"]}, default_max_images=None)
    with pytest.raises(ValueError, match="source 'a' has no class names"):
        select_set_rows(params(), rows, {"b": ["x"]}, default_max_images=None)
    with pytest.raises(ValueError, match="labels reach 1 but it has 1 class names"):
        row_class_names(rows, {"a": ["x"]})
    unlabelled = rows.assign(label=pd.array([0, None], dtype="Int64"))
    with pytest.raises(ValueError, match="1 row"):
        row_class_names(unlabelled, {"a": ["x", "y"]})
    with pytest.raises(ValueError, match="give the reference"):
        select_set_rows(params(natural_adversarial=True), rows, {"a": ["x", "y"]}, default_max_images=None)


# -------------------------------------------------------------------------------------------------- labels
MODEL = ["cat", "dog", "bird", "fish", "cow", "ant"]


def test_classes_combine_by_name_across_sources_and_a_missing_model_class_is_named() -> None:
    rows = pd.concat([hand_rows("a", [0, 1, 2]), hand_rows("b", [0, 1])], ignore_index=True)
    names = {"a": ["dog", "cat", "cow"], "b": ["cow", "dog"]}
    eval_set = build_eval_set(params(sources=["a", "b"]), rows, names, MODEL, default_max_images=None)
    assert eval_set.correct == ((1,), (0,), (4,), (4,), (1,))
    assert eval_set.scored_classes is None and eval_set.num_scored_classes == 6
    assert eval_set.describe() == {"kind": "real", "images": 5, "scored_classes": 6, "in_average": True}
    names["b"] = ["cow", "wolf"]
    with pytest.raises(ValueError, match=r"classes 'wolf' are not among the model's 6 classes .*class_map"):
        build_eval_set(params(sources=["a", "b"]), rows, names, MODEL, default_max_images=None)
    with pytest.raises(ValueError, match="repeat names"):
        build_eval_set(params(), rows, {"a": ["dog", "cat", "cow"]}, ["cat", "cat"], default_max_images=None)


def test_scored_subset_from_classes_or_from_the_sets_images_before_the_subsample() -> None:
    rows = hand_rows("a", [0, 1, 2, 0, 1, 2])
    names = {"a": ["fish", "cat", "ant"]}
    listed = build_eval_set(params(classes=["ant", "cat"]), rows, names, MODEL, default_max_images=None)
    assert listed.scored_classes == (0, 5) and len(listed.rows) == 4
    own = build_eval_set(params(score_over_set_classes=True, max_images=2), rows, names, MODEL, default_max_images=1)
    assert own.scored_classes == (0, 3, 5)  # the set's three classes, though the two images show one
    assert own.correct == ((3,), (3,)) and own.num_scored_classes == 3


def test_real_labels_by_file_name_mapped_by_name(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text(json.dumps([[0], [1, 2], [], [2], [0, 3]]))  # entry i: ILSVRC2012_val_{i + 1}
    files = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (2, 3, 5, 1)]
    rows = hand_rows("val", [1, 0, 3, 0], files)
    names = {"val": ["dog", "bird", "cow", "fish"]}  # the source's label ints are ReaL's ints
    eval_set = build_eval_set(params(sources=["val"], real_labels=real), rows, names, MODEL, default_max_images=None)
    assert eval_set.correct == ((2, 4), (), (1, 3), (1,))
    assert eval_set.scored_images == 3 and eval_set.describe()["images"] == 3
    with pytest.raises(ValueError, match="no ReaL entry"):
        build_eval_set(
            params(sources=["val"], real_labels=real),
            hand_rows("val", [0], ["ILSVRC2012_val_00000009.JPEG"]),
            names,
            MODEL,
            default_max_images=None,
        )
    assert file_name("shards/000.tar#sub/ILSVRC2012_val_00000001.JPEG") == "ILSVRC2012_val_00000001.JPEG"
    assert file_name("val/n01/ILSVRC2012_val_00000001.JPEG") == "ILSVRC2012_val_00000001.JPEG"


def test_class_map_relabels_set_classes_and_unmapped_classes_are_named(tmp_path: Path) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"pet": ["cat", "dog"], "livestock": ["cow"], "other": []}))
    rows = hand_rows("on", [0, 1, 2, 0])
    names = {"on": ["pet", "livestock", "other", "wild"]}
    eval_set = build_eval_set(
        params(sources=["on"], class_map=mapping, score_over_set_classes=True),
        rows,
        names,
        MODEL,
        default_max_images=None,
    )
    assert eval_set.correct == ((0, 1), (4,), (), (0, 1)) and eval_set.scored_classes == (0, 1, 4)
    with pytest.raises(ValueError, match=r"classes 'wild' are not in class_map .*`classes`"):
        build_eval_set(
            params(sources=["on"], class_map=mapping), hand_rows("on", [3]), names, MODEL, default_max_images=None
        )
    with pytest.raises(ValueError, match="not both"):
        build_eval_set(
            params(sources=["on"], class_map=mapping, real_labels=mapping), rows, names, MODEL, default_max_images=None
        )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pet": "cat"}))
    with pytest.raises(ValueError, match="expected a JSON object"):
        build_eval_set(params(sources=["on"], class_map=bad), rows, names, MODEL, default_max_images=None)


# -------------------------------------------------------------------------------------------------- scores
def approx(expected):
    """The existing scorers average in float32; score_set counts exactly."""
    return pytest.approx(expected, abs=1e-6)


def labelled(correct: list[tuple[int, ...]], scored: tuple[int, ...] | None = None, classes: int = 6) -> EvalSet:
    rows = hand_rows("a", [0] * len(correct))
    return EvalSet(params(), rows, tuple(MODEL[:classes]), tuple(correct), scored)


def test_scores_by_hand_on_a_subset_with_k_clipped() -> None:
    logits = torch.tensor(
        [
            [9.0, 1.0, 0.0, 2.0, 0.5, 3.0],  # over (1, 3, 4): 3, 1, 4
            [0.0, 5.0, 9.0, 4.0, 6.0, 0.0],  # over (1, 3, 4): 4, 1, 3
            [0.0, 1.0, 0.0, 3.0, 2.0, 9.0],  # over (1, 3, 4): 3, 4, 1
        ]
    )
    eval_set = labelled([(3,), (1,), (1,)], scored=(1, 3, 4))
    assert score_set(logits, eval_set) == {"top1": pytest.approx(1 / 3), "top5": 1.0, "images": 3}
    assert score_set(logits, eval_set, ks=(2,)) == {"top2": pytest.approx(2 / 3), "images": 3}
    # the same as the existing subset scorer, whose targets index the subset
    expected = subset_accuracy(logits, torch.tensor([1, 0, 0]), (1, 3, 4), ks=(1, 2))
    assert score_set(logits, eval_set, ks=(1, 2)) == approx({"top1": expected[1], "top2": expected[2], "images": 3})
    # without the subset the head's global argmax counts: no row is right at top-1
    assert score_set(logits, labelled([(3,), (1,), (1,)]), ks=(1,))["top1"] == 0.0


def test_scores_equal_topk_accuracy_on_single_labels() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 6, generator=gen)
    targets = torch.randint(0, 6, (200,), generator=gen)
    got = score_set(logits, labelled([(int(t),) for t in targets]), ks=(1, 3, 5))
    assert got == approx(
        {**{f"top{k}": v for k, v in topk_accuracy(logits, targets, (1, 3, 5)).items()}, "images": 200}
    )
    subset = (0, 2, 5)
    inside = targets[torch.isin(targets, torch.tensor(subset))]
    rows = torch.isin(targets, torch.tensor(subset))
    on_subset = score_set(logits[rows], labelled([(int(t),) for t in inside], scored=subset), ks=(1, 2))
    expected = subset_accuracy(logits[rows], torch.tensor([subset.index(int(t)) for t in inside]), subset, (1, 2))
    assert on_subset == approx({"top1": expected[1], "top2": expected[2], "images": len(inside)})


def test_real_multi_label_scores_by_hand_and_equal_real_accuracy() -> None:
    logits = torch.tensor(
        [
            [0.0, 5.0, 4.0, 1.0, 0.0, 0.0],  # 1, 2, 3
            [9.0, 0.0, 0.0, 0.0, 0.0, 8.0],  # skipped: empty set
            [0.0, 0.0, 1.0, 2.0, 3.0, 0.5],  # 4, 3, 2
            [1.0, 0.0, 0.0, 0.0, 0.0, 2.0],  # 5, 0
        ]
    )
    correct = [(2, 1), (), (3,), (4,)]
    got = score_set(logits, labelled(correct), ks=(1, 2, 5))
    assert got == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3), "top5": 1.0, "images": 3}
    expected = real_accuracy(logits, [list(c) for c in correct], ks=(1, 2, 5))
    assert [got["top1"], got["top2"], got["top5"]] == approx([expected[1], expected[2], expected[5]])
    with pytest.raises(ValueError, match="nothing to score"):
        score_set(logits[1:2], labelled([()]))
    with pytest.raises(ValueError, match=r"expected logits \(4, 6\)"):
        score_set(logits[:, :5], labelled(correct))


def test_class_map_scores_any_mapped_class_as_correct() -> None:
    logits = torch.tensor([[0.0, 3.0, 0.0, 0.0, 0.0, 1.0], [5.0, 0.0, 0.0, 0.0, 4.0, 0.0]])
    eval_set = labelled([(0, 1), (4,)], scored=(0, 1, 4))  # "pet" -> cat, dog; "livestock" -> cow
    assert score_set(logits, eval_set) == {"top1": 0.5, "top5": 1.0, "images": 2}


# ------------------------------------------------------------------------------------------ streamed logits
class MeanModel(torch.nn.Module):
    """Logits from each image's per-channel mean, through a fixed linear map (dropout: eval mode matters)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, classes)
        torch.nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(1))
        self.dropout = torch.nn.Dropout(0.9)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(images.mean(dim=(2, 3))))


def direct_logits(model: torch.nn.Module, images: torch.Tensor, transform, render=None) -> torch.Tensor:
    pixels = np.array(images.numpy() if render is None else render(images.numpy()))
    batch = torch.stack([transform(to_pil(p)) for p in torch.from_numpy(pixels)])
    model.eval()
    with torch.no_grad():
        return model(batch)


@pytest.mark.parametrize("rendition", ["none", "sketch", "inverted"])
def test_set_logits_stream_in_order_and_equal_a_direct_computation(rendition: str) -> None:
    rows = fashion_rows("fm", "t10k", 23)
    eval_set = build_eval_set(
        params(sources=["fm"], rendition=rendition), rows, {"fm": FASHION}, FASHION, default_max_images=None
    )
    model = MeanModel().train()
    transform = eval_transform(28)
    logits = set_logits(model, eval_set, transform, batch_size=5, device="cpu", progress=False)
    assert logits.shape == (23, 10) and logits.dtype == torch.float32
    assert model.training  # restored
    render = {"none": None, "sketch": sketch, "inverted": inverted}[rendition]
    expected = direct_logits(model, load_images(rows), transform, render)
    torch.testing.assert_close(logits, expected)


def test_rendered_pixels_are_picklable_and_render_each_image() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.int64).reshape(2, 3, 4, 4).to(torch.uint8)
    rendered = pickle.loads(pickle.dumps(RenderedPixels(TensorPixels(images), inverted)))
    assert len(rendered) == 2
    assert torch.equal(torch.stack(rendered(np.array([1, 0]))), 255 - images[[1, 0]])


def test_set_logits_feed_a_bfloat16_model_its_dtype_and_return_float32() -> None:
    eval_set = build_eval_set(
        params(sources=["fm"]), fashion_rows("fm", "t10k", 4), {"fm": FASHION}, FASHION, default_max_images=None
    )
    model = MeanModel().to(torch.bfloat16)
    logits = set_logits(model, eval_set, eval_transform(28), 2, "cpu", progress=False)
    assert logits.dtype == torch.float32 and logits.shape == (4, 10)


def test_set_logits_refuse_a_head_of_another_width() -> None:
    eval_set = build_eval_set(
        params(sources=["fm"]), fashion_rows("fm", "t10k", 3), {"fm": FASHION}, FASHION, default_max_images=None
    )
    with pytest.raises(ValueError, match="for 10 classes"):
        set_logits(MeanModel(7), eval_set, eval_transform(28), 2, "cpu", progress=False)


def test_a_tiny_eva_classifier_scored_end_to_end_equals_topk_accuracy() -> None:
    torch.manual_seed(0)
    model = create_classifier("eva_tiny_patch4_28", num_classes=10)
    rows = fashion_rows("fm", "t10k", 40)
    eval_set = build_eval_set(params(sources=["fm"]), rows, {"fm": FASHION}, FASHION, default_max_images=16)
    logits = set_logits(model, eval_set, eval_transform(28), batch_size=8, device="cpu", progress=False)
    targets = torch.as_tensor(eval_set.rows["label"].to_numpy(dtype=np.int64))
    expected = topk_accuracy(logits, targets)
    assert score_set(logits, eval_set) == approx({"top1": expected[1], "top5": expected[5], "images": 16})


# -------------------------------------------------------------------------------------- natural adversarial
def test_natural_adversarial_set_equals_a_direct_selection_then_subsample() -> None:
    names = {"fm_test": FASHION, "fm_train": FASHION}
    rows = pd.concat(
        [fashion_rows("fm_train", "train", 200, "pretrain"), fashion_rows("fm_test", "t10k", 100)], ignore_index=True
    )
    classes = ["Pullover", "T-shirt/top", "Shirt", "Coat"]  # label ints 2, 0, 6, 4
    set_params = params(
        sources=["fm_test"], natural_adversarial=True, classes=classes, score_over_set_classes=True, max_images=5
    )
    reference = natural_adversarial_reference(set_params, rows, ["fm_train"], names)
    train = fashion_rows("fm_train", "train", 200)
    keep = train["label"].isin([0, 2, 4, 6]).to_numpy()
    assert np.array_equal(reference.images, load_images(train[keep]).numpy())
    assert np.array_equal(reference.labels, train["label"].to_numpy(dtype=np.int64)[keep])

    selected = select_set_rows(set_params, rows, names, default_max_images=None, reference=reference, seed=3)
    test = fashion_rows("fm_test", "t10k", 100)
    labels = test["label"].to_numpy(dtype=np.int64)
    direct = natural_adversarial(
        reference.images, reference.labels, load_images(test).numpy(), labels, classes=[2, 0, 6, 4], seed=3
    )
    assert 5 < len(direct) < np.isin(labels, [0, 2, 4, 6]).sum()
    assert selected.candidates == len(direct)  # selected first, then evenly spaced
    spaced = np.floor(np.arange(5) * len(direct) / 5).astype(int)
    assert selected.rows["id"].tolist() == test["id"].iloc[direct[spaced]].tolist()
    eval_set = label_set(selected, names, FASHION)
    assert eval_set.scored_classes == (0, 2, 4, 6)
    assert eval_set.correct == tuple((int(label),) for label in labels[direct[spaced]])


def test_natural_adversarial_needs_one_label_space_and_a_reference_of_its_classes() -> None:
    rows = pd.concat([hand_rows("a", [0, 1]), hand_rows("b", [0, 1])], ignore_index=True)
    mixed = params(sources=["a", "b"], natural_adversarial=True)
    reference = NaturalAdversarialReference(np.zeros((2, 8, 8), np.uint8), np.array([0, 1]))
    with pytest.raises(ValueError, match="one label space"):
        select_set_rows(mixed, rows, {"a": ["x", "y"], "b": ["y", "x"]}, default_max_images=None, reference=reference)
    with pytest.raises(ValueError, match="no image of the classes"):
        natural_adversarial_reference(
            params(natural_adversarial=True, classes=["x"]),
            hand_rows("r", [1]),
            ["r"],
            {"a": ["x", "y"], "r": ["x", "y"]},
        )
