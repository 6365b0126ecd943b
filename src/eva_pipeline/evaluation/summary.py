"""What a finished run prints: its result tables (the probe, and the fine-tuning tables when those stages ran) and
where its plots are, so that a user never has to go looking for the JSON to learn how the run went."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

#: Rows of the probe table: (label, key of ``probe_metrics.json``).
PROBE_ROWS: tuple[tuple[str, str], ...] = (
    ("EVA student (pre-trained)", "probe_top1_pretrained"),
    ("teacher", "probe_top1_teacher"),
    ("random init (same architecture)", "probe_top1_random"),
    ("raw pixels", "probe_top1_raw_pixels"),
    ("chance", "probe_chance"),
)
#: Files a run writes that are worth opening, by suffix.
FIGURE_SUFFIXES: tuple[str, ...] = (".png", ".svg", ".pdf")


def probe_markdown(metrics: Mapping[str, float]) -> str:
    """The linear-probe metrics as a markdown table, top-1 in %, the rows that the metrics have."""
    lines = ["| features | probe top-1 |", "|---|---|"]
    lines += [f"| {label} | {100 * float(metrics[key]):.1f} |" for label, key in PROBE_ROWS if key in metrics]
    return "\n".join(lines) + "\n"


def files_written_since(
    root: str | os.PathLike[str], since: float, suffixes: Iterable[str] = FIGURE_SUFFIXES
) -> list[Path]:
    """Files under ``root`` with one of ``suffixes``, modified at or after ``since`` (``time.time()``), sorted."""
    root, suffixes = Path(root), tuple(suffixes)
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.suffix in suffixes and p.is_file() and p.stat().st_mtime >= since)


def run_summary(tables: Mapping[str, str], figures: Iterable[Path], relative_to: Path | None = None) -> str:
    """``{title: markdown table}`` and the figure paths -> the text printed at the end of a run ("" when empty)."""
    figures = [p.relative_to(relative_to) if relative_to and p.is_relative_to(relative_to) else p for p in figures]
    parts = [f"## {title}\n\n{table.rstrip()}\n" for title, table in tables.items()]
    if figures:
        parts.append("## Plots written by this run\n\n" + "\n".join(f"- {p}" for p in figures) + "\n")
    return "\n".join(parts)
