"""Smoke test of benchmarks/ingestion.py's ``manifest`` subcommand (in-process, tiny N): no assertion on speed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from eva_pipeline.ingest import scan as scan_mod

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ingestion.py"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setattr(scan_mod, "_SOURCE_READERS", dict(scan_mod._SOURCE_READERS))  # kind stays private
    spec = importlib.util.spec_from_file_location("eva_bench_ingestion", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_manifest_child_builds_the_synthetic_manifest(bench, tmp_path):
    result = bench.manifest_child(10_000, tmp_path)
    # probe 1000 items, pre-training 9000 of which 1 in 100 repeats a hash (half of them a probe image's);
    # 1 in 1000 of each source rejected
    assert result["rejected"] == 10 and result["duplicates"] == 90
    assert result["rows"] == 10_000 - 10 - 90 and result["rss_peak_mib"] >= result["rss_import_mib"] > 0
    table = bench.format_manifest_results([result, {**result, "n": 100_000, "wall_s": 2 * result["wall_s"]}])
    assert "| 10,000 |" in table and "time x2.00 (linear: 10)" in table


def test_cli_has_the_manifest_subcommand(bench):
    args = bench.build_parser().parse_args(["manifest", "--sizes", "10", "20"])
    assert args.command == "manifest" and args.sizes == [10, 20] and args.func is bench.cmd_manifest


def test_loader_and_scan_subcommands_run_on_a_tiny_folder(bench, tmp_path, capsys):
    assert (
        bench.main(
            [
                "loader",
                "--images",
                "12",
                "--batch",
                "4",
                "--steps",
                "2",
                "--rounds",
                "1",
                "--workers",
                "0",
                "--data",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "ours / torchvision" in out and out.strip().splitlines()[-1].endswith("x")
    assert len(list((tmp_path / "jpegs").rglob("*.jpg"))) == 12
    assert bench.main(["scan", "--images", "12", "--rounds", "1", "--workers", "1", "2", "--data", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].split("|")[0].strip() == "1" and lines[-1].split("|")[0].strip() == "2"
