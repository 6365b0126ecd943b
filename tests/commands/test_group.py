"""The console script's group: every command listed, the Kedro ones reached through the same command objects as
``kedro``'s, and ``--help`` answering without importing Kedro or torch."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[2]


def test_the_console_script_is_the_group_and_python_m_still_runs_kedro():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["eva-pipeline"] == "eva_pipeline.commands:main"
    from eva_pipeline import __main__

    assert __main__.main.__module__ == "eva_pipeline.__main__"  # `python -m eva_pipeline` is untouched


def test_help_lists_every_command_without_importing_kedro_or_torch():
    code = (
        "import sys; from eva_pipeline.commands import main; sys.argv = ['eva-pipeline', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('IMPORTED', 'kedro' in sys.modules, 'torch' in sys.modules)"
    )
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    for name in ("features", "convert", "predict", "dry-run", "run"):
        assert f"\n  {name} " in out.stdout
    assert "IMPORTED False False" in out.stdout


def test_dry_run_and_run_are_the_kedro_commands_themselves():
    from kedro.framework.cli.project import run

    from eva_pipeline.cli import dry_run_command
    from eva_pipeline.commands import cli

    ctx = click.Context(cli)
    assert cli.get_command(ctx, "dry-run") is dry_run_command  # one command: the kedro plugin's and ours
    assert cli.get_command(ctx, "run") is run
    assert cli.get_command(ctx, "nonsense") is None
    convert = cli.get_command(ctx, "convert")
    assert set(convert.list_commands(ctx)) == {"to-timm", "from-timm", "patch"}


def test_run_help_is_kedro_runs(invoke):
    result = invoke("run", "--help")
    assert "--pipelines" in result.output and "--env" in result.output
    result = invoke("dry-run", "--help")
    assert "--num-images" in result.output
    result = invoke("nonsense", expect=2)
    assert "No such command 'nonsense'" in result.output
