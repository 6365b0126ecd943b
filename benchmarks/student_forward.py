"""Our EVA student vs timm's ``Eva`` with the same shapes: forward and forward+backward time, ratio in one run.

Separates the model from the training harness: if the two students run at the same speed, any gap in
``pretrain_step.py`` comes from the loop around them. Usage:

    .venv/bin/python benchmarks/student_forward.py [--img 112 --depth 4 --batch 16 --attn sdpa --repeats 10]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from eva_pipeline.models import EvaMIM, get_config


def _seconds(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="eva_small_patch14_224")
    parser.add_argument("--img", type=int, default=112)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--attn", choices=["eager", "sdpa"], default="sdpa")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = get_config(args.model, img_size=args.img, depth=args.depth, drop_path_rate=0.0, attn_impl=args.attn)
    ours = EvaMIM(cfg)
    ref = timm.models.eva.Eva(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_hidden_dim / cfg.embed_dim, qkv_bias=True,
    )  # fmt: skip
    x = torch.randn(args.batch, 3, cfg.img_size, cfg.img_size)
    mask = torch.zeros(args.batch, cfg.num_patches, dtype=torch.bool)
    mask[:, ::3] = True

    rows = {
        "forward": (
            _seconds(lambda: ours.forward_features(x), args.repeats),
            _seconds(lambda: ref.forward_features(x), args.repeats),
        ),
        "forward+backward": (
            _seconds(lambda: ours(x, mask).sum().backward(), args.repeats),
            _seconds(lambda: ref.forward_features(x).sum().backward(), args.repeats),
        ),
    }
    print(f"{args.model} img={args.img} depth={args.depth} batch={args.batch} attn={args.attn} "
          f"threads={torch.get_num_threads()}")  # fmt: skip
    print("| pass | ours (s) | timm Eva (s) | timm / ours |")
    print("|---|---|---|---|")
    for name, (o, r) in rows.items():
        print(f"| {name} | {o:.4f} | {r:.4f} | {r / o:.3f} |")


if __name__ == "__main__":
    main()
