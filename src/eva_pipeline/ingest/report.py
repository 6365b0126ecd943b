"""The ingestion report of a build and its rejections file.

The report (JSON-ready, string keys) has per source: found / kept / rejected / duplicates (found == kept +
rejected + duplicates), the count of every rejection reason and the first
:data:`~eva_pipeline.ingest.scan.REPORT_EXAMPLES` rejected and duplicate items, what the reader noted (e.g. the
layout of an image folder), its class names in label order (``classes``: null for an unlabelled source; the
``class_names`` output of the ingestion pipeline) and the scan cache's counters; then totals, per-split counts and
the label histogram of each split. The rejections file lists every rejection of every source, one JSON line each.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eva_pipeline.fileio import replace_atomically
from eva_pipeline.ingest.dedup import DedupPass
from eva_pipeline.ingest.scan import SourceScan, SourceSpec
from eva_pipeline.ingest.write import WritePass
from eva_pipeline.manifest import SPLITS


def write_rejections(path: Path, specs: Sequence[SourceSpec], scans: Sequence[SourceScan]) -> None:
    """Every rejection as one JSON line (written to a temporary file, then moved into place)."""

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as fh:
            for spec, scan in zip(specs, scans, strict=True):
                for rejection in scan.iter_rejections():
                    fh.write(json.dumps({"source": spec.name, **rejection}, ensure_ascii=False) + "\n")

    replace_atomically(path, write)


def ingestion_report(
    specs: Sequence[SourceSpec],
    scans: Sequence[SourceScan],
    dedup: bool,
    dedup_pass: DedupPass,
    written: WritePass,
    cache_reports: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """Per source counts, totals, per-split counts and per-split label histograms (string keys: saved as JSON)."""
    sources: dict[str, Any] = {}
    for k, (spec, scan) in enumerate(zip(specs, scans, strict=True)):
        sources[spec.name] = {
            "kind": spec.kind,
            "split": spec.split,
            "images": str(spec.images),
            "labels": None if spec.labels is None else str(spec.labels),
            "limit": spec.limit,
            "available": scan.available,
            "found": scan.found,
            "kept": written.kept[k],
            "rejected": scan.rejected,
            "duplicates": dedup_pass.duplicates[k],
            "rejection_reasons": scan.rejection_reasons,
            "rejected_examples": scan.rejected_examples,
            "duplicate_examples": dedup_pass.examples[k],
            **{key: value for key, value in scan.info.items() if key not in ("kind", "split", "found", "kept")},
            "classes": written.classes[k],
            **cache_reports[k],
        }
    totals = {key: sum(int(s[key]) for s in sources.values()) for key in ("found", "kept", "rejected", "duplicates")}
    splits = {
        split: {
            "items": written.split_items[split],
            "labelled": written.split_labelled[split],
            "sources": sorted(written.split_sources[split]),
        }
        for split in SPLITS
    }
    histogram = {split: {str(k): v for k, v in sorted(written.histograms[split].items())} for split in SPLITS}
    return {"dedup": dedup, "sources": sources, "totals": totals, "splits": splits, "label_histogram": histogram}
