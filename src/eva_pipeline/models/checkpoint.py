"""Official EVA-01 checkpoint format: ``{"model": state_dict}`` in fp16, readable by timm and the EVA code."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from eva_pipeline.fileio import replace_atomically

# Top-level keys under which EVA / BEiT / DeepSpeed files keep the weights, in the order they are tried.
STATE_DICT_KEYS: tuple[str, ...] = ("model", "module", "model_ema")
_WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
# Number of tokens in front of the patch tokens in pos_embed (cls).
_NUM_PREFIX_TOKENS = 1

#: The classifier head's tensors.
HEAD_KEYS: tuple[str, str] = ("head.weight", "head.bias")
#: Checkpoint tensors a classifier has no use for (pre-training only), ignored as the official loader does.
MIM_ONLY_KEYS: frozenset[str] = frozenset({"mask_token", "norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias"})
#: Classifier tensors a MIM checkpoint (or a dropped head) does not provide: they keep the model's fresh init.
FRESH_KEYS: frozenset[str] = frozenset({"fc_norm.weight", "fc_norm.bias", *HEAD_KEYS})
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_LISTED = 10


def listed(items: Sequence[object]) -> str:
    """The first few items of a list for an error message, and how many more there are."""
    shown = ", ".join(repr(x) for x in items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def block_count(keys: Iterable[str]) -> int:
    """The number of ``blocks.<i>.`` of a state dict's keys (its depth)."""
    return 1 + max((int(m.group(1)) for k in keys if (m := _BLOCK_RE.match(k))), default=-1)


def check_start_keys(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse a start checkpoint with any missing or unexpected key besides :data:`FRESH_KEYS` and
    :data:`MIM_ONLY_KEYS` (the official loader's ``strict=False`` narrowed to them), before anything is loaded."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - FRESH_KEYS)
    unexpected = sorted(set(state) - set(expected) - MIM_ONLY_KEYS)
    if not missing and not unexpected:
        return
    lines = [f"checkpoint does not fit {type(model).__name__} (a checkpoint of another model size?)"]
    if block_count(state) != block_count(expected):
        lines.append(f"  checkpoint has {block_count(state)} blocks, the model {block_count(expected)}")
    if missing:
        lines.append(f"  missing from checkpoint: {listed(missing)}")
    if unexpected:
        lines.append(f"  unexpected in checkpoint: {listed(unexpected)}")
    raise CheckpointError("\n".join(lines))


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint that cannot be used: an official file that does not fit the model (the message lists every
    offending key), or training state that cannot be saved or resumed (``eva_pipeline.training.checkpointing``: the
    message says which files and what state is intact).

    Both bases: loading an official checkpoint raised ``ValueError`` and training checkpointing ``RuntimeError``
    before the two were one class, so handlers written for either keep working.
    """


@dataclass(frozen=True)
class LoadReport:
    """What a non-strict load skipped, and which tensors were resampled."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    resampled_keys: list[str] = field(default_factory=list)


def save_official_checkpoint(
    model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = torch.float16
) -> Path:
    """Write ``{"model": state_dict}`` with floating tensors in ``dtype`` (fp16 like the release; None keeps them).

    Written to a temporary file in the same folder and renamed, so a crash never leaves a truncated checkpoint.
    """
    state = {
        k: v.detach().to(device="cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
        for k, v in model.state_dict().items()
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save({"model": state}, f)
            f.flush()
            os.fsync(f.fileno())

    return replace_atomically(path, write)


def extract_state_dict(checkpoint: Mapping[str, object], key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: under ``key``, else the first of ``model``/``module``/``model_ema``, else
    the mapping itself when it holds only tensors. DDP/compile key prefixes are stripped."""
    if key is not None:
        if key not in checkpoint:
            raise CheckpointError(f"checkpoint has no key {key!r}; top-level keys: {sorted(checkpoint)}")
        state = checkpoint[key]
    else:
        state = next((checkpoint[k] for k in STATE_DICT_KEYS if isinstance(checkpoint.get(k), Mapping)), checkpoint)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"no state dict found: expected one of the keys {STATE_DICT_KEYS} or a mapping of tensors; "
            f"top-level keys: {sorted(checkpoint)}"
        )
    out = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def _shape(t: torch.Tensor | torch.Size) -> tuple[int, ...]:
    return tuple(t.shape if isinstance(t, torch.Tensor) else t)


def _resample_problem(value: torch.Tensor, target: torch.Size) -> str | None:
    """Why a checkpoint pos_embed cannot be resampled to ``target``'s grid, or None when it can."""
    if value.ndim != 3 or value.shape[2] != target[2]:
        return "its width differs (a checkpoint of another model size?)"
    old_tokens = value.shape[1] - _NUM_PREFIX_TOKENS
    if old_tokens <= 0 or math.isqrt(old_tokens) ** 2 != old_tokens:
        return "it is not 1 + a square grid of tokens"
    return None


def resample_image_pos_embed(value: torch.Tensor, grid: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """A (1, 1 + g * g, D) pos_embed resized bicubically to ``grid`` (cls kept), as the EVA fine-tune code does
    (``antialias=False``: plain ``F.interpolate``)."""
    old_side = math.isqrt(value.shape[1] - _NUM_PREFIX_TOKENS)
    return resample_abs_pos_embed(
        value,
        new_size=list(grid),
        old_size=[old_side, old_side],
        num_prefix_tokens=_NUM_PREFIX_TOKENS,
        interpolation="bicubic",
        antialias=antialias,
    )


def load_official_checkpoint(
    model: nn.Module,
    path_or_state: str | os.PathLike | Mapping[str, object],
    strict: bool = True,
    *,
    resample_pos_embed: bool = False,
    antialias: bool = False,
    key: str | None = None,
    weights_only: bool = True,
) -> LoadReport:
    """Load an official-format checkpoint (file or already loaded mapping) into ``model``.

    Tensors are cast to the dtype of the parameter they fill. Missing/unexpected keys (when ``strict``) and shape
    mismatches (always) raise one :class:`CheckpointError` that lists every offending key with expected vs got shapes.
    With ``resample_pos_embed`` a pos_embed from another grid is resized bicubically (224 -> 336 fine-tune);
    ``antialias=False`` matches the EVA code's plain ``F.interpolate``. ``weights_only=False`` is needed for trusted
    files that also pickle training arguments.
    """
    if isinstance(path_or_state, Mapping):
        checkpoint = path_or_state
    else:
        checkpoint = torch.load(Path(path_or_state), map_location="cpu", weights_only=weights_only)
    state = extract_state_dict(checkpoint, key)
    expected = model.state_dict()

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched: list[str] = []
    resampled: list[str] = []
    pos_hint = " (pass resample_pos_embed=True to resize pos_embed)"
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name not in expected:
            continue
        target = expected[name]
        if value.is_floating_point():  # cast first, so a resample of fp16 weights is not rounded to fp16 again
            value = value.to(dtype=target.dtype)
        if value.shape != target.shape:
            if name != "pos_embed" or not resample_pos_embed:
                mismatched.append(name)
                continue
            problem = _resample_problem(value, target.shape)
            if problem is not None:  # listed with every other mismatch rather than raised alone
                pos_hint = f" (pos_embed not resampled: {problem})"
                mismatched.append(name)
                continue
            value = resample_image_pos_embed(value, tuple(model.patch_embed.grid_size), antialias)
            resampled.append(name)
        out[name] = value

    problems: list[str] = []
    if mismatched:
        problems.append(f"shape mismatch{pos_hint if 'pos_embed' in mismatched else ''}:")
        problems += [f"  {k}: expected {_shape(expected[k])}, got {_shape(state[k])}" for k in mismatched]
    if strict and missing:
        problems.append("missing from checkpoint:")
        problems += [f"  {k}: expected {_shape(expected[k])}" for k in missing]
    if strict and unexpected:
        problems.append("unexpected in checkpoint:")
        problems += [f"  {k}: got {_shape(state[k])}" for k in unexpected]
    if problems:
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}:\n" + "\n".join(problems))

    model.load_state_dict(out, strict=strict)
    return LoadReport(missing_keys=missing, unexpected_keys=unexpected, resampled_keys=resampled)
