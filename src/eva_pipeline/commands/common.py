"""What the model commands share: the options that say which model a checkpoint is, the device, the images, and
the batched inference loop with its progress bar. Library errors become click errors here (exit 1 with the
message; a bad option value is a usage error, exit 2), never tracebacks."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import torch
import yaml

from eva_pipeline.loader.image_files import ImageFiles, ImageListError, image_loader, list_images
from eva_pipeline.models import CheckpointError, EvaConfig, get_config, list_models
from eva_pipeline.models.loading import LoadedModel, LoadedState, build_model, read_checkpoint

#: Errors of the library that mean "this input cannot be used": shown as ``Error: <message>``, exit 1.
INPUT_ERRORS = (CheckpointError, ImageListError)


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--model``, ``--config`` and ``--num-heads``: where the number of heads of an official checkpoint (the one
    thing its tensors do not show) comes from; a checkpoint of ours that records its architecture ignores them."""
    options = [
        click.option(
            "--model",
            "model_name",
            type=click.Choice(list_models()),
            default=None,
            help="Registered model the checkpoint is an instance of (its heads; other shapes are read from the file).",
        ),
        click.option(
            "--config",
            "student_config",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="Student config YAML (pretrain.model: name and overrides), e.g. "
            "data/05_model_input/student_config.yml.",
        ),
        click.option("--num-heads", type=click.IntRange(min=1), default=None, help="Attention heads of the model."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def base_config(model_name: str | None, student_config: Path | None) -> EvaConfig | None:
    """The config ``--model`` or ``--config`` name (both: an error), or None."""
    if model_name and student_config:
        raise click.UsageError("give --model or --config, not both")
    if model_name:
        return get_config(model_name)
    if student_config is None:
        return None
    from pydantic import ValidationError

    from eva_pipeline.config import ModelParams

    try:
        document = yaml.safe_load(student_config.read_text())
    except yaml.YAMLError as err:
        raise click.BadParameter(f"{student_config} is not YAML: {err}", param_hint="--config") from None
    block = document.get("pretrain") if isinstance(document, dict) else None
    if not isinstance(block, dict) or not isinstance(block.get("model"), dict):
        raise click.BadParameter(
            f"{student_config} has no pretrain.model block (the student config the pipeline writes, or a parameters "
            "file with a pretrain block)",
            param_hint="--config",
        )
    try:
        model = ModelParams.model_validate(block["model"])
        return get_config(model.name, **model.overrides)
    except (ValidationError, KeyError, TypeError, ValueError) as err:
        message = f"{student_config}: not a valid student config: {err}"
        raise click.BadParameter(message, param_hint="--config") from None


def read_state(checkpoint: Path, use_ema: bool = True) -> LoadedState:
    """:func:`read_checkpoint` with its errors as click errors."""
    try:
        return read_checkpoint(checkpoint, use_ema=use_ema)
    except INPUT_ERRORS as err:
        raise click.ClickException(str(err)) from None


def load_for_inference(
    checkpoint: Path,
    *,
    model_name: str | None,
    student_config: Path | None,
    num_heads: int | None,
    img_size: int | None = None,
    use_ema: bool = True,
) -> LoadedModel:
    """The checkpoint's model in eval mode (CPU), with a note on stderr when the file overrides the model options."""
    base = base_config(model_name, student_config)
    loaded = read_state(checkpoint, use_ema)
    if loaded.config is not None and (base is not None or num_heads is not None):
        click.echo(f"note: {checkpoint} records its architecture; --model/--config/--num-heads are not used", err=True)
    try:
        return build_model(loaded, base=base, num_heads=num_heads, img_size=img_size)
    except INPUT_ERRORS as err:
        raise click.ClickException(f"{checkpoint}: {err}") from None


def inference_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Batch size, device, workers, input size and crop, EMA and bad-image handling."""
    options = [
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda"]),
            default="auto",
            show_default=True,
            help="auto: CUDA when present, else CPU.",
        ),
        click.option(
            "--num-workers",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Processes that read and decode images.",
        ),
        click.option(
            "--img-size",
            type=click.IntRange(min=1),
            default=None,
            help="Input size (default: the checkpoint's); pos_embed is resampled bicubically to its grid.",
        ),
        click.option(
            "--crop-pct",
            type=click.FloatRange(min=0, max=1, min_open=True),
            default=1.0,
            show_default=True,
            help="Shorter side resized to img_size / crop_pct (bicubic), then centre crop: EVA's evaluation.",
        ),
        click.option(
            "--no-ema",
            "no_ema",
            is_flag=True,
            help="A checkpoint with an EMA: its trained weights (the EMA is the default).",
        ),
        click.option(
            "--skip-bad", is_flag=True, help="Leave unreadable images out (listed on stderr) instead of stopping."
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@dataclasses.dataclass(frozen=True)
class InferenceJob:
    """What every inference command is told: the images, the checkpoint, which model it is and how to run it."""

    images: tuple[Path, ...]
    checkpoint: Path
    model_name: str | None
    student_config: Path | None
    num_heads: int | None
    batch_size: int
    device: str
    num_workers: int
    img_size: int | None
    crop_pct: float
    no_ema: bool
    skip_bad: bool

    def paths(self) -> list[Path]:
        return image_paths(self.images)

    def target(self) -> torch.device:
        return resolve_device(self.device)

    def load(self) -> LoadedModel:
        return load_for_inference(
            self.checkpoint,
            model_name=self.model_name,
            student_config=self.student_config,
            num_heads=self.num_heads,
            img_size=self.img_size,
            use_ema=not self.no_ema,
        )

    def outputs(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        paths: Sequence[Path],
        *,
        img_size: int,
        device: torch.device,
        desc: str,
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        return batched_outputs(
            forward,
            paths,
            img_size=img_size,
            crop_pct=self.crop_pct,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=device,
            skip_bad=self.skip_bad,
            desc=desc,
        )


def inference_job(checkpoint_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The IMAGES argument, ``--checkpoint``, :func:`model_options` and :func:`inference_options`, handed to the
    command as one ``job`` (:class:`InferenceJob`); the command's own options pass through as keywords."""
    fields = [field.name for field in dataclasses.fields(InferenceJob)]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            job = InferenceJob(**{name: kwargs.pop(name) for name in fields})
            return command(*args, job=job, **kwargs)

        # Help order: IMAGES, --checkpoint, the command's own options, the model's, the inference's (click lists a
        # command's params in the reverse of the order the decorators attach them).
        own = getattr(command, "__click_params__", [])
        run.__click_params__ = []  # type: ignore[attr-defined]
        run = model_options(inference_options(run))
        run.__click_params__.extend(own)  # type: ignore[attr-defined]
        run = click.option(
            "-c",
            "--checkpoint",
            required=True,
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help=checkpoint_help,
        )(run)
        return click.argument("images", nargs=-1, type=click.Path(exists=True, path_type=Path))(run)

    return decorate


def resolve_device(name: str) -> torch.device:
    from eva_pipeline.runtime.device import resolve_device as resolve

    try:
        return resolve(name)
    except RuntimeError as err:
        raise click.BadParameter(str(err), param_hint="--device") from None


def image_paths(sources: Sequence[Path]) -> list[Path]:
    """The images of the command's arguments (files, folders, lists), or a usage error saying what is wrong."""
    if not sources:
        raise click.UsageError("give at least one image, folder or list of image paths")
    try:
        return list_images(sources)
    except ImageListError as err:
        raise click.BadParameter(str(err), param_hint="IMAGES") from None


def preprocess(img_size: int, crop_pct: float) -> Callable[..., torch.Tensor]:
    """PIL image -> model input: EVA's evaluation transform (resize, centre crop, CLIP mean/std), as the
    classification evaluation scores a fine-tuned model."""
    from eva_pipeline.finetune.augment import eval_transform

    return eval_transform(img_size, crop_pct)


def batched_outputs(
    forward: Callable[[torch.Tensor], torch.Tensor],
    paths: Sequence[Path],
    *,
    img_size: int,
    crop_pct: float,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    skip_bad: bool,
    desc: str,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``forward`` over the images in order, batch by batch: (indices into ``paths``, CPU float32 outputs).

    A tqdm bar counts images. An unreadable image stops the run with its path and reason, or with ``skip_bad`` is
    reported on stderr and left out.
    """
    from tqdm import tqdm

    dataset = ImageFiles(paths, preprocess(img_size, crop_pct))
    skipped = 0
    with torch.inference_mode(), tqdm(total=len(paths), unit="img", desc=desc, dynamic_ncols=True) as bar:
        for indices, images, bad in image_loader(dataset, batch_size, num_workers):
            for index, reason in bad:
                if not skip_bad:
                    raise click.ClickException(
                        f"cannot read image {paths[index]}: {reason}; pass --skip-bad to leave such images out"
                    )
                bar.write(f"skipped {paths[index]}: {reason}", file=sys.stderr)
                skipped += 1
            if images is not None:
                out = forward(images.to(device, non_blocking=True))
                yield indices, out.float().cpu()
            bar.update(len(indices) + len(bad))
    if skipped:
        click.echo(f"{skipped} of {len(paths)} images could not be read and were left out", err=True)
