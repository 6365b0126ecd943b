"""Video ingestion nodes: generate the demo's clips when configured, then read and merge the Kinetics versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from eva_pipeline.config import VideoIngestionParams
from eva_pipeline.ingest.kinetics import VersionSource, build_k722
from eva_pipeline.ingest.moving_fashion_mnist import generate
from eva_pipeline.ingest.readers.idx import read_idx
from eva_pipeline.ingest.video import probe_video


def generate_synthetic_clips(params: VideoIngestionParams) -> dict[str, Any]:
    """The demo's Moving Fashion-MNIST clips and Kinetics-style CSVs written to ``synthetic.out_dir`` (deterministic;
    everything replaced at once) -> the generator's summary; ``{"generated": False}`` without a ``synthetic`` block
    (real Kinetics)."""
    s = params.synthetic
    if s is None:
        return {"generated": False}
    summary = generate(
        s.out_dir,
        read_idx(s.train_images),
        read_idx(s.train_labels),
        read_idx(s.test_images),
        read_idx(s.test_labels),
        seed=s.seed,
        frames=s.frames,
        size=s.size,
        item_size=s.item_size,
        width=s.width,
        fps=s.fps,
        train_per_class=s.train_per_class,
        validate_per_class=s.validate_per_class,
        leaks_per_class=s.leaks_per_class,
    )
    return {"generated": True, **summary}


def build_clip_manifest(
    synthetic: dict[str, Any], params: VideoIngestionParams
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], dict[str, Any]]:
    """Every version's CSVs and clips (each clip decoded once to count its frames; bad ones listed with a reason)
    merged into Kinetics-722 -> (clip manifest, rejections, K722 class mapping, report). ``synthetic`` orders this
    node after the generator; its summary goes into the report."""
    versions = [VersionSource.from_folder(v.name, v.annotations, v.clips) for v in params.versions]
    build = build_k722(
        versions,
        probe_video,
        aliases=params.aliases,
        min_frames=params.min_frames,
        workers=params.workers,
        progress=True,
        relative_to=Path.cwd(),
    )
    report = {**build.report, "synthetic": synthetic}
    return build.manifest, build.rejections, build.mapping, report
