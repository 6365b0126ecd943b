"""dvc.yaml against the Kedro project: one stage per pipeline, consistent deps/outs/params/metrics, offline."""

from __future__ import annotations

import os
import subprocess
from pathlib import PurePosixPath
from typing import Any

import pytest
from kedro.framework.project import configure_project

from eva_pipeline.pipeline_registry import register_pipelines

STAGES = ("ingestion", "teacher_targets", "train_student", "evaluation")


@pytest.fixture(scope="module")
def dvc(pl) -> dict[str, dict]:
    return pl.read_yaml(pl.PROJECT_ROOT / "dvc.yaml")["stages"]


@pytest.fixture(scope="module")
def registry():
    configure_project("eva_pipeline")
    return register_pipelines()


def _paths(entries: list[Any]) -> list[str]:
    """``- path`` or ``- path: {options}`` -> the paths."""
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def _written(stage: dict) -> list[str]:
    return _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots"))


def _inside(path: str, folder: str) -> bool:
    return PurePosixPath(path) == PurePosixPath(folder) or PurePosixPath(folder) in PurePosixPath(path).parents


def _catalog_paths(pl) -> dict[str, str]:
    catalog = pl.read_yaml(pl.CONF_BASE / "catalog.yml")
    paths = {}
    for name, entry in catalog.items():
        inner = entry.get("dataset", entry)
        if "filepath" in inner:
            paths[name] = inner["filepath"]
    return paths


def test_one_stage_per_pipeline_running_it(dvc):
    assert list(dvc) == list(STAGES)
    for name, stage in dvc.items():
        assert stage["cmd"] == f"kedro run --pipelines {name}"


def test_outs_of_different_stages_do_not_overlap(dvc):
    written = [(name, path) for name, stage in dvc.items() for path in _written(stage)]
    for i, (stage_a, a) in enumerate(written):
        for stage_b, b in written[i + 1 :]:
            assert not (_inside(a, b) or _inside(b, a)), f"{stage_a}:{a} overlaps {stage_b}:{b}"


def test_deps_are_raw_data_code_or_earlier_outs(dvc, pl):
    earlier: list[str] = []
    for name, stage in dvc.items():
        for dep in _paths(stage.get("deps")):
            produced = any(_inside(dep, out) for out in earlier)  # exists once the earlier stage has run
            assert produced or (pl.PROJECT_ROOT / dep).exists(), f"{name}: dep {dep} does not exist"
            if dep.startswith("data/"):
                assert _inside(dep, "data/01_raw") or any(_inside(dep, out) for out in earlier), (name, dep)
            else:
                assert _inside(dep, "src/eva_pipeline"), (name, dep)
        earlier += _written(stage)


def test_deps_cover_each_catalog_input_and_the_pipeline_code(dvc, registry, pl):
    paths = _catalog_paths(pl)
    for name, stage in dvc.items():
        deps = _paths(stage.get("deps"))
        assert f"src/eva_pipeline/pipelines/{name}" in deps
        for dataset in registry[name].inputs():
            if dataset in paths:
                assert any(_inside(paths[dataset], dep) for dep in deps), f"{name}: reads {dataset}, not a dep"
    # the stored targets are read through the receipt: the store folder is a dep of training too
    assert pl.base_params()["teacher_targets"]["output_dir"] in _paths(dvc["train_student"]["deps"])


def test_params_reference_existing_keys_of_the_blocks_each_stage_reads(dvc, registry, pl):
    for name, stage in dvc.items():
        referenced = set()
        for entry in stage.get("params", []):
            assert isinstance(entry, dict), f"{name}: params must name their file (conf/base/...)"
            for file, keys in entry.items():
                values = pl.read_yaml(pl.PROJECT_ROOT / file)
                for key in keys:
                    node = values
                    for part in key.split("."):
                        assert isinstance(node, dict) and part in node, f"{name}: {file}:{key} does not exist"
                        node = node[part]
                    referenced.add(key.split(".")[0])
        blocks = {d.removeprefix("params:") for d in registry[name].inputs() if d.startswith("params:")}
        assert blocks == referenced, f"{name}: nodes read {blocks}, dvc.yaml tracks {referenced}"
        own = f"conf/base/parameters_{'pretrain' if name == 'train_student' else name}.yml"
        assert any(own in entry for entry in stage["params"]), (name, own)


def test_metrics_are_the_catalogs_json_reports(dvc, pl):
    paths = _catalog_paths(pl)
    metrics = {path for stage in dvc.values() for path in _paths(stage.get("metrics"))}
    assert metrics == {paths["probe_metrics"], paths["pretrain_summary"]}
    assert _paths(dvc["evaluation"]["metrics"]) == [paths["probe_metrics"]]
    assert _paths(dvc["train_student"]["metrics"]) == [paths["pretrain_summary"]]
    for stage in dvc.values():
        for entry in stage.get("metrics", []):
            assert next(iter(entry.values())).get("cache") is False  # small JSON: kept in git, not the cache


def test_every_file_a_pipeline_writes_is_inside_its_stage(dvc, registry, pl):
    paths = _catalog_paths(pl)
    params = pl.base_params()
    for name, stage in dvc.items():
        written = _written(stage)
        targets = [paths[d] for d in registry[name].outputs() if d in paths]
        if name == "teacher_targets":
            targets.append(params["teacher_targets"]["output_dir"])
        if name == "train_student":
            targets.append(params["pretrain"]["checkpoint"]["dir"])
        assert targets
        for target in targets:
            assert any(_inside(target, out) for out in written), f"{name} writes {target} outside its outs"


def test_resumable_folders_persist_across_reruns(dvc, pl):
    params = pl.base_params()
    outs = {next(iter(e)): next(iter(e.values())) for s in dvc.values() for e in s["outs"] if isinstance(e, dict)}
    assert outs[params["pretrain"]["checkpoint"]["dir"]] == {"persist": True, "cache": False}
    assert outs[params["teacher_targets"]["output_dir"]].get("persist") is True
    assert outs[params["ingestion"]["cache_dir"]] == {"persist": True, "cache": False}


def test_dvc_reads_the_same_dag(pl):
    """DVC itself (offline) parses dvc.yaml, finds no overlapping outputs and derives the stage order."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc_bin = pl.PROJECT_ROOT / ".venv" / "bin" / "dvc"
    if not dvc_bin.exists():
        pytest.skip("dvc is not installed in .venv")
    result = subprocess.run(
        [str(dvc_bin), "dag", "--dot"], cwd=pl.PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    edges = {
        tuple(part.strip().strip('";') for part in line.split("->"))
        for line in result.stdout.splitlines()
        if "->" in line
    }
    assert edges == {
        ("ingestion", "teacher_targets"),
        ("ingestion", "train_student"),
        ("ingestion", "evaluation"),
        ("teacher_targets", "train_student"),
        ("train_student", "evaluation"),
    }
