"""dvc.yaml against the Kedro project: one stage per pipeline, consistent deps/outs/params/metrics, offline.

Code deps: each stage's deps must cover the import closure of its pipeline (scripts/dvc_code_deps.py), else
``dvc repro`` keeps outputs built by old code.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from dvc_code_deps import covering_deps, main, module_closure, rewrite_code_deps, stage_closure, uncovered
from kedro.framework.project import configure_project

from eva_pipeline.pipeline_registry import STAGES, register_pipelines

#: The parameter file each stage owns (train_student reads its settings from the student_config dataset).
OWN_BLOCK = {
    "ingestion": "ingestion",
    "student_config": "pretrain",
    "teacher_targets": "teacher_targets",
    "evaluation": "evaluation",
    "finetune_intermediate": "finetune_intermediate",
    "finetune": "finetune",
    "classification_eval": "classification_eval",
}


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
    catalog = pl.read_catalog()
    paths = {}
    for name, entry in catalog.items():
        inner = entry.get("dataset", entry)
        if "filepath" in inner:
            paths[name] = inner["filepath"]
    return paths


def _in_place(pl) -> set[str]:
    """Catalog folders a node takes as input and writes into (FolderDataset): outs of that node's stage."""
    catalog = pl.read_catalog()
    return {name for name, entry in catalog.items() if entry["type"] == "eva_pipeline.datasets.FolderDataset"}


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
        for dataset in registry[name].inputs() - _in_place(pl):
            if dataset in paths:
                assert any(_inside(paths[dataset], dep) for dep in deps), f"{name}: reads {dataset}, not a dep"
    # the stored targets are read through the teacher_targets dataset: its folder (store + receipt) is a dep
    assert _catalog_paths(pl)["teacher_targets"] in _paths(dvc["train_student"]["deps"])


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
        if name in OWN_BLOCK:
            own = f"conf/base/parameters_{OWN_BLOCK[name]}.yml"
            assert any(own in entry for entry in stage["params"]), (name, own)
    # train_student's own settings are the resolved pretrain block: the student_config dataset, a dep
    assert "student_config" in registry["train_student"].inputs()
    assert not any("parameters_pretrain.yml" in entry for entry in dvc["train_student"]["params"])


def test_metrics_are_the_catalogs_json_reports(dvc, pl):
    paths = _catalog_paths(pl)
    metrics = {path for stage in dvc.values() for path in _paths(stage.get("metrics"))}
    reports = (
        "probe_metrics",
        "pretrain_summary",
        "intermediate_summary",
        "finetune_summary",
        "classification_metrics",
        "video_intermediate_summary",
        "finetune_video_summary",
        "video_metrics",
    )
    assert metrics == {paths[name] for name in reports}
    assert _paths(dvc["evaluation"]["metrics"]) == [paths["probe_metrics"]]
    assert _paths(dvc["train_student"]["metrics"]) == [paths["pretrain_summary"]]
    assert _paths(dvc["classification_eval"]["metrics"]) == [paths["classification_metrics"]]
    for stage in dvc.values():
        for entry in stage.get("metrics", []):
            assert next(iter(entry.values())).get("cache") is False  # small JSON: kept in git, not the cache


def test_every_file_a_pipeline_writes_is_inside_its_stage(dvc, registry, pl):
    paths = _catalog_paths(pl)
    for name, stage in dvc.items():
        written = _written(stage)
        written_datasets = registry[name].outputs() | (registry[name].inputs() & _in_place(pl))
        targets = [paths[d] for d in written_datasets if d in paths]
        assert targets
        for target in targets:
            assert any(_inside(target, out) for out in written), f"{name} writes {target} outside its outs"


def test_resumable_folders_persist_across_reruns(dvc, pl):
    outs = {next(iter(e)): next(iter(e.values())) for s in dvc.values() for e in s["outs"] if isinstance(e, dict)}
    assert outs[_catalog_paths(pl)["pretrain_checkpoints"]] == {"persist": True, "cache": False}
    assert outs[_catalog_paths(pl)["teacher_targets_store"]].get("persist") is True
    assert outs[_catalog_paths(pl)["ingestion_scan_cache"]] == {"persist": True, "cache": False}


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
        ("student_config", "teacher_targets"),
        ("student_config", "train_student"),
        ("student_config", "evaluation"),
        ("teacher_targets", "train_student"),
        ("train_student", "evaluation"),
        ("ingestion", "finetune_intermediate"),
        ("student_config", "finetune_intermediate"),
        ("train_student", "finetune_intermediate"),
        ("ingestion", "finetune"),
        ("student_config", "finetune"),
        ("train_student", "finetune"),
        ("finetune_intermediate", "finetune"),
        ("ingestion", "classification_eval"),
        ("finetune", "classification_eval"),
        ("video_ingestion", "finetune_video_intermediate"),
        ("student_config", "finetune_video_intermediate"),
        ("train_student", "finetune_video_intermediate"),
        ("finetune_intermediate", "finetune_video_intermediate"),
        ("video_ingestion", "finetune_video"),
        ("student_config", "finetune_video"),
        ("finetune_video_intermediate", "finetune_video"),
        ("video_ingestion", "video_eval"),
        ("finetune_video", "video_eval"),
    }


# ------------------------------------------------------------------------------------------------ code deps
@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_cover_the_import_closure_of_the_stage(dvc, stage):
    closure = stage_closure(stage)
    missing = uncovered(closure, _paths(dvc[stage].get("deps")))
    assert not missing, (
        f"dvc.yaml stage {stage!r}: its deps do not cover these modules it imports: "
        f"{', '.join(p.as_posix() for p in missing)}; run `.venv/bin/python scripts/dvc_code_deps.py --write`"
    )


def test_closures_reach_the_modules_the_issue_names():
    train = stage_closure("train_student")
    modules = (
        "loader/batches.py",
        "loader/augment.py",
        "targets/store.py",
        "runtime/launch.py",
        "teachers/__init__.py",
        "teachers/factory.py",
        "config.py",
    )
    for module in modules:
        assert Path("src/eva_pipeline", module) in train, module
    assert Path("src/eva_pipeline/training/worker.py") in train  # run by name: python -m eva_pipeline.training.worker
    assert Path("src/eva_pipeline/targets/extract.py") in stage_closure("teacher_targets")
    evaluation = stage_closure("evaluation")
    assert Path("src/eva_pipeline/models/eva.py") in evaluation
    # find_pipelines imports every pipeline package, but only the selected one runs: not followed
    assert not any(p.is_relative_to("src/eva_pipeline/pipelines/train_student") for p in evaluation)
    # cli.py is imported by every kedro command; its commands' bodies (the dry run) are not run by `kedro run`
    assert Path("src/eva_pipeline/cli.py") in evaluation
    assert Path("src/eva_pipeline/dry_run.py") not in evaluation | train


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


SYNTHETIC = {
    "src/eva_pipeline/__init__.py": "",
    "src/eva_pipeline/settings.py": "from eva_pipeline.hooks import Hook\n",
    "src/eva_pipeline/hooks.py": "class Hook:\n    pass\n",
    "src/eva_pipeline/pipeline_registry.py": "from kedro.framework.project import find_pipelines\n",
    "src/eva_pipeline/io.py": "",  # named by the catalog only
    "src/eva_pipeline/pipelines/__init__.py": "",
    "src/eva_pipeline/pipelines/foo/__init__.py": "from .pipeline import create\n",  # relative
    "src/eva_pipeline/pipelines/foo/pipeline.py": (
        "def create():\n    from eva_pipeline.lib import lazy  # in a function; a submodule of a package\n"
        "    return lazy\n"
    ),
    "src/eva_pipeline/pipelines/bar/__init__.py": "import eva_pipeline.unused\n",  # another pipeline: not run
    "src/eva_pipeline/lib/__init__.py": "",
    "src/eva_pipeline/lib/lazy.py": (
        "from . import sibling\nfrom ..deep.inner import leaf\n"
        "WORKER = 'eva_pipeline.worker'\nNOT_A_MODULE = 'eva_pipeline.unused.Thing'\n"
    ),
    "src/eva_pipeline/lib/sibling.py": "",
    "src/eva_pipeline/lib/spare.py": "",
    "src/eva_pipeline/deep/__init__.py": "",
    "src/eva_pipeline/deep/stray.py": "",
    "src/eva_pipeline/deep/inner/__init__.py": "",
    "src/eva_pipeline/deep/inner/leaf.py": "import json\n",
    "src/eva_pipeline/worker.py": "",
    "src/eva_pipeline/unused.py": "",
    "conf/base/catalog.yml": "thing:\n  type: eva_pipeline.io.ThingDataset  # a class\n  filepath: data/x\n",
}
FOO_CLOSURE = {
    f"src/eva_pipeline/{name}"
    for name in (
        "__init__.py", "settings.py", "hooks.py", "pipeline_registry.py", "io.py", "pipelines/__init__.py",
        "pipelines/foo/__init__.py", "pipelines/foo/pipeline.py", "lib/__init__.py", "lib/lazy.py", "lib/sibling.py",
        "deep/__init__.py", "deep/inner/__init__.py", "deep/inner/leaf.py", "worker.py",
    )
}  # fmt: skip


def test_closure_of_a_synthetic_package(tmp_path):
    _tree(tmp_path, SYNTHETIC)
    closure = stage_closure("foo", root=tmp_path)
    assert {p.as_posix() for p in closure} == FOO_CLOSURE
    deps = covering_deps(closure, root=tmp_path)
    assert "src/eva_pipeline/pipelines/foo" in deps and "src/eva_pipeline/deep/inner" in deps  # whole folders
    assert "src/eva_pipeline/lib/lazy.py" in deps and "src/eva_pipeline/deep/__init__.py" in deps  # folder not full
    assert not uncovered(closure, deps)
    assert uncovered(closure, [d for d in deps if d != "src/eva_pipeline/lib/lazy.py"]) == [
        Path("src/eva_pipeline/lib/lazy.py")
    ]
    # without the lazy import, lazy.py and all it reaches drop out
    (tmp_path / "src/eva_pipeline/pipelines/foo/pipeline.py").write_text("def create():\n    return None\n")
    src = tmp_path / "src"
    pipelines = src / "eva_pipeline" / "pipelines"
    assert module_closure([pipelines / "foo" / "pipeline.py"], src) == {
        pipelines / "foo" / "pipeline.py",
        pipelines / "foo" / "__init__.py",
        pipelines / "__init__.py",
        src / "eva_pipeline" / "__init__.py",
    }


DVC_YAML = """# top comment
stages:
  foo:
    cmd: kedro run --pipelines foo
    deps:
      - data/01_raw/x   # raw data
      - src/eva_pipeline/pipelines/foo  # the pipeline
      # a comment inside the list
      - data/02_intermediate/y:
          cache: false
    outs:
      - data/03_primary/z
"""


def test_check_and_write_edit_only_the_code_deps(tmp_path, capsys):
    _tree(tmp_path, SYNTHETIC)
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(DVC_YAML)
    assert main(["--check", "--dvc-yaml", str(dvc_yaml)]) == 1
    assert "src/eva_pipeline/lib/lazy.py" in capsys.readouterr().out
    assert main(["--write", "--dvc-yaml", str(dvc_yaml)]) == 0
    text = dvc_yaml.read_text()
    kept = [line for line in text.splitlines() if not line.startswith("      - src/")]
    assert kept == [line for line in DVC_YAML.splitlines() if not line.startswith("      - src/")]
    assert "      - src/eva_pipeline/pipelines/foo  # the pipeline\n" in text  # an entry that stays is kept verbatim
    assert main(["--check", "--dvc-yaml", str(dvc_yaml)]) == 0
    assert rewrite_code_deps(text, {"foo": covering_deps(stage_closure("foo", root=tmp_path), tmp_path)}) == text
