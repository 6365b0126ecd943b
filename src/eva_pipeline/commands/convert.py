"""``eva-pipeline convert``: official EVA-01 <-> timm ``Eva`` safetensors, and the patch 14 -> 16 conversion of
detection and segmentation backbones. Each conversion is checked numerically before anything is written."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import click
import torch

from eva_pipeline.commands.common import INPUT_ERRORS, base_config, model_options, read_state
from eva_pipeline.models import CheckpointError, EvaConfig
from eva_pipeline.models.convert import (
    PARITY_TOL,
    PATCH_METHODS,
    infer_config,
    official_to_timm,
    our_model,
    resample_patch_size,
    save_official_state,
    save_timm_safetensors,
    timm_eva_kwargs,
    timm_parity,
)
from eva_pipeline.models.loading import LoadedState

CHECKPOINT = click.Path(exists=True, dir_okay=False, path_type=Path)
OUTPUT = click.Path(dir_okay=False, path_type=Path)
_CHECK = click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Compare our model and timm's Eva on the weights (a random batch, fp32) before writing; needs both models "
    "in memory.",
)


def _config(loaded: LoadedState, model_name: str | None, student_config: Path | None, heads: int | None) -> EvaConfig:
    if loaded.config is not None:
        return loaded.config
    try:
        return infer_config(loaded.state, base=base_config(model_name, student_config), num_heads=heads)
    except INPUT_ERRORS as err:
        raise click.ClickException(str(err)) from None


def _check_parity(official: dict, timm_state: dict, config: EvaConfig) -> None:
    difference = timm_parity(official, timm_state, config)
    if difference > PARITY_TOL:
        raise click.ClickException(
            f"our model and timm's Eva disagree on the converted weights by {difference:.2e} (relative; tolerance "
            f"{PARITY_TOL:.0e}): nothing written"
        )
    click.echo(f"checked: our model and timm's Eva agree to {difference:.1e} (relative, random batch, fp32)", err=True)


@click.group("convert")
def convert_group() -> None:
    """Convert EVA-01 weights: to and from timm's Eva (safetensors), and to another patch size."""


@convert_group.command("to-timm")
@click.argument("checkpoint", type=CHECKPOINT)
@click.argument("output", type=OUTPUT)
@model_options
@click.option("--no-ema", is_flag=True, help="A classifier of ours: its trained weights, not the EMA.")
@_CHECK
def to_timm_command(
    checkpoint: Path,
    output: Path,
    model_name: str | None,
    student_config: Path | None,
    num_heads: int | None,
    no_ema: bool,
    check: bool,
) -> None:
    """CHECKPOINT (official EVA-01 MIM or fine-tuned, or ours) -> OUTPUT, a timm Eva state dict in safetensors, through
    timm's own checkpoint_filter_fn (MIM: mask_token and lm_head dropped, the final norm becomes fc_norm).

    Load it with timm.models.eva.Eva(**args) where args is the file's metadata `eva_pipeline.timm_eva` (JSON).
    """
    if output.suffix != ".safetensors":
        raise click.BadParameter(f"{output}: the file name must end in .safetensors", param_hint="OUTPUT")
    loaded = read_state(checkpoint, use_ema=not no_ema)
    config = _config(loaded, model_name, student_config, num_heads)
    try:
        converted = official_to_timm(loaded.state, config)
    except INPUT_ERRORS as err:
        raise click.ClickException(f"{checkpoint}: {err}") from None
    if check:
        _check_parity(loaded.state, converted, config)
    num_classes = int(converted["head.weight"].shape[0]) if "head.weight" in converted else 0
    save_timm_safetensors(converted, output, timm_eva_kwargs(config, num_classes), loaded.classes)
    dropped = sorted(set(loaded.state) - set(converted) - {"norm.weight", "norm.bias"})
    note = f" (dropped: {', '.join(dropped)}; norm -> fc_norm)" if dropped else ""
    click.echo(f"wrote timm Eva weights ({len(converted)} tensors){note} to {output}")


@convert_group.command("from-timm")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("output", type=OUTPUT)
@model_options
@_CHECK
def from_timm_command(
    checkpoint: Path,
    output: Path,
    model_name: str | None,
    student_config: Path | None,
    num_heads: int | None,
    check: bool,
) -> None:
    """CHECKPOINT, a timm Eva .safetensors file of EVA-01's layout -> OUTPUT, an official EVA-01 checkpoint
    ({"model": state_dict}, dtypes kept): keys unchanged for a classifier, fc_norm -> norm for a head-less encoder.

    timm's Eva has no mask_token or lm_head: an encoder comes back without them (fine-tuning does not use them).
    """
    if checkpoint.suffix != ".safetensors":
        raise click.BadParameter(f"{checkpoint}: expected a .safetensors file", param_hint="CHECKPOINT")
    loaded = read_state(checkpoint)
    if check:
        from safetensors.torch import load_file

        config = _config(loaded, model_name, student_config, num_heads)
        _check_parity(loaded.state, load_file(checkpoint), config)
    save_official_state(loaded.state, output)
    click.echo(f"wrote an official EVA-01 {loaded.kind} checkpoint ({len(loaded.state)} tensors) to {output}")


@convert_group.command("patch")
@click.argument("checkpoint", type=CHECKPOINT)
@click.argument("output", type=OUTPUT)
@click.option("--patch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--img-size",
    type=click.IntRange(min=1),
    default=None,
    help="Image size of the new pos_embed grid (default: the checkpoint's; 224 at patch 16 -> 14 x 14).",
)
@click.option(
    "--method",
    type=click.Choice(PATCH_METHODS),
    default="eva",
    show_default=True,
    help="eva: EVA-01's interpolate_patch_14to16.py (bicubic resize of kernel and pos_embed); timm: what timm's "
    "loader does (resample_patch_embed, the pseudo-inverse that keeps a resized patch's embedding, and an "
    "antialiased pos_embed).",
)
@model_options
@click.option("--no-ema", is_flag=True, help="A classifier of ours: its trained weights, not the EMA.")
def patch_command(
    checkpoint: Path,
    output: Path,
    patch_size: int,
    img_size: int | None,
    method: str,
    model_name: str | None,
    student_config: Path | None,
    num_heads: int | None,
    no_ema: bool,
) -> None:
    """CHECKPOINT -> OUTPUT (official EVA-01 format, dtypes kept) with the patch kernel resized to --patch-size and
    pos_embed to the new grid, for detection and segmentation backbones (EVA-01: 14 -> 16). The converted model is
    built and run once at the new patch size before anything is written."""
    loaded = read_state(checkpoint, use_ema=not no_ema)
    config = _config(loaded, model_name, student_config, num_heads)
    try:
        state = resample_patch_size(loaded.state, patch_size, img_size=img_size, method=method)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--img-size") from None
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    new = dataclasses.replace(config, patch_size=patch_size, img_size=grid * patch_size)
    try:
        model = our_model(state, new)
    except CheckpointError as err:
        raise click.ClickException(f"the converted weights do not load at patch {patch_size}: {err}") from None
    images = torch.randn(1, new.in_chans, new.img_size, new.img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model(images) if loaded.kind == "classifier" else model.forward_features(images)
    if not torch.isfinite(out).all():
        raise click.ClickException("the converted model gives non-finite outputs: nothing written")
    save_official_state(state, output)
    old = f"patch {config.patch_size}, {config.grid_size} x {config.grid_size}"
    click.echo(f"wrote {output}: {old} -> patch {patch_size}, {grid} x {grid} grid at {new.img_size} px ({method})")
    if loaded.classes is not None:
        click.echo("note: the output is in the official format, without the checkpoint's class names", err=True)
