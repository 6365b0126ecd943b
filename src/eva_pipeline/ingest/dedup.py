"""De-duplication of a build: which scanned items survive, decided by content hash, held-out sources first.

Every content hash goes through a sqlite table on disk (:class:`~eva_pipeline.ingest.spill.DiskSet`), so memory
does not grow with the number of images. Held-out sources (:data:`~eva_pipeline.manifest.HELD_OUT_SPLITS`: probe,
eval) claim their images first: an image present in a held-out and a training split stays held out and never
enters pre-training or fine-tuning. The result is one keep mask per source (a file of bools, one
per accepted item), read back by the write pass (:mod:`eva_pipeline.ingest.write`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eva_pipeline.ingest.scan import REPORT_EXAMPLES, SourceScan, SourceSpec
from eva_pipeline.ingest.spill import DiskSet
from eva_pipeline.manifest import HELD_OUT_SPLITS, held_out_leak_error

#: Owner codes of the seen-hash table: ``source index << CODE_SHIFT | item index``.
CODE_SHIFT = 40


@dataclass
class DedupPass:
    """What de-duplication decided: per source the keep mask file, duplicate count and examples; the leak error."""

    masks: list[Path]  # per source: one bool per accepted item (raw bytes), True = kept
    duplicates: list[int]
    examples: list[list[dict[str, str]]]
    errors: list[str]


def dedup_pass(specs: Sequence[SourceSpec], scans: Sequence[SourceScan], dedup: bool, work: Path) -> DedupPass:
    """Decide which items survive de-duplication, held-out sources first (they claim their images); every hash
    goes through a sqlite table on disk. Without ``dedup`` only the held-out hashes are stored, for the leak
    check."""
    masks = [work / f"keep-{k}.bin" for k in range(len(specs))]
    duplicates = [0] * len(specs)
    examples: list[list[dict[str, str]]] = [[] for _ in specs]
    leaked: Counter[str] = Counter()  # training split -> items whose content is held out
    seen = DiskSet(work / "hashes.sqlite")
    try:
        for k in sorted(range(len(specs)), key=lambda k: (specs[k].split not in HELD_OUT_SPLITS, k)):
            held_out = specs[k].split in HELD_OUT_SPLITS
            pos = 0
            with masks[k].open("wb") as fh:
                for batch in scans[k].iter_item_batches():
                    hashes = batch.column("hash").to_pylist()
                    n = len(hashes)
                    keep = np.ones(n, dtype=bool)
                    codes = range((k << CODE_SHIFT) + pos, (k << CODE_SHIFT) + pos + n)
                    if dedup:
                        dup = seen.claim(hashes, codes)
                        keep[dup] = False
                        duplicates[k] += int(dup.sum())
                        room = REPORT_EXAMPLES - len(examples[k])
                        for i in np.flatnonzero(dup)[: max(room, 0)].tolist():
                            owner = seen.owner(hashes[i])
                            assert owner is not None
                            item_id = f"{specs[k].name}/{pos + i}"
                            examples[k].append({"id": item_id, "duplicate_of": _code_id(specs, owner)})
                    elif held_out:
                        seen.claim(hashes, codes)  # remembered for the leak check only
                    else:
                        leaked[specs[k].split] += int(seen.contains(hashes).sum())
                    keep.tofile(fh)
                    pos += n
    finally:
        seen.close()
    message = held_out_leak_error(leaked)
    errors = [message] if message else []
    return DedupPass(masks, duplicates, examples, errors)


def _code_id(specs: Sequence[SourceSpec], code: int) -> str:
    return f"{specs[code >> CODE_SHIFT].name}/{code & ((1 << CODE_SHIFT) - 1)}"
