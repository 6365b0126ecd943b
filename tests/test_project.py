"""The installed project: package metadata, entry points, Kedro project settings (kept light)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import eva_pipeline

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def test_installed_metadata_matches_pyproject():
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert importlib.metadata.version("eva_pipeline") == pyproject["project"]["version"]
    assert Path(eva_pipeline.__file__).resolve().is_relative_to(PROJECT_ROOT / "src")  # editable install of this tree
    entry_points = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "eva-pipeline" and ep.value == "eva_pipeline.__main__:main" for ep in entry_points)
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
    from eva_pipeline.hooks import MlflowRunHook, PreflightHook

    assert {type(h) for h in settings.HOOKS} == {PreflightHook, MlflowRunHook}
    assert settings.CONFIG_LOADER_ARGS["merge_strategy"] == {"parameters": "soft"}
    assert settings.CONFIG_LOADER_ARGS["base_env"] == "base"
