"""The starting weights of a fine-tune stage (EVA-01 ``run_class_finetuning.py --finetune``): a MIM checkpoint or the
previous stage's classifier, with pos_embed resampled bicubically to the stage's grid (224 -> 336/560).

What the official loader does and what is kept: the MIM-only tensors (mask_token, final norm, lm_head) are ignored
and fc_norm starts fresh (timm's filter instead moves norm into fc_norm); a head of another size is dropped and
re-initialised (``reinit_head``). Added here: the head can be mapped by class name, keeping the trained rows of the
classes both stages share (:func:`remap_head`), and the official loader's silent ``strict=False`` is narrowed to
exactly those keys, so a checkpoint of another depth is an error instead of a half-loaded model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eva_pipeline.models import (
    CheckpointError,
    EvaClassifier,
    LoadReport,
    check_img_size,
    create_classifier,
    extract_state_dict,
    load_official_checkpoint,
)
from eva_pipeline.models.checkpoint import HEAD_KEYS, check_start_keys, listed
from eva_pipeline.models.eva import HEAD_INIT_SCALE, HEAD_INIT_STD


class HeadMappingError(CheckpointError):
    """The target classes cannot be taken from the checkpoint's head by name (the message names them)."""


@dataclass(frozen=True)
class StartReport:
    """How a stage's model was initialised: the load, what happened to the head, which classes got fresh rows."""

    load: LoadReport
    head: str  # "loaded", "mapped", "reinitialised" or "new" (the checkpoint has none)
    new_classes: list[str] = field(default_factory=list)


def _index(classes: Sequence[str], what: str) -> dict[str, int]:
    index: dict[str, int] = {}
    duplicates = []
    for i, name in enumerate(classes):
        if name in index:
            duplicates.append(name)
        index.setdefault(name, i)
    if duplicates:
        raise HeadMappingError(f"{what} classes repeat names: {listed(duplicates)}")
    return index


def remap_head(
    state: Mapping[str, torch.Tensor],
    source_classes: Sequence[str],
    target_classes: Sequence[str],
    *,
    reinit_missing: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` with its head rows reordered to ``target_classes`` by name; returns it and the classes not found.

    A target class missing from ``source_classes`` is an error naming every such class, unless ``reinit_missing``:
    its row then gets EVA's head init (trunc-normal 0.02 times 0.001, bias 0), drawn from ``generator``.
    """
    if "head.weight" not in state or "head.bias" not in state:
        raise HeadMappingError("checkpoint has no head (head.weight, head.bias) to map by class name")
    weight, bias = state["head.weight"], state["head.bias"]
    if weight.shape[0] != len(source_classes):
        raise HeadMappingError(
            f"checkpoint head has {weight.shape[0]} rows but {len(source_classes)} source class names were given"
        )
    source = _index(source_classes, "source")
    _index(target_classes, "target")
    missing = [name for name in target_classes if name not in source]
    if missing and not reinit_missing:
        raise HeadMappingError(
            f"{len(missing)} of the {len(target_classes)} target classes are not in the checkpoint's head: "
            f"{listed(missing)}; pass reinit_missing=True to give them freshly initialised rows"
        )
    new_weight = torch.empty((len(target_classes), weight.shape[1]), dtype=weight.dtype)
    new_bias = torch.zeros(len(target_classes), dtype=bias.dtype)
    fresh = torch.empty((len(missing), weight.shape[1]), dtype=torch.float32)
    torch.nn.init.trunc_normal_(fresh, std=HEAD_INIT_STD, a=-2.0, b=2.0, generator=generator)
    fresh_rows = iter(fresh.mul_(HEAD_INIT_SCALE).to(weight.dtype))
    for row, name in enumerate(target_classes):
        if name in source:
            new_weight[row], new_bias[row] = weight[source[name]], bias[source[name]]
        else:
            new_weight[row] = next(fresh_rows)
    out = dict(state)
    out["head.weight"], out["head.bias"] = new_weight, new_bias
    return out, missing


def load_finetune_start(
    model: EvaClassifier,
    checkpoint: str | os.PathLike | Mapping[str, object],
    *,
    source_classes: Sequence[str] | None = None,
    target_classes: Sequence[str] | None = None,
    reinit_missing: bool = False,
    reinit_head: bool = False,
    antialias: bool = False,
    generator: torch.Generator | None = None,
    weights_only: bool = True,
) -> StartReport:
    """Initialise ``model`` from a MIM or classifier checkpoint (file or mapping, official format).

    A checkpoint head is loaded as is when it fits; mapped by name with ``source_classes`` (its rows) and
    ``target_classes`` (the model's); dropped with ``reinit_head`` (the official choice when sizes differ). A head of
    another size without either is an error. ``antialias=False`` resamples pos_embed as the EVA code does;
    ``weights_only=False`` reads trusted files that also pickle training arguments.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(Path(checkpoint), map_location="cpu", weights_only=weights_only)
    state = extract_state_dict(checkpoint)
    head, new_classes = "new", []
    if (source_classes is None) != (target_classes is None):
        raise ValueError("give both source_classes and target_classes, or neither")
    if "head.weight" in state:
        if reinit_head:
            state, head = {k: v for k, v in state.items() if k not in HEAD_KEYS}, "reinitialised"
        elif target_classes is not None:
            if len(target_classes) != model.num_classes:
                raise HeadMappingError(
                    f"{len(target_classes)} target class names for a model with {model.num_classes} classes"
                )
            state, new_classes = remap_head(
                state, source_classes, target_classes, reinit_missing=reinit_missing, generator=generator
            )
            head = "mapped"
        elif state["head.weight"].shape[0] != model.num_classes:
            raise CheckpointError(
                f"checkpoint head has {state['head.weight'].shape[0]} classes, the model {model.num_classes}: pass "
                "source_classes and target_classes to keep the rows of shared classes by name, or reinit_head=True "
                "for a fresh head (the official code's choice)"
            )
        else:
            head = "loaded"
    elif target_classes is not None:
        raise HeadMappingError("checkpoint has no head (head.weight, head.bias) to map by class name")
    check_start_keys(model, state)
    report = load_official_checkpoint(model, state, strict=False, resample_pos_embed=True, antialias=antialias)
    return StartReport(load=report, head=head, new_classes=new_classes)


def stage_fields(overrides: Mapping[str, object]) -> dict[str, object]:
    """The student's overrides a fine-tune keeps: the stage sets its own size and drop path, and has no lm_head."""
    return {k: v for k, v in overrides.items() if k not in ("img_size", "drop_path_rate", "target_dim")}


def stage_classifier(
    model_name: str,
    overrides: Mapping[str, object],
    num_classes: int,
    img_size: int,
    *,
    drop_path_rate: float,
    freeze_patch_embed: bool = True,
    head_init_scale: float = HEAD_INIT_SCALE,
) -> EvaClassifier:
    """The student's architecture (``model_name`` + the student's ``overrides``) as a classifier of ``num_classes``
    at ``img_size``, with the stage's drop path; an image size the patch does not divide is refused by name."""
    fields = stage_fields(overrides)
    check_img_size(model_name, stage_fields(overrides), img_size)
    return create_classifier(
        model_name,
        num_classes,
        img_size=img_size,
        drop_path_rate=drop_path_rate,
        freeze_patch_embed=freeze_patch_embed,
        head_init_scale=head_init_scale,
        **fields,
    )
