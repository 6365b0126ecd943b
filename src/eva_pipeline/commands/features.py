"""``eva-pipeline features``: images -> a Parquet file of embeddings from any EVA checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import numpy as np

from eva_pipeline.commands.common import InferenceJob, inference_job
from eva_pipeline.evaluation.inference import embed, write_features


@click.command("features")
@inference_job("eva_student.pt, a fine-tuned classifier, an official EVA-01 file or a timm .safetensors file.")
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Parquet file to write."
)
@click.option(
    "--pool",
    type=click.Choice(["mean", "cls"]),
    default="mean",
    show_default=True,
    help="mean: the model's pooled feature (patch tokens after the final norm, averaged; a classifier's fc_norm of "
    "the average, what its head reads); cls: the cls token after the final norm.",
)
@click.option(
    "--per-patch",
    is_flag=True,
    help="Every patch token after the final norm: one row per image, embedding = N lists of D floats (grid order).",
)
@click.pass_context
def features_command(ctx: click.Context, job: InferenceJob, output: Path, pool: str, per_patch: bool) -> None:
    """Embed IMAGES (files, folders searched recursively, or text files listing image paths) with a checkpoint's
    encoder and write one Parquet row per image: `path` and `embedding` (float32).

    Read it back with `eva_pipeline.evaluation.inference.read_features(path)` (paths and one array), or pandas.
    """
    if per_patch and ctx.get_parameter_source("pool") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--per-patch writes every patch token: it takes no --pool")
    paths = job.paths()
    target = job.target()
    loaded = job.load()
    checkpoint = job.checkpoint
    config = loaded.config
    readout = "patch" if per_patch else pool
    model = loaded.model.to(target)
    click.echo(
        f"{checkpoint}: {loaded.source}, {type(model).__name__} {config.embed_dim}-d, {config.depth} blocks, "
        f"{config.img_size} px / patch {config.patch_size}; readout {readout}; {len(paths)} images on {target}",
        err=True,
    )
    batches = (
        ([str(paths[i]) for i in indices], out.numpy().astype(np.float32, copy=False))
        for indices, out in job.outputs(
            lambda x: embed(model, x, readout), paths, img_size=config.img_size, device=target, desc="features"
        )
    )
    metadata = {
        "checkpoint": str(checkpoint),
        "source": loaded.source,
        "kind": loaded.kind,
        "readout": readout,
        "grid": config.grid_size,
        "crop_pct": job.crop_pct,
        "ema": not job.no_ema,
        "eva_config": dataclasses.asdict(config),
    }
    try:
        rows = write_features(output, batches, metadata)
    except ValueError as err:
        raise click.ClickException(f"nothing written to {output}: {err}") from None
    shape = f"{config.num_patches} x {config.embed_dim}" if per_patch else str(config.embed_dim)
    click.echo(f"wrote {rows} embeddings ({shape} float32 each) to {output}")
