"""``eva-pipeline``, the project's console script: the model outside Kedro.

- ``features``: images -> a Parquet file of embeddings, from any checkpoint of ours or an official one;
- ``convert``: official EVA-01 <-> timm ``Eva`` (safetensors), and the patch 14 -> 16 conversion;
- ``predict``: a fine-tuned classifier on images -> the top-k classes;
- ``dry-run``: the project's ``kedro dry-run`` (``eva_pipeline.cli``), the same command object, so both stay one;
- ``run``: ``kedro run``, what ``eva-pipeline`` alone did before it became a group (``python -m eva_pipeline``
  still does).

``dry-run`` and ``run`` need the Kedro project (run them in its folder). Every command is imported only when it
is called, so ``--help`` answers at once and the model commands never import Kedro.
"""

from __future__ import annotations

import importlib

import click

PACKAGE = "eva_pipeline"


def _kedro_run() -> click.Command:
    from kedro.framework.cli.utils import find_run_command
    from kedro.framework.project import configure_project

    configure_project(PACKAGE)
    return find_run_command(PACKAGE)


#: name -> ("module:attribute" of the command, or a function returning it; its one-line summary in ``--help``).
COMMANDS: dict[str, tuple[str | object, str]] = {
    "features": ("eva_pipeline.commands.features:features_command", "Images -> a Parquet file of embeddings."),
    "convert": (
        "eva_pipeline.commands.convert:convert_group",
        "Official EVA-01 <-> timm Eva (safetensors); patch 14 -> 16.",
    ),
    "predict": ("eva_pipeline.commands.predict:predict_command", "A fine-tuned classifier on images -> top-k."),
    "dry-run": (
        "eva_pipeline.cli:dry_run_command",
        "`kedro dry-run`: build the run of an environment (e.g. --env eva01) without data.",
    ),
    "run": (_kedro_run, "`kedro run`: run the project's pipelines, as `python -m eva_pipeline` does."),
}


class _LazyGroup(click.Group):
    """Commands imported only when called, so ``eva-pipeline --help`` answers at once and the model commands start
    without Kedro; the listing uses the summaries of :data:`COMMANDS`."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        target = COMMANDS[cmd_name][0]
        if isinstance(target, str):
            module, _, attribute = target.partition(":")
            return getattr(importlib.import_module(module), attribute)
        return target()

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, summary) in COMMANDS.items()])


@click.group(cls=_LazyGroup, name="eva-pipeline", context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """EVA models outside Kedro: embed images, convert weights, classify; and the project's dry run and run.

    `eva-pipeline COMMAND --help` shows a command's options; `dry-run` and `run` run in the project folder.
    """


def main() -> None:
    """The console script ``eva-pipeline``."""
    cli(prog_name="eva-pipeline")
