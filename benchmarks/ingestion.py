"""Ingestion benchmarks.

``manifest``: time and peak memory of the manifest build at growing image counts, each size in a fresh
subprocess. A synthetic source kind (registered with ``register_source_kind``) yields N fake items without
touching any file: generated locations, labels and sizes, sha1-like content hashes of which about 1 % repeat an
earlier one (half within the pre-training source, half a probe image), and 0.1 % rejections. Two sources: a probe
source with N/10 items and a pre-training source with the rest. The child builds the manifest to Parquet
(``write_manifest``; on an older checkout without it, ``build_manifest`` + ``DataFrame.to_parquet``) and reports
the wall time of the build and ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. Linear time: time(10 N) / time(N)
is about 10; flat memory: RSS(10 N) / RSS(N) is about 1.

Usage::

    .venv/bin/python benchmarks/ingestion.py manifest                      # N = 100k and 1M
    .venv/bin/python benchmarks/ingestion.py manifest --sizes 20000 200000
    .venv/bin/python benchmarks/ingestion.py manifest --pythonpath /tmp/old_src   # another copy of the package

``loader``: images/s of the training-batch loader (``eva_pipeline.loader.batches``: manifest rows -> decode as at
ingestion -> EVA's RandomResizedCrop(0.2, 1) + flip at 224 px, bicubic, plus the block masks of every sample)
against torchvision's ``ImageFolder`` + ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``PILToTensor`` over
the same generated JPEG folder, in the same run, interleaved rounds, median reported. Per core = images/s per
decoding process (one torch thread each; workers, or the main process with 0 workers)::

    .venv/bin/python benchmarks/ingestion.py loader                        # 1024 JPEGs, workers 0 and 2

``scan``: images/s of the ingestion scan itself (read, sha1, full decode of every file) over the same kind of JPEG
folder with ``decode_workers`` 1, 2 and 4 threads::

    .venv/bin/python benchmarks/ingestion.py scan
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SYNTHETIC_KIND = "bench_synthetic"
#: Share of the N items in the probe source.
PROBE_SHARE = 10
#: One item in DUP_EVERY repeats an earlier hash; one in REJECT_EVERY is rejected.
DUP_EVERY = 100
REJECT_EVERY = 1000


# ---------------------------------------------------------------------------------------------------- manifest
def _digest(source: str, i: int) -> str:
    return hashlib.sha1(f"{source}:{i}".encode()).hexdigest()


def register_synthetic_kind() -> None:
    """Register :data:`SYNTHETIC_KIND`: ``limit`` items, ``split`` as given, nothing read from disk."""
    from eva_pipeline.ingest.scan import SourceScan, register_source_kind, source_kinds

    if SYNTHETIC_KIND in source_kinds():
        return

    @register_source_kind(SYNTHETIC_KIND)
    def read_synthetic(spec: Any) -> Any:
        n = int(spec.limit)
        scan = SourceScan(available=n)
        name = spec.name
        probe = spec.split == "probe"
        for i in range(n):
            location = f"synthetic/{name}/{i // 1000:05d}/{i:09d}.jpg"
            if i % REJECT_EVERY == REJECT_EVERY - 1:
                scan.reject(location, "corrupt", "synthetic rejection")
                continue
            if not probe and i % DUP_EVERY == DUP_EVERY // 2 and i > 0:
                # half repeat an earlier item of this source, half a probe image (always kept by the probe)
                digest = _digest(name, i // 2) if (i // DUP_EVERY) % 2 else _digest("probe", i % 1000)
            else:
                digest = _digest("probe" if probe else name, i)
            scan.add(location, i % 1000, 224 + i % 7, 224, 40_000 + i % 20_000, digest)
        return scan


def synthetic_specs(n: int, root: str | os.PathLike[str]) -> list[Any]:
    from eva_pipeline.ingest.scan import SourceSpec

    n_probe = max(1, n // PROBE_SHARE)
    return [
        SourceSpec("synth_probe", SYNTHETIC_KIND, "probe", root, limit=n_probe),
        SourceSpec("synth_pretrain", SYNTHETIC_KIND, "pretrain", root, limit=max(1, n - n_probe)),
    ]


def _maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def manifest_child(n: int, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Build the synthetic manifest of ``n`` items in this process; -> wall time, peak RSS, counts."""
    try:
        import eva_pipeline.ingest.build as manifest_mod
    except ImportError:  # checkouts before the ingest/ split
        import eva_pipeline.data.manifest as manifest_mod  # type: ignore[no-redef]

    register_synthetic_kind()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = synthetic_specs(n, out_dir)
    out = out_dir / "manifest.parquet"
    rss_import = _maxrss_mib()
    start = time.perf_counter()
    if hasattr(manifest_mod, "write_manifest"):
        manifest, report = manifest_mod.write_manifest(specs, out, rejections_path=out_dir / "rejections.jsonl")
        rows = manifest.num_rows
    else:  # the in-memory build of older checkouts
        frame, report = manifest_mod.build_manifest(specs, rejections_path=out_dir / "rejections.jsonl")
        frame.to_parquet(out, index=False)
        rows = len(frame)
    wall = time.perf_counter() - start
    return {
        "n": n,
        "rows": rows,
        "duplicates": report["totals"]["duplicates"],
        "rejected": report["totals"]["rejected"],
        "wall_s": wall,
        "rss_import_mib": rss_import,
        "rss_peak_mib": _maxrss_mib(),
        "file_mib": out.stat().st_size / (1 << 20),
        "module": manifest_mod.__file__,
    }


def run_manifest_sizes(sizes: Sequence[int], pythonpath: str | None = None) -> list[dict[str, Any]]:
    """One fresh subprocess per size (so that ru_maxrss is that build's peak)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-ingestion-") as tmp:
            cmd = [sys.executable, str(Path(__file__).resolve()), "manifest", "--child", "--n", str(n), "--out", tmp]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"child for N={n} failed:\n{proc.stdout}\n{proc.stderr}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def format_manifest_results(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"module: {results[0]['module']}",
        "| N | rows | duplicates | rejected | build s | us/item | peak RSS MiB | RSS after imports MiB | file MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['n']:,} | {r['rows']:,} | {r['duplicates']:,} | {r['rejected']:,} | {r['wall_s']:.2f} | "
            f"{1e6 * r['wall_s'] / r['n']:.1f} | {r['rss_peak_mib']:.0f} | {r['rss_import_mib']:.0f} | "
            f"{r['file_mib']:.1f} |"
        )
    if len(results) >= 2:
        a, b = results[0], results[-1]
        size = b["n"] / a["n"]
        growth_a = a["rss_peak_mib"] - a["rss_import_mib"]
        growth_b = b["rss_peak_mib"] - b["rss_import_mib"]
        lines.append(
            f"N x{size:g}: time x{b['wall_s'] / a['wall_s']:.2f} (linear: {size:g}), peak RSS "
            f"x{b['rss_peak_mib'] / a['rss_peak_mib']:.2f} (flat: 1), RSS above imports "
            f"{growth_a:.0f} -> {growth_b:.0f} MiB (x{growth_b / max(growth_a, 1e-9):.2f})"
        )
    return "\n".join(lines)


def cmd_manifest(args: argparse.Namespace) -> int:
    if args.child:
        print(json.dumps(manifest_child(args.n, args.out)))
        return 0
    results = run_manifest_sizes(args.sizes, args.pythonpath)
    print(format_manifest_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


# ------------------------------------------------------------------------------------------------------ loader
LOADER_IMG_SIZE, LOADER_GRID, LOADER_MASKED, LOADER_MIN_PATCHES = 224, 16, 105, 16  # EVA: 224 px, 16x16, 105 masked


def make_jpeg_folder(root: Path, n: int, classes: int = 4, seed: int = 0) -> Path:
    """``n`` JPEGs (quality 90, 256-383 x 320-447 px, smooth patterns + noise) in ``classes`` class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.jpg"
        if path.exists():
            continue
        h, w = 256 + int(rng.integers(0, 128)), 320 + int(rng.integers(0, 128))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (1 + i % 5)) % 256, (yy * 2) % 256, (xx + yy + i) % 256], -1).astype(np.float32)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    return root


def _ours(rows: Any, batch: int, steps: int, workers: int) -> Any:
    from eva_pipeline.loader.augment import RandomResizedCropFlip
    from eva_pipeline.loader.batches import BatchPlan, batch_loader
    from eva_pipeline.loader.order import EpochOrder
    from eva_pipeline.loader.pixels import ManifestPixels
    from eva_pipeline.loader.rows import FrameRows
    from eva_pipeline.masking import BlockMaskGenerator

    plan = BatchPlan(
        pixels=ManifestPixels(FrameRows(rows)),
        order=EpochOrder(len(rows), 0),
        global_batch=batch,
        rank=0,
        world_size=1,
        img_size=LOADER_IMG_SIZE,
        seed=0,
        view_mode="augment",
        masker=BlockMaskGenerator((LOADER_GRID, LOADER_GRID), LOADER_MASKED, LOADER_MIN_PATCHES),
        augment=RandomResizedCropFlip(LOADER_IMG_SIZE),
    )
    return batch_loader(plan, 0, steps, num_workers=workers)


def _torchvision(root: Path, batch: int, workers: int) -> Any:
    import torch
    import torchvision
    from torchvision import transforms as T

    transform = T.Compose([
        T.RandomResizedCrop(LOADER_IMG_SIZE, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),
    ])  # fmt: skip
    dataset = torchvision.datasets.ImageFolder(str(root), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)


def _time_loader(loader: Any, steps: int) -> float:
    """Images per second over ``steps`` batches (worker start-up included, as a training epoch pays it)."""
    start, images = time.perf_counter(), 0
    for k, item in enumerate(loader):
        images += len(item.indices) if hasattr(item, "indices") else len(item[0])
        if k + 1 == steps:
            break
    return images / (time.perf_counter() - start)


def cmd_loader(args: argparse.Namespace) -> int:
    import statistics

    import torch

    torch.set_num_threads(1)  # one core per process: "per core" means per decoding process
    with tempfile.TemporaryDirectory() as tmp:
        root = make_jpeg_folder(Path(args.data or tmp) / "jpegs", args.images)
        from eva_pipeline.ingest.build import build_manifest
        from eva_pipeline.ingest.scan import SourceSpec

        built, _ = build_manifest([SourceSpec("bench", "image_folder", "pretrain", root)])
        rows = built if hasattr(built, "columns") else built.split("pretrain")
        steps = min(args.steps, len(rows) // args.batch)
        print(
            f"loader: {len(rows)} JPEGs, batch {args.batch}, {steps} steps per round, {args.rounds} rounds, "
            f"{LOADER_IMG_SIZE} px views; torch {torch.__version__}, {os.cpu_count()} CPUs"
        )
        print(
            f"{'workers':>7} | {'torchvision img/s':>17} | {'ours img/s':>10} | {'per core: tv':>12} | "
            f"{'per core: ours':>14} | ours / torchvision"
        )
        for workers in args.workers:
            tv, ours = [], []
            for r in range(args.rounds):  # interleaved, order alternating
                pair = [
                    ("tv", lambda w=workers: _torchvision(root, args.batch, w)),
                    ("ours", lambda w=workers: _ours(rows, args.batch, steps, w)),
                ]
                for name, make in pair if r % 2 == 0 else pair[::-1]:
                    (tv if name == "tv" else ours).append(_time_loader(make(), steps))
            tv_m, ours_m, cores = statistics.median(tv), statistics.median(ours), max(1, workers)
            print(
                f"{workers:>7} | {tv_m:>17.1f} | {ours_m:>10.1f} | {tv_m / cores:>12.1f} | {ours_m / cores:>14.1f} | "
                f"{ours_m / tv_m:.2f}x"
            )
    return 0


# -------------------------------------------------------------------------------------------------------- scan
def cmd_scan(args: argparse.Namespace) -> int:
    """Ingestion of a real JPEG folder (read, sha1, full decode per file) with 1 vs N decode threads."""
    import dataclasses
    import statistics

    from eva_pipeline.ingest.build import build_manifest
    from eva_pipeline.ingest.scan import SourceSpec

    with tempfile.TemporaryDirectory() as tmp:
        root = make_jpeg_folder(Path(args.data or tmp) / "jpegs", args.images)
        spec = SourceSpec("bench", "image_folder", "pretrain", root)
        print(
            f"scan: {args.images} JPEGs (256-383 x 320-447 px), no cache, {args.rounds} rounds; {os.cpu_count()} CPUs"
        )
        print(f"{'decode_workers':>14} | {'images/s':>9} | vs 1 thread")
        base = None
        for workers in args.workers:
            times = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                manifest, _ = build_manifest([dataclasses.replace(spec, decode_workers=workers)])
                times.append(time.perf_counter() - start)
            rate = len(manifest) / statistics.median(times)
            base = base or rate
            print(f"{workers:>14} | {rate:>9.1f} | {rate / base:.2f}x")
    return 0


# ---------------------------------------------------------------------------------------------------- cli
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("manifest", help="manifest build: time and peak RSS at growing N (fresh process per N)")
    m.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="image counts N")
    m.add_argument("--pythonpath", default=None, help="prepend to PYTHONPATH of the children (another checkout)")
    m.add_argument("--json", default=None, help="also write the results here")
    m.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    m.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    m.add_argument("--out", default=None, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_manifest)
    lo = sub.add_parser("loader", help="training-batch loader vs torchvision ImageFolder + RandomResizedCrop")
    lo.add_argument("--images", type=int, default=1024, help="JPEGs generated for the run")
    lo.add_argument("--batch", type=int, default=32)
    lo.add_argument("--steps", type=int, default=16, help="batches timed per round")
    lo.add_argument("--rounds", type=int, default=3)
    lo.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers (0: in-process)")
    lo.add_argument("--data", default=None, help="keep the generated JPEGs here (default: a temporary folder)")
    lo.set_defaults(func=cmd_loader)
    sc = sub.add_parser("scan", help="ingestion scan of a JPEG folder: decode threads 1 vs N")
    sc.add_argument("--images", type=int, default=1024)
    sc.add_argument("--rounds", type=int, default=3)
    sc.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    sc.add_argument("--data", default=None, help="keep the generated JPEGs here (default: a temporary folder)")
    sc.set_defaults(func=cmd_scan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
