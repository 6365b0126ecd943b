"""A fine-tuned classifier on disk: EVA-01's fine-tune format (``model`` and ``model_ema``, as
``run_class_finetuning.py`` saves them; the released IN-1K weights are the EMA) plus the class names of the head's
rows and the architecture, so that the next stage maps the head by class name and evaluation rebuilds the model
without any other input. timm and the EVA code read the ``model``/``model_ema`` keys and ignore the others.

A video classifier's checkpoint is the same plus ``video`` = {num_frames, tubelet}; an image one has no such key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eva_pipeline.fileio import replace_atomically
from eva_pipeline.models.checkpoint import CheckpointError, extract_state_dict
from eva_pipeline.models.config import EvaConfig
from eva_pipeline.models.eva import EvaClassifier
from eva_pipeline.models.video import VIDEO_FIELDS, VIDEO_KEY, EvaVideoClassifier, check_video_fields

CLASSES_KEY = "classes"
CONFIG_KEY = "eva_config"


def _cpu_state(module: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().to(device="cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
        for k, v in module.state_dict().items()
    }


@dataclass(frozen=True)
class ClassifierCheckpoint:
    """What a fine-tune stage hands on: weights (and their EMA), the classes of the head's rows, the architecture
    (``video``: num_frames and tubelet of a space-time classifier, None for an image one)."""

    model: dict[str, torch.Tensor]
    classes: list[str]
    config: EvaConfig
    model_ema: dict[str, torch.Tensor] | None = None
    video: dict[str, int] | None = None

    def __post_init__(self) -> None:
        rows = self.model.get("head.weight")
        if rows is None or rows.shape[0] != len(self.classes):
            found = "no head" if rows is None else f"a head of {rows.shape[0]} rows"
            raise CheckpointError(f"classifier checkpoint has {found} for {len(self.classes)} class names")
        if self.video is not None:
            if set(self.video) != set(VIDEO_FIELDS):
                raise CheckpointError(f"video entry must have exactly {list(VIDEO_FIELDS)}, got {sorted(self.video)}")
            try:
                check_video_fields(self.video["num_frames"], self.video["tubelet"])
            except ValueError as err:
                raise CheckpointError(f"video entry {self.video}: {err}") from None
        kernel = self.model.get("patch_embed.proj.weight")
        want = 4 if self.video is None else 5
        if kernel is not None and kernel.ndim != want:
            kind = "an image (no video entry)" if self.video is None else f"a video ({self.video})"
            raise CheckpointError(
                f"checkpoint is {kind} classifier but its patch_embed.proj.weight has shape {tuple(kernel.shape)}"
            )

    @property
    def released(self) -> dict[str, torch.Tensor]:
        """The weights a user gets: the EMA when there is one (as EVA releases), else the trained weights."""
        return self.model_ema if self.model_ema is not None else self.model

    def classifier(self, use_ema: bool = True) -> EvaClassifier:
        """The classifier rebuilt in eval mode, with the EMA weights when ``use_ema`` and present; an
        :class:`EvaVideoClassifier` when ``video`` is set."""
        if self.video is not None:
            model: EvaClassifier = EvaVideoClassifier(self.config, len(self.classes), **self.video, initialise=False)
        else:
            model = EvaClassifier(self.config, len(self.classes), initialise=False)
        model.load_state_dict(self.released if use_ema else self.model, strict=True)
        return model.eval()

    @classmethod
    def from_modules(
        cls,
        model: EvaClassifier,
        classes: Sequence[str],
        ema: nn.Module | None = None,
        dtype: torch.dtype | None = None,
    ) -> ClassifierCheckpoint:
        """Snapshot a trained classifier (and its EMA copy) on the CPU, floating tensors in ``dtype`` (None: kept)."""
        return cls(
            model=_cpu_state(model, dtype),
            classes=list(classes),
            config=model.config,
            model_ema=None if ema is None else _cpu_state(ema, dtype),
            video=model.video if isinstance(model, EvaVideoClassifier) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            CLASSES_KEY: self.classes,
            CONFIG_KEY: dataclasses.asdict(self.config),
        }
        if self.model_ema is not None:
            out["model_ema"] = self.model_ema
        if self.video is not None:
            out[VIDEO_KEY] = dict(self.video)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassifierCheckpoint:
        missing = [k for k in ("model", CLASSES_KEY, CONFIG_KEY) if k not in data]
        if missing:
            raise CheckpointError(
                f"not a classifier checkpoint written by this project: no {missing} (keys: {sorted(data)}); an "
                "official EVA fine-tune file carries no class names: start a stage from it with load_finetune_start"
            )
        ema = data.get("model_ema")
        video = data.get(VIDEO_KEY)
        return cls(
            model=extract_state_dict(data, "model"),
            classes=[str(c) for c in data[CLASSES_KEY]],
            config=EvaConfig(**data[CONFIG_KEY]),
            model_ema=None if ema is None else extract_state_dict(data, "model_ema"),
            video=None if video is None else dict(video),
        )


def save_torch_atomically(data: Any, path: str | os.PathLike) -> Path:
    """``torch.save(data)`` into a temporary file beside ``path``, flushed to disk, then renamed over ``path``."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())

    return replace_atomically(path, write)


def save_classifier_checkpoint(checkpoint: ClassifierCheckpoint, path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` atomically (temporary file beside ``path``, then renamed)."""
    return save_torch_atomically(checkpoint.to_dict(), path)


def load_classifier_checkpoint(path: str | os.PathLike) -> ClassifierCheckpoint:
    """Read a file written by :func:`save_classifier_checkpoint` (tensors and plain data only: ``weights_only``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no classifier checkpoint at {path}: run the fine-tune stage that writes it")
    return ClassifierCheckpoint.from_dict(torch.load(path, map_location="cpu", weights_only=True))
