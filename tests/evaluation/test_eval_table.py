"""The classification table: the robustness average and gap by hand (and the paper's own numbers), markdown that
marks real and synthetic sets, and the JSON-ready report."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from eva_pipeline.config import EvalSetParams
from eva_pipeline.evaluation.sets import EvalSet
from eva_pipeline.evaluation.table import classification_json, classification_table, column, table_markdown

SETS = [
    EvalSetParams(name="target", sources=["t"]),
    EvalSetParams(name="fresh", sources=["f"]),
    EvalSetParams(name="sketch", kind="synthetic", sources=["t"], rendition="sketch"),
    EvalSetParams(name="objectnet", sources=["o"], in_average=False),
]
SCORES = {
    "intermediate": {
        "target": {"top1": 0.90, "top5": 0.99, "images": 100},
        "fresh": {"top1": 0.80, "top5": 0.97, "images": 100},
        "sketch": {"top1": 0.40, "top5": 0.70, "images": 100},
        "objectnet": {"top1": 0.10, "top5": 0.30, "images": 50},
    },
    "random": {
        "target": {"top1": 0.60, "top5": 0.90},
        "fresh": {"top1": 0.55, "top5": 0.85},
        "sketch": {"top1": 0.20, "top5": 0.50},
        "objectnet": {"top1": 0.05, "top5": 0.20},
    },
}


def test_average_over_the_averaged_sets_with_the_target_and_the_gap_by_hand() -> None:
    table = classification_table(SCORES, SETS, "target")
    assert list(table.index) == ["intermediate", "random"] and table.index.name == "run"
    assert list(table.columns) == [column(s.name, m) for s in SETS for m in ("top1", "top5")] + ["average", "gap"]
    # (0.90 + 0.80 + 0.40) / 3 = 0.70, ObjectNet left out; gap 0.90 - 0.70
    assert table.loc["intermediate", "average"] == pytest.approx(0.70)
    assert table.loc["intermediate", "gap"] == pytest.approx(0.20)
    # (0.60 + 0.55 + 0.20) / 3 = 0.45; gap 0.15
    assert table.loc["random", ["average", "gap"]].tolist() == pytest.approx([0.45, 0.15])
    assert table.loc["random", "sketch/top5"] == 0.50


def test_the_papers_own_numbers_give_its_gap() -> None:
    """EVA-g at 336 px: 89.62 on IN-1K, an average of 84.03 over the six sets (ObjectNet left out), a gap of 5.6."""
    top1 = {"in1k": 89.62, "v2": 81.57, "real": 90.83, "a": 86.15, "r": 88.28, "sketch": 67.72, "objectnet": 60.91}
    sets = [EvalSetParams(name=n, sources=["x"], in_average=n != "objectnet") for n in top1]
    scores = {"eva": {n: {"top1": v, "top5": v} for n, v in top1.items()}}
    row = classification_table(scores, sets, "in1k").loc["eva"]
    assert row["average"] == pytest.approx(504.17 / 6) and round(row["gap"], 1) == 5.6


def test_markdown_marks_real_and_synthetic_sets() -> None:
    text = table_markdown(classification_table(SCORES, SETS, "target"), SETS, "target")
    header, rule, first, second, blank, note = text.rstrip("\n").split("\n")
    assert header.split(" | ")[1:4] == ["target (real) top-1", "target (real) top-5", "fresh (real) top-1"]
    assert "sketch (synthetic) top-1" in header and "objectnet (real) top-5" in header
    assert rule == "|" + "---|" * 11
    assert first == "| intermediate | 90.0 | 99.0 | 80.0 | 97.0 | 40.0 | 70.0 | 10.0 | 30.0 | 70.0 | 20.0 |"
    assert second.startswith("| random | 60.0 |") and blank == ""
    assert "over target, fresh, sketch;" in note


def test_json_report_is_plain_and_describes_each_set() -> None:
    frame = pd.DataFrame({"location": ["a", "b", "c"], "source": "t", "label": [0, 0, 1]})
    described = [EvalSet(s, frame, ("x", "y"), ((0,), (), (1,)), (0,) if s.name == "sketch" else None) for s in SETS]
    report = classification_json(SCORES, described, "target")
    assert json.loads(json.dumps(report)) == report
    assert report["target"] == "target"
    assert report["sets"]["sketch"] == {"kind": "synthetic", "images": 2, "scored_classes": 1, "in_average": True}
    assert report["sets"]["objectnet"]["in_average"] is False
    assert report["runs"]["intermediate"]["fresh"] == {"top1": 0.80, "top5": 0.97}
    assert report["runs"]["random"]["average"] == pytest.approx(0.45)
    assert report["runs"]["random"]["gap"] == pytest.approx(0.15)


def test_table_errors() -> None:
    with pytest.raises(ValueError, match="not one of the sets"):
        classification_table(SCORES, SETS, "imagenet")
    with pytest.raises(ValueError, match=r"run 'random' has no top1/top5 for sets \['fresh'\]"):
        classification_table({"random": {**SCORES["random"], "fresh": {"top1": 0.5}}}, SETS, "target")
    with pytest.raises(ValueError, match="table's own columns"):
        classification_table(SCORES, [*SETS, EvalSetParams(name="gap", sources=["g"])], "target")
    with pytest.raises(ValueError, match="no set has in_average"):
        classification_table(SCORES, [s.model_copy(update={"in_average": False}) for s in SETS], "target")
    with pytest.raises(ValueError, match="no run"):
        classification_table({}, SETS, "target")
