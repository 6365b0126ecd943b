"""Held-out top-1 of a demo fine-tune stage (conf/base ``finetune`` or ``finetune_video_intermediate``) under
settings given on the command line.

Reads what ``make run`` wrote before the stage: for ``finetune``, ``data/03_primary/manifest.parquet`` and
``class_names.json``; for ``finetune_video_intermediate`` (the K722 stage), ``data/03_primary/video_manifest.parquet``
and ``data/03_primary/k722_class_mapping.json``; for both, ``data/06_models/eva_student.pt`` and
``data/05_model_input/student_config.yml``. Trains the stage's recipe with the same loop as the pipeline, once per
variant and start, checkpoints in a temporary folder; prints each variant's held-out top-1 along the run (every
``validation.every_steps``), the final one (weights and EMA) and its ratio to the first variant's, measured in the
same run. A run of the conf's budget takes about 1.5 minutes (``finetune``) or 2 (``finetune_video_intermediate``) on
2 CPU cores.

    .venv/bin/python benchmarks/finetune_sweep.py --start student \
        --variant '{}' --variant '{"optimizer.layer_decay": 0.95}'
    .venv/bin/python benchmarks/finetune_sweep.py --stage finetune_video_intermediate --start student \
        --variant '{"validation.every_steps": 35}' --variant '{"validation.every_steps": 35, "seed": 1}'

A variant is a JSON object of dotted keys of the stage's block.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from eva_pipeline.config import TargetFinetuneParams, VideoFinetuneParams
from eva_pipeline.datasets import EvaCheckpointDataset, StudentConfigDataset
from eva_pipeline.finetune.video import start_from_image
from eva_pipeline.finetune.weights import load_finetune_start
from eva_pipeline.manifest import Manifest
from eva_pipeline.pipelines.finetune_common import stage_data, train_run
from eva_pipeline.pipelines.video_common import train_video_run, video_stage_data

ROOT = Path(__file__).resolve().parents[1]


def _apply(block: dict, dotted: dict) -> dict:
    for key, value in dotted.items():
        node = block
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return block


def _image_stage(variant: dict, student, weights) -> tuple[object, object]:
    """The ``finetune`` stage's params and a trainer ``(start, checkpoints) -> summary, history``."""
    manifest = Manifest(ROOT / "data/03_primary/manifest.parquet")
    names = json.loads((ROOT / "data/03_primary/class_names.json").read_text())
    base = yaml.safe_load((ROOT / "conf/base/parameters_finetune.yml").read_text())["finetune"]
    params = TargetFinetuneParams.model_validate(_apply(base, variant))
    classes, train, val = stage_data(manifest, names, params)

    def trainer(start: str, checkpoints: Path):
        def initialise(model):
            return load_finetune_start(model, {"model": weights}) if start == "student" else None

        _, history, summary = train_run(start, params, student, classes, train, val, initialise, start, checkpoints)
        return summary, history

    return params, trainer


def _video_stage(variant: dict, student, weights) -> tuple[object, object]:
    """The ``finetune_video_intermediate`` (K722) stage's params and trainer."""
    manifest = pd.read_parquet(ROOT / "data/03_primary/video_manifest.parquet")
    mapping = json.loads((ROOT / "data/03_primary/k722_class_mapping.json").read_text())
    block = "finetune_video_intermediate"
    base = yaml.safe_load((ROOT / f"conf/base/parameters_{block}.yml").read_text())[block]
    params = VideoFinetuneParams.model_validate(_apply(base, variant))
    classes, train, val = video_stage_data(manifest, mapping, params, params.data.dataset)

    def trainer(start: str, checkpoints: Path):
        def initialise(model):
            return start_from_image(model, weights) if start == "student" else None

        _, history, summary = train_video_run(
            start, params, student, classes, train, val, initialise, start, checkpoints
        )
        return summary, history

    return params, trainer


STAGES = {"finetune": _image_stage, "finetune_video_intermediate": _video_stage}


def _curve(history: list[dict]) -> str:
    points = [(int(r["step"]), r["val_top1"]) for r in history if r.get("val_top1") is not None]
    return " ".join(f"{step}:{top1:.2f}" for step, top1 in points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=sorted(STAGES), default="finetune")
    parser.add_argument("--variant", action="append", default=None, help="JSON of dotted stage keys (repeatable)")
    parser.add_argument("--start", choices=["student", "random"], action="append", default=None)
    args = parser.parse_args()
    variants = [json.loads(v) for v in (args.variant or ["{}"])]
    starts = args.start or ["student"]
    student = StudentConfigDataset(str(ROOT / "data/05_model_input/student_config.yml")).load()
    weights = EvaCheckpointDataset(str(ROOT / "data/06_models/eva_student.pt")).load()

    results: dict[tuple[int, str], float] = {}
    for i, variant in enumerate(variants):
        params, trainer = STAGES[args.stage](variant, student, weights)
        for start in starts:
            tick = time.perf_counter()
            with tempfile.TemporaryDirectory() as ckpt:
                summary, history = trainer(start, Path(ckpt))
            top1 = summary["final_val_top1_ema"] if params.ema.enabled else summary["final_val_top1"]
            results[(i, start)] = top1
            ratio = top1 / results[(0, start)] if results[(0, start)] else float("nan")
            print(
                f"variant {json.dumps(variant)} start {start}: held-out top-1 {summary['final_val_top1']:.3f} "
                f"(EMA {summary['final_val_top1_ema']:.3f}), x{ratio:.2f} of the first variant, "
                f"{time.perf_counter() - tick:.0f} s; along the run {_curve(history)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
