"""Held-out top-1 of the demo's target fine-tune (conf/base ``finetune``) under settings given on the command line.

Reads what ``make pretrain`` and the ingestion stage wrote (``data/03_primary/manifest.parquet``, ``class_names.json``,
``data/06_models/eva_student.pt``, ``data/05_model_input/student_config.yml``) and trains the ``finetune`` stage's
recipe with the same loop as the pipeline (``pipelines.finetune_common.train_run``), once per variant and start,
checkpoints in a temporary folder; prints each variant's final held-out top-1 (weights and EMA) and its ratio to the
first variant's, measured in the same run. Each run of the conf's budget takes about 1.5 minutes on 2 CPU cores.

    .venv/bin/python benchmarks/finetune_sweep.py --start student \
        --variant '{}' --variant '{"optimizer.layer_decay": 0.95}'

A variant is a JSON object of dotted keys of the ``finetune`` block.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from eva_pipeline.config import TargetFinetuneParams
from eva_pipeline.datasets import EvaCheckpointDataset, StudentConfigDataset
from eva_pipeline.finetune.weights import load_finetune_start
from eva_pipeline.manifest import Manifest
from eva_pipeline.pipelines.finetune_common import stage_data, train_run

ROOT = Path(__file__).resolve().parents[1]


def _apply(block: dict, dotted: dict) -> dict:
    for key, value in dotted.items():
        node = block
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=None, help="JSON of dotted finetune keys (repeatable)")
    parser.add_argument("--start", choices=["student", "random"], action="append", default=None)
    args = parser.parse_args()
    variants = [json.loads(v) for v in (args.variant or ["{}"])]
    starts = args.start or ["student"]

    manifest = Manifest(ROOT / "data/03_primary/manifest.parquet")
    names = json.loads((ROOT / "data/03_primary/class_names.json").read_text())
    student = StudentConfigDataset(str(ROOT / "data/05_model_input/student_config.yml")).load()
    weights = EvaCheckpointDataset(str(ROOT / "data/06_models/eva_student.pt")).load()
    base = yaml.safe_load((ROOT / "conf/base/parameters_finetune.yml").read_text())["finetune"]

    results: dict[tuple[int, str], float] = {}
    for i, variant in enumerate(variants):
        params = TargetFinetuneParams.model_validate(_apply(json.loads(json.dumps(base)), variant))
        classes, train, val = stage_data(manifest, names, params)
        for start in starts:

            def initialise(model, start=start):
                return load_finetune_start(model, {"model": weights}) if start == "student" else None

            tick = time.perf_counter()
            with tempfile.TemporaryDirectory() as ckpt:
                _, _, summary = train_run(start, params, student, classes, train, val, initialise, start, Path(ckpt))
            top1 = summary["final_val_top1_ema"] if params.ema.enabled else summary["final_val_top1"]
            results[(i, start)] = top1
            ratio = top1 / results[(0, start)] if results[(0, start)] else float("nan")
            print(
                f"variant {json.dumps(variant)} start {start}: held-out top-1 {summary['final_val_top1']:.3f} "
                f"(EMA {summary['final_val_top1_ema']:.3f}), x{ratio:.2f} of the first variant, "
                f"{time.perf_counter() - tick:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
