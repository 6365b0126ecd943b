"""Project commands added to the ``kedro`` CLI (Kedro loads ``<package>.cli.cli`` next to its own commands).

``kedro dry-run --env eva01 --num-images 29663232`` loads the parameters exactly as ``kedro run --env eva01`` would
(same config loader, environment layering and ``--params`` overrides), validates every block, builds every object
of the pre-training run without data, weights or GPU (``eva_pipeline.dry_run``), then those of the image fine-tune
stages whose blocks the parameters have (for ``--finetune-images`` / ``--finetune-classes``, counted in the manifest
when it exists, else EVA-01's ImageNet counts), prints what would run and exits.
"""

from __future__ import annotations

import json
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
#: The fine-tune pipelines, in DAG order (each runs the stage of the block it is named after), and the scoring
#: pipeline whose pre-flight checks join theirs once it is registered.
FINETUNE_PIPELINES = ("finetune_intermediate", "finetune")
SCORING_PIPELINE = "classification_eval"
VIDEO_MANIFEST_DATASET = "video_manifest"
CLASS_MAPPING_DATASET = "k722_class_mapping"
#: Ingestion's ``{source: class names}``, with the manifest what a stage's images and classes are counted from.
CLASS_NAMES_DATASET = "class_names"


def _stage_counts(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, int]:
    """``("finetune=1000", ...)`` -> ``{"finetune": 1000}``; a malformed item is a usage error naming it."""
    counts = {}
    for item in values:
        stage, _, number = item.partition("=")
        if not stage or not number.isdigit() or int(number) < 1:
            raise click.BadParameter(f"{item!r} is not STAGE=N with N >= 1 (e.g. finetune=1281167)", param=param)
        counts[stage] = int(number)
    return counts


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
@click.option(
    "--finetune-images",
    multiple=True,
    callback=_stage_counts,
    metavar="STAGE=N",
    help="Images a fine-tune stage trains on, e.g. finetune=1281167; repeat per stage (default: counted in the "
    "manifest with ingestion's class names when both exist, else EVA-01's: finetune_intermediate=14197122 "
    "(ImageNet-21K), finetune=1281167 (ImageNet-1K train)).",
)
@click.option(
    "--finetune-classes",
    multiple=True,
    callback=_stage_counts,
    metavar="STAGE=N",
    help="Classes of a fine-tune stage's head; repeat per stage (default: from ingestion's class names when they "
    "exist, else EVA-01's: finetune_intermediate=21841, finetune=1000).",
)
def dry_run_command(
    env: str | None,
    params: dict[str, Any],
    num_images: int | None,
    finetune_images: dict[str, int],
    finetune_classes: dict[str, int],
) -> None:
    """Build every object of the pre-training run and of the image fine-tune stages without data, weights or GPU;
    print what would run and exit."""
    from eva_pipeline.config import (
        ClassificationEvalParams,
        FinetuneParams,
        IngestionParams,
        PretrainParams,
        TargetFinetuneParams,
        TeacherTargetsParams,
    )
    from eva_pipeline.dry_run import dry_run, dry_run_finetune
    from eva_pipeline.preflight import CLASSIFICATION_BLOCK, FINETUNE_BLOCKS

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
        stage_models = {"finetune_intermediate": FinetuneParams, "finetune": TargetFinetuneParams}
        stages = {name: stage_models[name].model_validate(raw[name]) for name in FINETUNE_BLOCKS if name in raw}
        classification = None
        if CLASSIFICATION_BLOCK in raw:
            classification = ClassificationEvalParams.model_validate(raw[CLASSIFICATION_BLOCK])
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
    if not stages:
        return
    data = _stage_data(loader, stages, finetune_images, finetune_classes)
    names = [name for name in FINETUNE_PIPELINES if name in pipelines and name in stages]
    nodes = [node for name in (*names, SCORING_PIPELINE) if name in pipelines for node in pipelines[name].nodes]
    click.echo("")
    click.echo(f"Dry run of `kedro run --pipelines {','.join(names)}` (environment: {env or 'local'})")
    click.echo("Pipelines: " + " -> ".join(f"{name} ({len(pipelines[name].nodes)} nodes)" for name in names))
    try:
        report = dry_run_finetune(blocks[0], blocks[2], stages, data, classification, nodes=nodes)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise click.ClickException(f"the fine-tune stages cannot be built: {exc}") from None
    click.echo(report.render())
    _video_dry_run(loader, raw, blocks[2], env)


def _video_dry_run(loader: Any, raw: dict[str, Any], pretrain: Any, env: str | None) -> None:
    """The video stages' dry run, when the environment configures them: counts from the clip manifest when
    video_ingestion has written it, else EVA-01's Kinetics counts (``eva_pipeline.dry_run.EVA01_VIDEO_DATA``)."""
    from eva_pipeline.config import (
        TargetVideoFinetuneParams,
        VideoEvalParams,
        VideoFinetuneParams,
        VideoIngestionParams,
    )
    from eva_pipeline.dry_run import EVA01_VIDEO_DATA, StageData, dry_run_video
    from eva_pipeline.preflight import VIDEO_FINETUNE_BLOCKS

    models = {"finetune_video_intermediate": VideoFinetuneParams, "finetune_video": TargetVideoFinetuneParams}
    try:
        stages = {name: models[name].model_validate(raw[name]) for name in VIDEO_FINETUNE_BLOCKS if name in raw}
        evaluation = VideoEvalParams.model_validate(raw["video_eval"]) if "video_eval" in raw else None
        ingestion = VideoIngestionParams.model_validate(raw["video_ingestion"]) if "video_ingestion" in raw else None
    except ValidationError as exc:
        raise click.ClickException(
            f"the video parameters of environment '{env or 'local'}' are invalid:\n{exc}"
        ) from None
    if not stages:
        return
    datasets = [d for p in stages.values() for d in getattr(p, "targets", [p.data.dataset])]
    counted = _clip_manifest_counts(loader, datasets)
    data = {}
    for dataset in datasets:
        if dataset in counted:
            data[dataset] = counted[dataset]
        elif dataset in EVA01_VIDEO_DATA:
            data[dataset] = StageData(*EVA01_VIDEO_DATA[dataset], "EVA-01's Kinetics count: no clip manifest yet")
        else:
            click.echo(f"\nVideo stages: no clip manifest yet to count dataset {dataset}: run video_ingestion first")
            return
    click.echo("")
    click.echo(f"Dry run of `kedro run --pipelines {','.join(stages)},video_eval` (environment: {env or 'local'})")
    try:
        report = dry_run_video(pretrain, stages, data, evaluation, ingestion)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise click.ClickException(f"the video stages cannot be built: {exc}") from None
    click.echo(report.render())


def _clip_manifest_counts(loader: Any, datasets: list[str]) -> dict[str, Any]:
    """Training clips and classes of each dataset in the catalog's clip manifest and class mapping (empty without)."""
    import pandas as pd

    from eva_pipeline.dry_run import StageData
    from eva_pipeline.finetune.video import dataset_classes

    catalog = loader["catalog"]
    manifest = Path((catalog.get(VIDEO_MANIFEST_DATASET) or {}).get("filepath", ""))
    mapping = Path((catalog.get(CLASS_MAPPING_DATASET) or {}).get("filepath", ""))
    if not manifest.is_file() or not mapping.is_file():
        return {}
    classes = json.loads(mapping.read_text())
    rows = pd.read_parquet(manifest, columns=["dataset", "split"])
    train = rows[rows["split"] == "train"]["dataset"].value_counts()
    counted = {}
    for dataset in datasets:
        if dataset in train.index:
            counted[dataset] = StageData(int(train[dataset]), len(dataset_classes(classes, dataset)), "clip manifest")
    return counted


def _stage_data(loader: Any, stages: dict[str, Any], images: dict[str, int], classes: dict[str, int]) -> dict[str, Any]:
    """Each stage's images and classes: the options, else counted in the manifest with ingestion's class names,
    else EVA-01's ImageNet counts (``eva_pipeline.dry_run.EVA01_STAGE_DATA``)."""
    from eva_pipeline.dry_run import EVA01_STAGE_DATA, StageData

    unknown = sorted((set(images) | set(classes)) - set(stages))
    if unknown:
        raise click.ClickException(
            f"--finetune-images/--finetune-classes name no fine-tune stage of these parameters: {unknown} "
            f"(stages: {', '.join(stages)})"
        )
    given = {name for name in stages if name in images and name in classes}
    counted = _manifest_stage_data(loader, {n: p for n, p in stages.items() if n not in given})
    data = {}
    for name in stages:
        if name in counted:
            found, origin = (counted[name].images, counted[name].classes), "manifest"
        elif name in EVA01_STAGE_DATA:
            found, origin = EVA01_STAGE_DATA[name], "EVA-01's ImageNet count: no manifest and class names yet"
        elif name in given:
            found, origin = (0, 0), ""
        else:
            raise click.ClickException(
                f"no manifest and class names yet to count the images of fine-tune stage {name}: pass "
                f"--finetune-images {name}=N --finetune-classes {name}=C"
            )
        sources = [
            "--finetune-images" if name in images else origin,
            "--finetune-classes" if name in classes else origin,
        ]
        data[name] = StageData(
            images.get(name, found[0]), classes.get(name, found[1]), ", ".join(dict.fromkeys(sources))
        )
    return data


def _manifest_stage_data(loader: Any, stages: dict[str, Any]) -> dict[str, Any]:
    """The stages' counts from the catalog's manifest and class names; empty until ingestion has written both, and
    without the stages whose sources that manifest does not have."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from eva_pipeline.dry_run import stage_data

    catalog = loader["catalog"]
    manifest = Path(catalog[MANIFEST_DATASET]["filepath"])
    names = (catalog.get(CLASS_NAMES_DATASET) or {}).get("filepath")
    if not stages or not manifest.exists() or names is None or not Path(names).exists():
        return {}
    class_names = json.loads(Path(names).read_text())
    sources = sorted({source for params in stages.values() for source in params.data.sources})
    table = pq.read_table(manifest, columns=["source", "label"])
    rows = table.filter(pc.is_in(table.column("source"), value_set=pa.array(sources))).to_pandas()
    counted = {}
    for name, params in stages.items():
        if any(source not in class_names for source in params.data.sources):
            continue  # a manifest of another configuration (e.g. the demo's under --env eva01): the defaults count
        try:
            counted[name] = stage_data(rows, class_names, params)
        except ValueError as exc:
            raise click.ClickException(
                f"cannot count the images of fine-tune stage {name} in {manifest}: {exc}"
            ) from None
    return counted


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
