"""Can the space-time EVA learn motion in the demo's budget? Held-out accuracy on the motion alone (8 classes of
Moving Fashion-MNIST: left, right, up, down, clockwise, anticlockwise, zoom in, zoom out; the item group ignored),
per tubelet size, from the pre-trained student.

Reads what ``make run`` (or the ``pretrain`` and ``video_ingestion`` pipelines) wrote: the clip manifest
(``data/03_primary/video_manifest.parquet``), the student (``data/06_models/eva_student.pt``) and its config. Trains
the K722 clips' classifier with a plain AdamW loop (no augmentation: the 1x1 view of every clip, decoded once) for
``--steps`` steps per tubelet and prints each tubelet's final held-out top-1 and its ratio to the first one's,
measured in the same run.

    .venv/bin/python benchmarks/video_tubelet.py --tubelet 1 --tubelet 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import yaml

from eva_pipeline.config import VideoFinetuneParams
from eva_pipeline.datasets import EvaCheckpointDataset, StudentConfigDataset
from eva_pipeline.finetune.video import NORMALISATION, clip_rows, make_video_classifier, start_from_image
from eva_pipeline.loader.video import VideoClipDataset

ROOT = Path(__file__).resolve().parents[1]


def motion(label_name: str) -> str:
    """``"tops moving left"`` -> ``"moving left"``: the class name without its item group."""
    return label_name.split(" ", 1)[1]


def clips(manifest: pd.DataFrame, split: str, frames: int, size: int) -> tuple[torch.Tensor, list[str]]:
    rows, labels = clip_rows(manifest, "k722", split)
    mean, std = NORMALISATION["clip"]
    dataset = VideoClipDataset(rows, labels, num_frames=frames, img_size=size, train=False, mean=mean, std=std)
    return torch.stack([dataset[i][0] for i in range(len(dataset))]), [motion(n) for n in rows["label_name"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tubelet", type=int, action="append", default=None)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    manifest = pd.read_parquet(ROOT / "data/03_primary/video_manifest.parquet")
    train, train_names = clips(manifest, "train", args.frames, args.img_size)
    held_out, held_out_names = clips(manifest, "validate", args.frames, args.img_size)
    classes = sorted(set(train_names))
    y_train = torch.tensor([classes.index(n) for n in train_names])
    y_held_out = torch.tensor([classes.index(n) for n in held_out_names])
    student = StudentConfigDataset(str(ROOT / "data/05_model_input/student_config.yml")).load()
    weights = EvaCheckpointDataset(str(ROOT / "data/06_models/eva_student.pt")).load()
    block = yaml.safe_load((ROOT / "conf/base/parameters_finetune_video_intermediate.yml").read_text())
    block = block["finetune_video_intermediate"]
    first = None
    chance = 1 / len(classes)
    print(f"{len(train)} training and {len(held_out)} held-out clips, {len(classes)} motions (chance {chance:.3f})")
    for tubelet in args.tubelet or [1, 2]:
        params = VideoFinetuneParams.model_validate(
            {**block, "num_frames": args.frames, "img_size": args.img_size, "tubelet": tubelet, "drop_path_rate": 0.0}
        )
        torch.manual_seed(0)
        model = make_video_classifier(params, student.model, len(classes))
        start_from_image(model, weights)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
        order = torch.Generator().manual_seed(0)
        tick = time.perf_counter()
        for _ in range(args.steps):
            batch = torch.randint(len(train), (32,), generator=order)
            loss = F.cross_entropy(model(train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            top1 = float((model(held_out).argmax(1) == y_held_out).float().mean())
        first = first or top1
        print(
            f"tubelet {tubelet}: held-out motion top-1 {top1:.3f}, x{top1 / first:.2f} of the first tubelet, "
            f"{time.perf_counter() - tick:.0f} s"
        )


if __name__ == "__main__":
    main()
