"""The ingestion report of a build and its rejections file.

The report (JSON-ready, string keys) has per source: found / kept / rejected / duplicates (found == kept +
rejected + duplicates), ``label_conflicts`` (duplicates whose kept copy has another class), the count of every
rejection reason and the first :data:`~eva_pipeline.ingest.scan.REPORT_EXAMPLES` rejected items, duplicates and
label conflicts (each duplicate by its location and its kept copy's, with both labels), what the reader noted (e.g.
the layout of an image folder), its class names in label order (``classes``: null for an unlabelled source; the
``class_names`` output of the ingestion pipeline) and the scan cache's counters; then totals, per-split counts, the
label histogram of each split and ``warnings`` (the label conflicts, when there are any).

The rejections file lists every item that is not in the manifest, one JSON line each, source by source: its
rejections (``source``, ``location``, ``reason``, ``detail``), then its duplicates (reason ``duplicate``, plus the
kept copy and both labels: :meth:`~eva_pipeline.ingest.dedup.DuplicateList.records`); so it has rejected +
duplicates lines. Nothing in it depends on the run (no memory address, no temporary path): it changes only with the
data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eva_pipeline.fileio import replace_atomically
from eva_pipeline.ingest.dedup import DedupPass
from eva_pipeline.ingest.scan import REPORT_EXAMPLES, SourceScan, SourceSpec
from eva_pipeline.ingest.write import WritePass
from eva_pipeline.manifest import SPLITS

#: What the report keeps of a duplicate's record (the rejections file has its ``detail`` too).
DUPLICATE_EXAMPLE_KEYS: tuple[str, ...] = (
    "location", "duplicate_of", "duplicate_of_source", "duplicate_of_id", "label", "duplicate_of_label",
    "label_conflict",
)  # fmt: skip


def write_rejections(
    path: Path, specs: Sequence[SourceSpec], scans: Sequence[SourceScan], dedup_pass: DedupPass, written: WritePass
) -> None:
    """Every rejection and every duplicate as one JSON line, source by source (written to a temporary file, then
    moved into place); memory flat: both are streamed from disk."""

    def write(tmp: Path) -> None:
        duplicates = dedup_pass.listing.records(specs, written.classes)
        pending = next(duplicates, None)
        with tmp.open("w", encoding="utf-8") as fh:
            for k, (spec, scan) in enumerate(zip(specs, scans, strict=True)):
                for rejection in scan.iter_rejections():
                    fh.write(json.dumps({"source": spec.name, **rejection}, ensure_ascii=False) + "\n")
                while pending is not None and pending[0] == k:
                    fh.write(json.dumps({"source": spec.name, **pending[1]}, ensure_ascii=False) + "\n")
                    pending = next(duplicates, None)

    replace_atomically(path, write)


def _duplicate_summary(
    specs: Sequence[SourceSpec], dedup_pass: DedupPass, written: WritePass
) -> tuple[list[int], list[list[dict[str, Any]]], list[list[dict[str, Any]]]]:
    """Per source: label conflicts, the first duplicates and the first label conflicts (one pass over the list)."""
    conflicts = [0] * len(specs)
    examples: list[list[dict[str, Any]]] = [[] for _ in specs]
    conflict_examples: list[list[dict[str, Any]]] = [[] for _ in specs]
    for k, record in dedup_pass.listing.records(specs, written.classes):
        example = {key: record[key] for key in DUPLICATE_EXAMPLE_KEYS}
        if len(examples[k]) < REPORT_EXAMPLES:
            examples[k].append(example)
        if record["label_conflict"]:
            conflicts[k] += 1
            if len(conflict_examples[k]) < REPORT_EXAMPLES:
                conflict_examples[k].append(example)
    return conflicts, examples, conflict_examples


def label_conflict_warning(counts: dict[str, int]) -> str | None:
    """The report's warning for ``{source: label conflicts}`` (None without any): the count, per source, what the
    manifest did and where they are listed."""
    counts = {name: n for name, n in counts.items() if n}
    if not counts:
        return None
    per_source = ", ".join(f"{name!r}: {n}" for name, n in counts.items())
    return (
        f"{sum(counts.values())} label conflict(s): duplicate images whose kept copy has another class (per source "
        f"{per_source}); the manifest keeps the kept copy's label. Each is listed with both labels in the rejections "
        "list (reason 'duplicate', label_conflict true) and in the report (sources.<name>.label_conflict_examples)"
    )


def ingestion_report(
    specs: Sequence[SourceSpec],
    scans: Sequence[SourceScan],
    dedup: bool,
    dedup_pass: DedupPass,
    written: WritePass,
    cache_reports: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """Per source counts, totals, per-split counts, per-split label histograms and warnings (string keys: saved as
    JSON)."""
    conflicts, examples, conflict_examples = _duplicate_summary(specs, dedup_pass, written)
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
            "label_conflicts": conflicts[k],
            "rejection_reasons": scan.rejection_reasons,
            "rejected_examples": scan.rejected_examples,
            "duplicate_examples": examples[k],
            "label_conflict_examples": conflict_examples[k],
            **{key: value for key, value in scan.info.items() if key not in ("kind", "split", "found", "kept")},
            "classes": written.classes[k],
            **cache_reports[k],
        }
    counted = ("found", "kept", "rejected", "duplicates", "label_conflicts")
    totals = {key: sum(int(s[key]) for s in sources.values()) for key in counted}
    splits = {
        split: {
            "items": written.split_items[split],
            "labelled": written.split_labelled[split],
            "sources": sorted(written.split_sources[split]),
        }
        for split in SPLITS
    }
    histogram = {split: {str(k): v for k, v in sorted(written.histograms[split].items())} for split in SPLITS}
    warning = label_conflict_warning({spec.name: n for spec, n in zip(specs, conflicts, strict=True)})
    return {
        "dedup": dedup,
        "sources": sources,
        "totals": totals,
        "splits": splits,
        "label_histogram": histogram,
        "warnings": [] if warning is None else [warning],
    }
