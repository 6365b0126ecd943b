"""Linear-probe protocols on the same split: which frozen features of the student beat raw pixels, and at what cost.

The exploration behind ``evaluation.probe`` (issue 9 item 6; results in benchmarks/README.md). Run after
`make pretrain`: ``.venv/bin/python benchmarks/probe_protocols.py --full --no-scale``. For the pre-trained student,
the same ViT at its training init (``initial_student``: ``pretrain.seed``), raw pixels and the teacher, it fits the
project's probe (StandardScaler or not + lbfgs logistic regression, ``evaluation.probe``) on the split of
``split_probe`` and prints top-1 and the fit's wall time per encoder x protocol. The pipeline's probe is the row
"concat | final norm", std.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from threadpoolctl import threadpool_limits

from eva_pipeline.config import EvaluationParams, PretrainParams, TeacherTargetsParams
from eva_pipeline.evaluation import ProbeConfig, linear_probe_top1, split_probe
from eva_pipeline.loader.pixels import load_images
from eva_pipeline.loader.transforms import to_model_input
from eva_pipeline.manifest import select_split
from eva_pipeline.models import EvaMIM, load_official_checkpoint
from eva_pipeline.pipelines.common import build_teacher, student_config
from eva_pipeline.training.recipe import initial_student


def load_params(conf: str, env: str, overrides: list[str]) -> dict:
    from kedro.framework.project import configure_project, settings

    configure_project("eva_pipeline")
    runtime = OmegaConf.to_container(OmegaConf.from_dotlist(overrides)) if overrides else {}
    loader = settings.CONFIG_LOADER_CLASS(
        conf_source=conf, env=env, runtime_params=runtime, **settings.CONFIG_LOADER_ARGS
    )
    return loader["parameters"]


def block_tokens(model: EvaMIM, images: torch.Tensor, batch: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Outputs of every block (before the final norm) and the final-norm tokens, each (N, 1 + P, D) float32."""
    model.eval()
    captured: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: captured.append(out)) for b in model.blocks]
    per_block: list[list[np.ndarray]] = [[] for _ in model.blocks]
    normed: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch):
                captured.clear()
                normed.append(model.forward_features(images[start : start + batch]).float().numpy())
                for i, out in enumerate(captured):
                    per_block[i].append(out.float().numpy())
    finally:
        for h in hooks:
            h.remove()
    return [np.concatenate(b) for b in per_block], np.concatenate(normed)


def layer_norm(tokens: np.ndarray, model: EvaMIM) -> np.ndarray:
    with torch.inference_mode():
        return model.norm(torch.from_numpy(tokens)).numpy()


def readout(tokens: np.ndarray, how: str) -> np.ndarray:
    patches = tokens[:, 1:]
    if how == "mean":
        return patches.mean(axis=1)
    if how == "cls":
        return tokens[:, 0]
    if how == "cls+mean":
        return np.concatenate([tokens[:, 0], patches.mean(axis=1)], axis=1)
    if how == "concat":
        return patches.reshape(patches.shape[0], -1)
    raise ValueError(how)


def vit_protocols(model: EvaMIM, images: torch.Tensor, batch: int, full: bool) -> dict[str, np.ndarray]:
    blocks, normed = block_tokens(model, images, batch)
    depth = len(blocks)
    out = {
        "mean | final norm": readout(normed, "mean"),
        "cls | final norm": readout(normed, "cls"),
        "cls+mean | final norm": readout(normed, "cls+mean"),
        "concat | final norm": readout(normed, "concat"),
        "mean | last block, no norm": readout(blocks[-1], "mean"),
    }
    for k in (2, depth):
        out[f"mean | last {k} blocks, each normed, concat"] = np.concatenate(
            [readout(layer_norm(b, model), "mean") for b in blocks[-k:]], axis=1
        )
        out[f"mean | last {k} blocks, no norm, concat"] = np.concatenate(
            [readout(b, "mean") for b in blocks[-k:]], axis=1
        )
    if full:
        out["concat | last block, no norm"] = readout(blocks[-1], "concat")
        out["concat | block -2, normed"] = readout(layer_norm(blocks[-2], model), "concat")
        out["concat | mean of last 2 blocks, normed"] = readout(
            np.mean([layer_norm(b, model) for b in blocks[-2:]], axis=0), "concat"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default="data/06_models/eva_student.pt")
    parser.add_argument("--manifest", default="data/03_primary/manifest.parquet")
    parser.add_argument("--conf", default="conf")
    parser.add_argument("--env", default="local")
    parser.add_argument(
        "--params", nargs="*", default=[], help="kedro-style overrides, e.g. pretrain.model.overrides.embed_dim=192"
    )
    parser.add_argument("--full", action="store_true", help="also the costly concat variants")
    parser.add_argument("--no-scale", action="store_true", help="also fit every protocol without the StandardScaler")
    parser.add_argument("--no-teacher", action="store_true")
    parser.add_argument("--skip-random", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads of each probe fit")
    parser.add_argument("--only", nargs="*", default=None, help="protocol names to fit (substring match)")
    args = parser.parse_args()

    params = load_params(args.conf, args.env, args.params)
    pretrain = PretrainParams.model_validate(params["pretrain"])
    evaluation = EvaluationParams.model_validate(params["evaluation"])
    teacher_params = TeacherTargetsParams.model_validate(params["teacher_targets"])

    rows = select_split(pd.read_parquet(args.manifest), "probe")
    labels = rows["label"].to_numpy(dtype="int64")
    p = evaluation.probe
    base = ProbeConfig(test_fraction=p.test_fraction, seed=p.seed, C=p.C, max_iter=p.max_iter)
    train_idx, test_idx = split_probe(labels, base)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    config = student_config(pretrain.model, target_dim=int(state["lm_head.weight"].shape[0]))
    pixels = load_images(rows)
    images = to_model_input(pixels, config.img_size)
    print(f"probe images {len(rows)}: train {train_idx.size}, test {test_idx.size}; student {config}")

    t0 = time.perf_counter()
    features: dict[str, dict[str, np.ndarray]] = {}
    student = EvaMIM(config)
    load_official_checkpoint(student, state)
    features["student"] = vit_protocols(student, images, evaluation.batch_size, args.full)
    if not args.skip_random:
        random_init = initial_student(pretrain, config.target_dim)
        features["random init"] = vit_protocols(random_init, images, evaluation.batch_size, args.full)
    features["raw pixels"] = {"pixels": pixels.reshape(pixels.shape[0], -1).float().numpy() / 255.0}
    if not args.no_teacher and evaluation.include_teacher:
        teacher = build_teacher(teacher_params.teacher, teacher_params.device)
        grid = (config.grid_size, config.grid_size)
        chunks = [teacher.targets(images[s : s + 64], grid).numpy() for s in range(0, images.shape[0], 64)]
        tokens = np.concatenate(chunks)
        features["teacher"] = {
            "mean | final norm": tokens.mean(axis=1),
            "concat | final norm": tokens.reshape(tokens.shape[0], -1),
        }
    print(f"features: {time.perf_counter() - t0:.1f} s")

    results = []
    scalings = (True, False) if args.no_scale else (True,)
    for encoder, protocols in features.items():
        for protocol, x in protocols.items():
            if args.only and encoder != "raw pixels" and not any(o in protocol for o in args.only):
                continue
            for standardize in scalings:
                cfg = ProbeConfig(**{**base.__dict__, "standardize": standardize})
                start = time.perf_counter()
                with threadpool_limits(args.threads):
                    top1 = linear_probe_top1(x[train_idx], labels[train_idx], x[test_idx], labels[test_idx], cfg)
                seconds = time.perf_counter() - start
                row = {
                    "encoder": encoder,
                    "protocol": protocol,
                    "scale": "std" if standardize else "none",
                    "dim": x.shape[1],
                    "top1": top1,
                    "fit_s": round(seconds, 1),
                }
                results.append(row)
                scale, dim = row["scale"], x.shape[1]
                print(
                    f"{encoder:12s} | {protocol:45s} | {scale:4s} | {dim:5d} | {top1:.4f} | {seconds:6.1f} s",
                    flush=True,
                )

    table = pd.DataFrame(results)
    pix = table[(table.encoder == "raw pixels") & (table.scale == "std")].top1.iloc[0]
    table["vs_pixels"] = (table.top1 - pix).round(4)
    print()
    print(table.to_markdown(index=False))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
