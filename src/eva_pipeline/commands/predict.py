"""``eva-pipeline predict``: a fine-tuned classifier on images -> the top-k classes with their probabilities."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import click

from eva_pipeline.commands.common import InferenceJob, inference_job
from eva_pipeline.evaluation.inference import top_k
from eva_pipeline.fileio import replace_atomically

OUTPUT_FORMATS = (".json", ".csv")


def read_class_names(path: Path, key: str | None) -> list[str]:
    """A JSON list of names, or an object of lists (ingestion's ``class_names.json``: ``{source: [...]}``) with
    ``key`` choosing one (optional when it has a single list)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise click.BadParameter(f"{path} is not JSON: {err}", param_hint="--class-names") from None
    if isinstance(data, dict):
        if key is None and len(data) == 1:
            key = next(iter(data))
        if key is None or key not in data:
            what = "choose one with --class-names-key" if key is None else f"no key {key!r}"
            raise click.BadParameter(f"{path}: {what}; keys: {', '.join(map(str, data))}", param_hint="--class-names")
        data = data[key]
    if not isinstance(data, list) or not data or not all(isinstance(x, str) for x in data):
        raise click.BadParameter(
            f"{path}: expected a list of class names (strings), or an object of such lists", param_hint="--class-names"
        )
    return data


def _rows(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"image": p["image"], **guess} for p in predictions for guess in p["top"]]


def render_table(predictions: list[dict[str, Any]]) -> str:
    """An aligned text table: image (on its first row), rank, class, probability."""
    lines = [("image", "rank", "class", "probability")]
    for p in predictions:
        for guess in p["top"]:
            image = p["image"] if guess["rank"] == 1 else ""
            lines.append((image, str(guess["rank"]), guess["class"], f"{guess['probability']:.4f}"))
    widths = [max(len(row[i]) for row in lines) for i in range(4)]
    return "\n".join(
        f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]:>{widths[3]}}".rstrip()
        for row in lines
    )


def write_predictions(path: Path, predictions: list[dict[str, Any]]) -> None:
    """JSON (a list of {image, top: [{rank, class, index, probability}]}) or CSV (one row per image and rank),
    by suffix; written atomically."""
    if path.suffix == ".json":
        text = json.dumps(predictions, indent=2) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["image", "rank", "class", "index", "probability"])
        writer.writeheader()
        writer.writerows(_rows(predictions))
        text = buffer.getvalue()
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def _output_suffix(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None and value.suffix not in OUTPUT_FORMATS:
        raise click.BadParameter(f"{value}: the file name must end in {' or '.join(OUTPUT_FORMATS)}", param=param)
    return value


@click.command("predict")
@inference_job("A fine-tuned classifier: data/06_models/finetuned/*.pt, or an official EVA-01 fine-tuned file.")
@click.option(
    "--class-names",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON list of the head's class names, or an object of lists (data/03_primary/class_names.json) with "
    "--class-names-key; default: the names the checkpoint carries.",
)
@click.option("--class-names-key", default=None, help="Which list of a --class-names object, e.g. fashion_mnist_train.")
@click.option("--top-k", "k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    callback=_output_suffix,
    help="Also write the predictions to a .json or .csv file.",
)
def predict_command(
    job: InferenceJob, class_names: Path | None, class_names_key: str | None, k: int, output: Path | None
) -> None:
    """Classify IMAGES (files, folders searched recursively, or text files listing image paths) with a fine-tuned
    classifier and print the top-k classes with their softmax probabilities."""
    paths = job.paths()
    target = job.target()
    names = read_class_names(class_names, class_names_key) if class_names is not None else None
    loaded = job.load()
    checkpoint = job.checkpoint
    if loaded.kind != "classifier":
        raise click.ClickException(
            f"{checkpoint} is a pre-trained encoder without a classifier head ({loaded.source}): fine-tune it first, "
            "or embed images with `eva-pipeline features`"
        )
    num_classes = loaded.model.num_classes
    names = names or loaded.classes
    if names is None:
        click.echo(f"note: {checkpoint} carries no class names: showing class indices (give --class-names)", err=True)
        names = [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise click.ClickException(
            f"{len(names)} class names for a head of {num_classes} classes ({checkpoint}): wrong --class-names list?"
        )
    model = loaded.model.to(target)
    predictions = []
    for indices, logits in job.outputs(model, paths, img_size=loaded.config.img_size, device=target, desc="predict"):
        probs, classes = top_k(logits, k)
        for i, row_p, row_c in zip(indices, probs.tolist(), classes.tolist(), strict=True):
            top = [
                {"rank": r, "class": names[c], "index": c, "probability": p}
                for r, (p, c) in enumerate(zip(row_p, row_c, strict=True), start=1)
            ]
            predictions.append({"image": str(paths[i]), "top": top})
    click.echo(render_table(predictions))
    if output is not None:
        write_predictions(output, predictions)
        click.echo(f"wrote {len(predictions)} predictions to {output}", err=True)
