"""Project commands added to the ``kedro`` CLI (Kedro loads ``<package>.cli.cli`` next to its own commands).

``kedro dry-run --env eva01 --num-images 29663232`` loads the parameters exactly as ``kedro run --env eva01`` would
(same config loader, environment layering and ``--params`` overrides), validates every block, builds every object
of the pre-training run without data, weights or GPU (``eva_pipeline.dry_run``), prints what would run and exits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from kedro.framework.cli.project import run  # noqa: F401  `python -m eva_pipeline` runs `<package>.cli.run`
from kedro.framework.cli.utils import _split_params
from kedro.framework.project import settings
from kedro.framework.startup import bootstrap_project
from pydantic import ValidationError

#: The pipeline a dry run describes, and the catalog entry holding the manifest (its image count, when it exists).
PIPELINE = "pretrain"
MANIFEST_DATASET = "manifest"
PRETRAIN_SPLIT = "pretrain"


@click.group(name="eva_pipeline")
def cli() -> None:
    """eva_pipeline project commands."""


@cli.command("dry-run")
@click.option("--env", "-e", default=None, help="Kedro environment, as for `kedro run` (e.g. eva01).")
@click.option("--params", default="", callback=_split_params, help="Parameter overrides, as for `kedro run`.")
@click.option(
    "--num-images",
    type=click.IntRange(min=1),
    default=None,
    help="Pre-training images the schedule is built for (default: the manifest's count, when it exists).",
)
def dry_run_command(env: str | None, params: dict[str, Any], num_images: int | None) -> None:
    """Build every object of the pre-training run without data, weights or GPU; print what would run and exit."""
    from eva_pipeline.config import IngestionParams, PretrainParams, TeacherTargetsParams
    from eva_pipeline.dry_run import dry_run

    project = Path.cwd()
    bootstrap_project(project)
    loader = settings.CONFIG_LOADER_CLASS(
        conf_source=str(project / settings.CONF_SOURCE), env=env, runtime_params=params, **settings.CONFIG_LOADER_ARGS
    )
    raw = loader["parameters"]
    try:
        blocks = (
            IngestionParams.model_validate(raw["ingestion"]),
            TeacherTargetsParams.model_validate(raw["teacher_targets"]),
            PretrainParams.model_validate(raw["pretrain"]),
        )
    except ValidationError as exc:
        raise click.ClickException(f"the parameters of environment '{env or 'local'}' are invalid:\n{exc}") from None
    images = num_images or _manifest_images(loader)
    click.echo(f"Dry run of `kedro run --pipelines {PIPELINE}` (environment: {env or 'local'})")
    click.echo(f"Pipelines: {_pipeline_outline()}")
    from kedro.framework.project import pipelines

    try:
        report = dry_run(*blocks, num_images=images, nodes=pipelines[PIPELINE].nodes)  # the hook's checks
    except (ValueError, TypeError, RuntimeError) as exc:
        raise click.ClickException(f"the run cannot be built: {exc}") from None
    click.echo(report.render())


def _manifest_images(loader: Any) -> int:
    """The number of pre-training rows of the catalog's manifest; a clear error when there is none yet."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(loader["catalog"][MANIFEST_DATASET]["filepath"])
    if not path.exists():
        raise click.ClickException(
            f"no manifest at {path} yet to count the pre-training images: pass --num-images N "
            "(Merged-30M: --num-images 29663232)"
        )
    column = pq.read_table(path, columns=["split"]).column("split")
    return int(pc.sum(pc.equal(column, PRETRAIN_SPLIT)).as_py() or 0)


def _pipeline_outline() -> str:
    """The stages the pipeline runs, in order, with their node counts."""
    from kedro.framework.project import pipelines

    from eva_pipeline.pipelines.pretrain import STAGES

    names = [name for name in STAGES if name in pipelines]
    return " -> ".join(f"{name} ({len(pipelines[name].nodes)} nodes)" for name in names)
