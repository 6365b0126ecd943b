"""The classification table: every fine-tuned run's top-1/top-5 on every evaluation set, the robustness average
(mean top-1 over the sets with ``in_average``, the target included, as the EVA paper averages IN-1K, V2, ReaL, A, R
and Sketch) and the gap (target top-1 minus that average), as a DataFrame, markdown and a JSON-ready dict.

Scores come as ``{run: {set: {"top1": .., "top5": .., ...}}}`` (what :func:`~eva_pipeline.evaluation.sets.score_set`
returns, per run and set); sets are anything with ``name``, ``kind`` and ``in_average`` (``EvalSetParams`` or
:class:`~eva_pipeline.evaluation.sets.EvalSet`), in the order the table shows them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import pandas as pd

from eva_pipeline.evaluation.classification import robustness_average, robustness_gap
from eva_pipeline.evaluation.sets import EvalSet

Scores = Mapping[str, Mapping[str, Mapping[str, float]]]
#: The table's own columns (a set cannot be named so).
SUMMARY_COLUMNS: tuple[str, ...] = ("average", "gap")
METRICS: tuple[str, ...] = ("top1", "top5")


class SetLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def in_average(self) -> bool: ...


def column(set_name: str, metric: str) -> str:
    """The table's column of one set's metric: ``"imagenet/top1"``."""
    return f"{set_name}/{metric}"


def _checked(scores: Scores, sets: Sequence[SetLike], target: str) -> list[str]:
    """The averaged sets' names, after checking every run has every set and the names do not clash."""
    names = [s.name for s in sets]
    if clash := [n for n in names if n in SUMMARY_COLUMNS]:
        raise ValueError(f"sets may not be named {clash}: those are the table's own columns")
    if target not in names:
        raise ValueError(f"target {target!r} is not one of the sets {names}")
    if not scores:
        raise ValueError("no run to tabulate")
    for run, by_set in scores.items():
        if missing := [n for n in names if n not in by_set or any(m not in by_set[n] for m in METRICS)]:
            raise ValueError(f"run {run!r} has no top1/top5 for sets {missing}")
    averaged = [s.name for s in sets if s.in_average]
    if not averaged:
        raise ValueError("no set has in_average: the robustness average is over nothing")
    return averaged


def classification_table(scores: Scores, sets: Sequence[SetLike], target: str) -> pd.DataFrame:
    """Rows: runs (in ``scores`` order, index ``run``); columns: each set's ``top1`` and ``top5`` (fractions,
    :func:`column` names), then ``average`` and ``gap``."""
    averaged = _checked(scores, sets, target)
    records = []
    for by_set in scores.values():
        record = {column(s.name, m): float(by_set[s.name][m]) for s in sets for m in METRICS}
        top1 = {s.name: float(by_set[s.name]["top1"]) for s in sets}
        record["average"] = robustness_average(top1, averaged)
        record["gap"] = robustness_gap(top1, target, averaged)
        records.append(record)
    return pd.DataFrame(records, index=pd.Index(list(scores), name="run"))


def table_markdown(table: pd.DataFrame, sets: Sequence[SetLike], target: str) -> str:
    """The table in markdown, in percent: each set's headers say ``real`` or ``synthetic``; a note says what the
    average is over and what the gap is."""
    headers = ["run"]
    for s in sets:
        headers += [f"{s.name} ({s.kind}) top-1", f"{s.name} ({s.kind}) top-5"]
    headers += ["average top-1", "gap"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for run, row in table.iterrows():
        cells = [str(run)] + [f"{100 * row[column(s.name, m)]:.1f}" for s in sets for m in METRICS]
        cells += [f"{100 * row['average']:.1f}", f"{100 * row['gap']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    averaged = ", ".join(s.name for s in sets if s.in_average)
    lines += [
        "",
        f"Accuracy in %. average: mean top-1 over {averaged}; gap: {target} top-1 minus the average (points).",
    ]
    return "\n".join(lines) + "\n"


def classification_json(scores: Scores, sets: Sequence[EvalSet], target: str) -> dict[str, Any]:
    """``{"target", "sets": {name: {kind, images, scored_classes, in_average}}, "runs": {run: {set: {top1, top5},
    "average", "gap"}}}`` (plain floats and ints, ready for ``json.dump``)."""
    table = classification_table(scores, sets, target)
    runs: dict[str, Any] = {}
    for run, row in table.iterrows():
        entry: dict[str, Any] = {s.name: {m: float(row[column(s.name, m)]) for m in METRICS} for s in sets}
        entry.update(average=float(row["average"]), gap=float(row["gap"]))
        runs[str(run)] = entry
    return {"target": target, "sets": {s.name: s.describe() for s in sets}, "runs": runs}
