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


def test_inference_job_hands_one_job_and_keeps_the_command_options_after_the_checkpoint(tmp_path):
    from click.testing import CliRunner

    from eva_pipeline.commands.common import InferenceJob, inference_job

    seen = {}

    @click.command()
    @inference_job("the checkpoint")
    @click.option("--own", default="x")
    @click.pass_context
    def probe(ctx: click.Context, job: InferenceJob, own: str) -> None:
        seen.update(ctx=ctx, job=job, own=own)

    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"")
    result = CliRunner().invoke(
        probe, [str(tmp_path), "-c", str(checkpoint), "--own", "y", "--batch-size", "3", "--no-ema", "--num-heads", "2"]
    )
    assert result.exit_code == 0, result.output
    job = seen["job"]
    assert isinstance(seen["ctx"], click.Context) and seen["own"] == "y"
    assert (job.images, job.checkpoint, job.batch_size, job.no_ema, job.num_heads) == (
        (tmp_path,),
        checkpoint,
        3,
        True,
        2,
    )
    assert (job.device, job.crop_pct, job.skip_bad, job.model_name) == ("auto", 1.0, False, None)
    names = [param.name for param in probe.params]
    assert names[:3] == ["images", "checkpoint", "own"]
    assert names.index("model_name") < names.index("batch_size")
