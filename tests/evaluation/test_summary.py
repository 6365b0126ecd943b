"""The text a run prints at its end: the probe table, the stage tables it wrote, and the plots it wrote."""

from __future__ import annotations

import os
import time
from pathlib import Path

from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline, node

from eva_pipeline.evaluation.summary import files_written_since, probe_markdown, run_summary
from eva_pipeline.hooks import RunSummaryHook

METRICS = {
    "probe_top1_pretrained": 0.8285,
    "probe_top1_random": 0.7755,
    "probe_top1_raw_pixels": 0.803,
    "probe_top1_teacher": 0.9025,
    "probe_gain": 0.053,
    "probe_chance": 0.1,
}


def test_probe_markdown_rows_in_percent() -> None:
    text = probe_markdown(METRICS)
    lines = text.strip().splitlines()
    assert lines[0] == "| features | probe top-1 |"
    assert lines[2:] == [
        "| EVA student (pre-trained) | 82.8 |",
        "| teacher | 90.2 |",
        "| random init (same architecture) | 77.5 |",
        "| raw pixels | 80.3 |",
        "| chance | 10.0 |",
    ]
    assert probe_markdown({"probe_top1_pretrained": 0.5}).strip().splitlines()[2:] == [
        "| EVA student (pre-trained) | 50.0 |"
    ]


def test_files_written_since_keeps_new_figures_only(tmp_path: Path) -> None:
    old, new, text = tmp_path / "a" / "old.png", tmp_path / "b" / "new.png", tmp_path / "b" / "table.md"
    for p in (old, new, text):
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert files_written_since(tmp_path, time.time() - 10) == [new]
    assert files_written_since(tmp_path / "missing", 0.0) == []


def test_run_summary_text(tmp_path: Path) -> None:
    text = run_summary({"Probe": "| a |\n"}, [tmp_path / "data" / "x.png"], relative_to=tmp_path)
    assert text == "## Probe\n\n| a |\n\n## Plots written by this run\n\n- data/x.png\n"
    assert run_summary({}, []) == ""


def test_hook_prints_the_tables_this_run_wrote(tmp_path: Path, capsys) -> None:
    catalog = DataCatalog(
        {"probe_metrics": MemoryDataset(METRICS), "video_table": MemoryDataset("| video |\n"), "x": MemoryDataset(1)}
    )
    pipeline = Pipeline([node(lambda x: x, "x", "probe_metrics", name="probe")])
    hook = RunSummaryHook()
    run_params = {"project_path": str(tmp_path)}
    hook.before_pipeline_run(run_params, pipeline, catalog)
    plot = tmp_path / "data" / "08_reporting" / "evaluation" / "probe_top1.png"
    plot.parent.mkdir(parents=True)
    plot.write_bytes(b"png")
    hook.after_pipeline_run(run_params, pipeline, catalog)
    out = capsys.readouterr().out
    assert "## Linear probe on held-out images" in out and "| EVA student (pre-trained) | 82.8 |" in out
    assert "video" not in out  # not written by this run
    assert "- data/08_reporting/evaluation/probe_top1.png" in out
