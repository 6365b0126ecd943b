"""Any EVA-01 image checkpoint -> a model ready for inference, without the pipeline that wrote it.

Reads this project's files (the MIM student ``eva_student.pt``, fine-tuned :class:`ClassifierCheckpoint` files),
official EVA-01 files (``{"model" | "module" | "model_ema": state_dict}``, MIM or fine-tuned) and timm ``Eva``
safetensors (mapped back to official keys). A classifier checkpoint of ours carries its architecture; for the others
every shape is read from the tensors and only the number of heads has to come from somewhere
(:func:`~eva_pipeline.models.convert.infer_config`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eva_pipeline.models.checkpoint import CheckpointError, extract_state_dict
from eva_pipeline.models.config import EvaConfig
from eva_pipeline.models.convert import (
    Kind,
    checkpoint_kind,
    infer_config,
    our_model,
    timm_metadata,
    timm_to_official,
)
from eva_pipeline.models.eva import EvaClassifier, EvaMIM
from eva_pipeline.models.finetuned import CLASSES_KEY, CONFIG_KEY, ClassifierCheckpoint
from eva_pipeline.models.video import VIDEO_KEY

SAFETENSORS_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class LoadedState:
    """A checkpoint's weights with official key names, what kind of model they are, and what the file says besides
    (``config``: the architecture when the file records it; ``classes``: the head's class names when it does)."""

    state: dict[str, torch.Tensor]
    kind: Kind
    source: str
    config: EvaConfig | None = None
    classes: list[str] | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode on the CPU, its config, the head's class names (when known) and what was read."""

    model: EvaMIM | EvaClassifier
    kind: Kind
    config: EvaConfig
    source: str
    classes: list[str] | None = None


def read_checkpoint(path: str | os.PathLike[str], *, use_ema: bool = True) -> LoadedState:
    """The weights of ``path`` with official keys: a classifier of ours, an official EVA-01 file (both: the EMA
    weights when ``use_ema`` and present), or a timm ``Eva`` ``.safetensors`` file. Every unusable file is a
    :class:`CheckpointError` naming it and saying what was expected."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            timm_state = load_file(path)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
        try:
            state = timm_to_official(timm_state)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
        args, classes = timm_metadata(path)
        config = infer_config(state, num_heads=args["num_heads"]) if "num_heads" in args else None
        return LoadedState(state, checkpoint_kind(state), "timm Eva safetensors", config, classes)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any file can be passed: torch's unpickler fails on garbage with any error type
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint of tensors ({_load_failure(err)}); expected an EVA-01 .pt/.pth file "
            "or a timm .safetensors file"
        ) from None
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a mapping of weights")
    try:
        return _from_mapping(data, use_ema)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _load_failure(err: Exception) -> str:
    """The telling part of a ``torch.load`` error: an unsupported pickled global when that is it (a file that pickles
    more than tensors), else the first sentence."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported global" in line]
    first = named[0] if named else (lines[0].split(". ")[0] if lines else "")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _from_mapping(data: Mapping[str, Any], use_ema: bool) -> LoadedState:
    if CLASSES_KEY in data and CONFIG_KEY in data:
        if data.get(VIDEO_KEY) is not None:
            raise CheckpointError("a video classifier checkpoint: these commands take image models")
        checkpoint = ClassifierCheckpoint.from_dict(data)
        ema = use_ema and checkpoint.model_ema is not None
        state = checkpoint.released if use_ema else checkpoint.model
        source = f"classifier checkpoint of this project ({'EMA' if ema else 'trained'} weights)"
        return LoadedState(dict(state), "classifier", source, checkpoint.config, checkpoint.classes)
    ema = use_ema and isinstance(data.get("model_ema"), Mapping)  # EVA's fine-tune files: the EMA is the release
    state = extract_state_dict(data, "model_ema" if ema else None)
    kind = checkpoint_kind(state)
    what = "MIM" if kind == "mim" else "fine-tuned"
    return LoadedState(state, kind, f"official EVA-01 {what} checkpoint{' (model_ema)' if ema else ''}")


def build_model(
    loaded: LoadedState,
    *,
    base: EvaConfig | None = None,
    num_heads: int | None = None,
    img_size: int | None = None,
) -> LoadedModel:
    """The model of ``loaded`` in eval mode: architecture from the file, else from the tensors (heads from
    ``num_heads`` / ``base``, see :func:`infer_config`); at ``img_size`` (pos_embed resampled bicubically) when
    given. Every tensor must load, except a MIM file's ``mask_token`` and ``lm_head``, which inference does not use."""
    config = loaded.config or infer_config(loaded.state, base=base, num_heads=num_heads)
    if img_size is not None and img_size != config.img_size:
        if img_size < config.patch_size or img_size % config.patch_size:
            raise CheckpointError(
                f"image size {img_size} is not a multiple of the checkpoint's patch size {config.patch_size}"
            )
        config = dataclasses.replace(config, img_size=img_size)
    model = our_model(loaded.state, config)
    return LoadedModel(model, loaded.kind, model.config, loaded.source, loaded.classes)


def load_model(
    path: str | os.PathLike[str],
    *,
    base: EvaConfig | None = None,
    num_heads: int | None = None,
    img_size: int | None = None,
    use_ema: bool = True,
) -> LoadedModel:
    """:func:`read_checkpoint` then :func:`build_model`; errors name ``path``."""
    loaded = read_checkpoint(path, use_ema=use_ema)
    try:
        return build_model(loaded, base=base, num_heads=num_heads, img_size=img_size)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
