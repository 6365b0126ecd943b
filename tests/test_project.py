"""The installed project: package metadata, entry points, Kedro project settings (kept light)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import eva_pipeline

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def test_installed_metadata_matches_pyproject():
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert importlib.metadata.version("eva_pipeline") == pyproject["project"]["version"]
    assert Path(eva_pipeline.__file__).resolve().is_relative_to(PROJECT_ROOT / "src")  # editable install of this tree
    entry_points = importlib.metadata.entry_points(group="console_scripts")
    # the console script as pyproject declares it (a stale install, made before a change there, fails here)
    script = pyproject["project"]["scripts"]["eva-pipeline"]
    assert script == "eva_pipeline.commands:main"
    assert any(ep.name == "eva-pipeline" and ep.value == script for ep in entry_points)
    kedro = pyproject["tool"]["kedro"]
    assert (kedro["package_name"], kedro["source_dir"]) == ("eva_pipeline", "src")
    assert kedro["kedro_init_version"] == importlib.metadata.version("kedro")


def test_module_entry_point_shows_kedro_run_help():
    result = subprocess.run(
        [sys.executable, "-m", "eva_pipeline", "--help"],
        cwd=PROJECT_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--pipelines" in result.stdout and "--env" in result.stdout


def test_settings_register_the_project_hooks_and_soft_parameter_merge():
    from eva_pipeline import settings
    from eva_pipeline.hooks import (
        MlflowModelHook,
        MlflowRunHook,
        PreflightHook,
        ProjectMlflowHook,
        RunSummaryHook,
    )

    assert {type(h) for h in settings.HOOKS} == {
        PreflightHook,
        ProjectMlflowHook,
        MlflowRunHook,
        MlflowModelHook,
        RunSummaryHook,
    }
    assert "kedro_mlflow" in settings.DISABLE_HOOKS_FOR_PLUGINS  # its entry point's hook: ProjectMlflowHook replaces it
    assert settings.CONFIG_LOADER_ARGS["merge_strategy"] == {"parameters": "soft"}
    assert settings.CONFIG_LOADER_ARGS["base_env"] == "base"


def _readme_layout() -> str:
    """The code block of the README's "## Layout" section."""
    section = (PROJECT_ROOT / "README.md").read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


UPSTREAM_FILES = {"main_pretrain.py", "engine_pretrain.py"}  # MAE's files, named as the model the layout follows


def test_readme_layout_names_every_module_and_no_missing_file():
    """A newcomer finds each concept's file from the README alone: every library module and package is named there,
    and every file it names exists."""
    layout = _readme_layout()
    src = PROJECT_ROOT / "src" / "eva_pipeline"
    library = [p for p in src.rglob("*.py") if "pipelines" not in p.relative_to(src).parts[:-1]]
    unnamed = sorted(str(p.relative_to(src)) for p in library if p.name != "__init__.py" and p.name not in layout)
    assert not unnamed, f"README layout does not name {unnamed}"
    packages = sorted({p.parent.name for p in library if p.name == "__init__.py" and p.parent != src})
    assert not [name for name in packages if f"{name}/" not in layout], packages
    named = set(re.findall(r"[\w]+\.py\b", layout)) - UPSTREAM_FILES
    existing = {p.name for folder in ("src", "scripts", "benchmarks") for p in (PROJECT_ROOT / folder).rglob("*.py")}
    assert not sorted(named - existing), f"README layout names files that do not exist: {sorted(named - existing)}"


def _cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of a module graph (one per back edge of a depth-first search)."""
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(imports.get(module, ())):
            if state.get(imported) == 1:
                found.append([*path[path.index(imported) :], imported])
            elif imported in imports and not state.get(imported):
                visit(imported, path)
        path.pop()
        state[module] = 2

    for module in sorted(imports):
        if not state.get(module):
            visit(module, [])
    return found


def test_no_import_cycle_anywhere_in_src():
    grimp = pytest.importorskip("grimp")  # installed with import-linter (test extras)
    graph = grimp.build_graph("eva_pipeline")
    imports = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the search finds one
    assert _cycles(imports) == []
