"""Resumable training state on disk: DeepSpeed checkpoints made crash-safe.

Layout: ``<dir>/step_<n>/`` (DeepSpeed's files, one optimizer shard per rank) plus a ``.complete`` marker written once
every rank has finished, and ``<dir>/latest`` naming the newest complete tag, replaced atomically. A crash at any
point (SIGKILL, disk full) therefore leaves either the old or the new checkpoint as ``latest``, never a torn one; only
complete checkpoints are ever resumed, and older ones are removed only after a newer one is complete.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

# The one checkpoint error class lives in the lower layer (models); saving/resuming raises it too.
from eva_pipeline.fileio import replace_atomically
from eva_pipeline.models.checkpoint import CheckpointError

log = logging.getLogger(__name__)

PREFIX = "step_"
COMPLETE_MARKER = ".complete"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"{PREFIX}{step}"


def step_of(tag: str) -> int:
    return int(tag[len(PREFIX) :])


def tags(root: Path, complete_only: bool = True) -> list[str]:
    """Checkpoint tags under ``root``, oldest first."""
    found = [
        p.name
        for p in root.glob(f"{PREFIX}*")
        if p.is_dir() and p.name[len(PREFIX) :].isdigit() and (not complete_only or (p / COMPLETE_MARKER).exists())
    ]
    return sorted(found, key=step_of)


def ensure_writable(root: Path) -> None:
    """Fail before training, not at the first checkpoint an hour later, when ``root`` cannot be written."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"the checkpoint folder {root} is not writable ({exc.strerror or exc}); point the checkpoint folder (the "
            f"stage's *_checkpoints catalog entry) at a writable location"
        ) from exc


def _write_latest(root: Path, tag: str) -> None:
    replace_atomically(root / LATEST, lambda tmp: tmp.write_text(tag))


def save(engine: Any, root: Path, step: int, keep_last: int, client_state: dict) -> None:
    """Save the engine's state as ``step_<step>`` on every rank; publish it as ``latest`` once complete; prune."""
    tag = tag_for(step)
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    except OSError as exc:
        if engine.global_rank == 0:
            shutil.rmtree(root / tag, ignore_errors=True)
        latest = (root / LATEST).read_text().strip() if (root / LATEST).exists() else "none yet"
        raise CheckpointError(
            f"saving checkpoint {root / tag} failed ({exc.strerror or exc}; disk full?). The last complete checkpoint "
            f"({latest}) is intact; free space or move the checkpoint folder (the "
            f"stage's *_checkpoints catalog entry) and re-run to resume from it"
        ) from exc
    _barrier()
    if engine.global_rank == 0:
        (root / tag / COMPLETE_MARKER).write_text(str(step))
        _write_latest(root, tag)
        prune(root, keep_last, step)
    _barrier()


def prune(root: Path, keep_last: int, current_step: int) -> None:
    """Keep the ``keep_last`` newest complete checkpoints up to ``current_step`` (the one ``latest`` now names).

    Tags past ``current_step`` are stale, left by an earlier run of the same configuration that this one restarted
    (``resume: never``); incomplete tags are leftovers of a crash. Both go.
    """
    everything = tags(root, complete_only=False)
    complete = [t for t in tags(root) if step_of(t) <= current_step]
    doomed = [t for t in everything if t not in complete] + complete[:-keep_last]
    for tag in doomed:
        shutil.rmtree(root / tag, ignore_errors=True)


def resume(engine: Any, root: Path, fingerprint: str) -> int:
    """Load the newest complete checkpoint (the one ``latest`` names, else older ones); the step to continue from.

    A checkpoint that cannot be read is skipped with a warning, never deleted; if none can be read, a clear error.
    """
    return resume_state(engine, root, fingerprint)[0]


def resume_state(engine: Any, root: Path, fingerprint: str) -> tuple[int, dict[str, Any]]:
    """:func:`resume`, also returning the checkpoint's client state (e.g. the fine-tuning EMA); ``(0, {})`` when
    there is no checkpoint."""
    candidates = tags(root)
    if not candidates:
        return 0, {}
    named = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    order = ([named] if named in candidates else []) + [t for t in reversed(candidates) if t != named]
    failures = []
    for tag in order:
        try:
            path, client_state = engine.load_checkpoint(str(root), tag=tag)
        except Exception as exc:
            failures.append(f"{tag}: {type(exc).__name__}: {exc}")
            log.warning("checkpoint %s could not be loaded (%s); trying an older one", root / tag, exc)
            continue
        if path is None:
            failures.append(f"{tag}: DeepSpeed found no checkpoint files")
            continue
        if client_state.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"the checkpoint {root / tag} was written by a run with other settings; move {root} away to start over"
            )
        step = int(client_state["global_step"])
        log.info("resumed training from %s at step %d", path, step)
        return step, client_state
    raise CheckpointError(
        f"no checkpoint in {root} could be loaded ({'; '.join(failures)}). Nothing was deleted: inspect or move the "
        f"folder away to start over, or set checkpoint.resume: never in the stage's parameters"
    )


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
