"""Kedro datasets for artefacts with a format of their own, and for folders that nodes update in place.

Every artefact passed between nodes is a catalog entry (conf/base/catalog.yml); the paths live there and nowhere
else: not in parameters, not inside another artefact.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
import torch
import yaml
from kedro.io import AbstractDataset, DatasetError
from kedro_mlflow.io.metrics import MlflowMetricsHistoryDataset
from pydantic import ValidationError
from torch import nn

from eva_pipeline.config import PretrainParams
from eva_pipeline.fileio import replace_atomically
from eva_pipeline.manifest import Manifest, write_frame
from eva_pipeline.models import (
    ClassifierCheckpoint,
    extract_state_dict,
    load_classifier_checkpoint,
    save_classifier_checkpoint,
    save_official_checkpoint,
)
from eva_pipeline.targets.layout import TargetStoreError
from eva_pipeline.targets.store import TargetStore


class MlflowMetricsDataset(MlflowMetricsHistoryDataset):
    """kedro-mlflow's metrics dataset under the project's one naming scheme: ``<prefix>/<key>`` (kedro-mlflow joins
    with a dot), e.g. ``evaluation/probe_top1_pretrained``; the node's keys use ``/`` too. Values as kedro-mlflow's:
    ``{"value": v, "step": s}`` or a list of those."""

    def _build_args_list_from_metric_item(self, key: str, value: Any) -> Iterator[tuple[str, float, int]]:
        name = f"{self._prefix}/{key}" if self._prefix else key
        items = [value] if isinstance(value, dict) else value
        if not isinstance(items, list) or not items:
            raise DatasetError(f"metric {name!r}: expected {{'value': v, 'step': s}} or a list of them, got {value!r}")
        return ((name, float(item["value"]), int(item["step"])) for item in items)

    def _is_dataset_metric(self, key: str) -> bool:
        return self._prefix is None or key.startswith(f"{self._prefix}/")


class EvaCheckpointDataset(AbstractDataset[nn.Module, dict[str, torch.Tensor]]):
    """Student weights in the official EVA-01 format: ``{"model": state_dict}`` in fp16.

    ``save`` takes the module; ``load`` returns the state dict, so any loader of the official
    checkpoints (ours, timm's ``checkpoint_filter_fn``) reads what the pipeline wrote.
    """

    def __init__(self, filepath: str, dtype: str = "float16", metadata: dict[str, Any] | None = None) -> None:
        self._filepath = PurePosixPath(filepath)
        self._dtype = getattr(torch, dtype)
        self.metadata = metadata

    def load(self) -> dict[str, torch.Tensor]:
        path = Path(self._filepath)
        if not path.exists():
            raise DatasetError(f"no EVA checkpoint at {path}: run the pipeline that produces it (see README)")
        return extract_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def save(self, data: nn.Module) -> None:
        save_official_checkpoint(data, Path(self._filepath), dtype=self._dtype)

    def _exists(self) -> bool:
        return Path(self._filepath).exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "dtype": str(self._dtype)}


class ClassifierCheckpointDataset(AbstractDataset[ClassifierCheckpoint, ClassifierCheckpoint]):
    """A fine-tuned classifier: EVA-01's fine-tune format (``model``, ``model_ema``) plus its class names and
    architecture (:class:`~eva_pipeline.models.ClassifierCheckpoint`), so the next stage maps its head by name."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = PurePosixPath(filepath)
        self.metadata = metadata

    def load(self) -> ClassifierCheckpoint:
        path = Path(self._filepath)
        if not path.exists():
            raise DatasetError(f"no fine-tuned classifier at {path}: run the fine-tune stage that writes it (README)")
        return load_classifier_checkpoint(path)

    def save(self, data: ClassifierCheckpoint) -> None:
        save_classifier_checkpoint(data, Path(self._filepath))

    def _exists(self) -> bool:
        return Path(self._filepath).exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class ManifestDataset(AbstractDataset[Manifest | pd.DataFrame, Manifest]):
    """The image manifest as a Parquet file (:data:`~eva_pipeline.manifest.MANIFEST_SCHEMA`, row groups).

    ``load`` returns a lazy :class:`~eva_pipeline.manifest.Manifest` handle (path, ``num_rows``, ``split(name)``,
    ``iter_batches``, streamed ``digest``), never the whole table. ``save`` takes the handle the ingestion node
    returns (its temporary file is moved into place, or a loaded manifest's file copied) or a DataFrame.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = PurePosixPath(filepath)
        self.metadata = metadata

    def load(self) -> Manifest:
        path = Path(self._filepath)
        if not path.exists():
            raise DatasetError(
                f"no manifest at {path}: run the ingestion pipeline first (kedro run --pipelines ingestion)"
            )
        return Manifest(path)

    def save(self, data: Manifest | pd.DataFrame) -> None:
        path = Path(self._filepath)
        if isinstance(data, Manifest):
            data.save(path)
        elif isinstance(data, pd.DataFrame):
            write_frame(data, path)
        else:
            raise DatasetError(f"ManifestDataset saves a Manifest or a pandas DataFrame, got {type(data).__name__}")

    def _exists(self) -> bool:
        return Path(self._filepath).exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


# ------------------------------------------------------------------------------------------------ folders in place
class FolderDataset(AbstractDataset[None, Path]):
    """A folder that the node loading it updates in place: ``load`` gives its path, never its content.

    For state that is resumed or reused where it lies: the ingestion scan cache (``ingestion_scan_cache``), the
    training checkpoints (``pretrain_checkpoints``), the teacher-target store being computed
    (``teacher_targets_store``). Copying such a folder in through ``load`` and out through ``save`` would defeat
    resuming, and Kedro forbids one dataset as both input and output of a node, so the node takes the folder as an
    input and writes into it. The catalog entry is the one place its path is configured (a DVC ``persist: true``
    out); ``save`` is refused. The folder need not exist yet: the node creates it.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = PurePosixPath(filepath)
        self.metadata = metadata

    def load(self) -> Path:
        return Path(self._filepath)

    def save(self, data: None) -> None:
        raise DatasetError(
            f"{type(self).__name__} ({self._filepath}) is written in place by the node that loads it; it is never saved"
        )

    def _exists(self) -> bool:
        return Path(self._filepath).is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class JsonLinesDataset(AbstractDataset[Path | Iterable[Mapping[str, Any]], list[dict[str, Any]]]):
    """One JSON object per line (the ingestion's ``ingestion_rejections``: one line per rejected item).

    ``save`` takes the finished file as a :class:`~pathlib.Path` (moved into place: a node writes a listing that grows
    with the data set to a temporary file, so its memory stays flat) or an iterable of mappings (written line by
    line). ``load`` returns the records as a list of dicts.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = PurePosixPath(filepath)
        self.metadata = metadata

    def load(self) -> list[dict[str, Any]]:
        path = Path(self._filepath)
        if not path.exists():
            raise DatasetError(f"no JSON lines file at {path}: run the pipeline that writes it (see README)")
        with path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def save(self, data: Path | Iterable[Mapping[str, Any]]) -> None:
        if isinstance(data, Path):
            if not data.is_file():
                raise DatasetError(f"JsonLinesDataset: the file to save, {data}, does not exist")
            replace_atomically(Path(self._filepath), lambda tmp: shutil.move(data, tmp))
        elif isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
            raise DatasetError(
                f"JsonLinesDataset saves a Path of a finished file or an iterable of mappings, got "
                f"{type(data).__name__}"
            )
        else:

            def write(tmp: Path) -> None:
                with tmp.open("w", encoding="utf-8") as fh:
                    for record in data:
                        fh.write(json.dumps(dict(record), ensure_ascii=False) + "\n")

            replace_atomically(Path(self._filepath), write)

    def _exists(self) -> bool:
        return Path(self._filepath).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


# ------------------------------------------------------------------------------------------------ teacher targets
#: Sub-folder of a teacher-target store holding the validation set's targets (a store of its own).
VALIDATION_STORE = "validation"
#: The receipt of a teacher_targets run, written into its store folder by :class:`TeacherTargetsDataset`.
RECEIPT_FILE = "receipt.json"
_RECEIPT_FIELDS = (
    "mode", "teacher", "num_items", "grid", "img_size", "manifest_digest", "views_per_image", "target_dim",
)  # fmt: skip


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's targets as the ``teacher_targets`` dataset loads them: the receipt of the run that made them
    (what they are of, made how) and where they are.

    ``mode`` ``cached``: the store at ``root`` holds them (:meth:`reader`; distributed ranks open ``store_root``
    themselves); ``online``: the training runs the teacher (``teacher``) in every step, nothing is stored but the
    validation set. ``validation`` (``split``, ``num_images``, ``fingerprint``), when set: the held-out images'
    targets, in the store at ``validation_root``. ``fingerprint``: what the cached store was computed for; a store
    recomputed for other inputs since no longer matches it, and :meth:`reader` refuses it.
    """

    root: Path
    mode: str
    teacher: dict[str, Any]
    num_items: int
    grid: tuple[int, int]
    img_size: int
    manifest_digest: str
    views_per_image: int
    target_dim: int
    fingerprint: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None

    @classmethod
    def from_receipt(cls, root: str | os.PathLike[str], receipt: Mapping[str, Any]) -> TeacherTargets:
        missing = [k for k in _RECEIPT_FIELDS if k not in receipt]
        if missing:
            raise ValueError(f"a teacher_targets receipt needs {list(_RECEIPT_FIELDS)}; missing {missing}")
        if receipt["mode"] == "cached" and not receipt.get("fingerprint"):
            raise ValueError("a receipt of cached targets needs the store's fingerprint")
        validation = receipt.get("validation")
        if validation is not None and not {"split", "num_images", "fingerprint"} <= set(validation):
            raise ValueError(f"the receipt's validation needs split, num_images and fingerprint; got {validation}")
        return cls(
            root=Path(root),
            mode=str(receipt["mode"]),
            teacher=dict(receipt["teacher"]),
            num_items=int(receipt["num_items"]),
            grid=(int(receipt["grid"][0]), int(receipt["grid"][1])),
            img_size=int(receipt["img_size"]),
            manifest_digest=str(receipt["manifest_digest"]),
            views_per_image=int(receipt["views_per_image"]),
            target_dim=int(receipt["target_dim"]),
            fingerprint=None if receipt.get("fingerprint") is None else dict(receipt["fingerprint"]),
            validation=None if validation is None else dict(validation),
        )

    def receipt(self) -> dict[str, Any]:
        """The JSON form (no paths: the store is where the receipt lies)."""
        out = {
            "mode": self.mode,
            "teacher": self.teacher,
            "num_items": self.num_items,
            "grid": list(self.grid),
            "img_size": self.img_size,
            "manifest_digest": self.manifest_digest,
            "views_per_image": self.views_per_image,
            "target_dim": self.target_dim,
            "validation": self.validation,
        }
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint
        return out

    @property
    def cached(self) -> bool:
        return self.mode == "cached"

    @property
    def store_root(self) -> Path | None:
        """The folder of the stored targets (cached mode), for processes that open the store themselves."""
        return self.root if self.cached else None

    @property
    def validation_root(self) -> Path | None:
        """The folder of the validation set's targets; None without a validation set."""
        return None if self.validation is None else self.root / VALIDATION_STORE

    def reader(self) -> Any:
        """A lazy reader of the stored targets (:class:`~eva_pipeline.targets.store.TargetStore.reader`), checked
        against the receipt's fingerprint; TargetStoreError when the store was changed or damaged since."""
        if not self.cached:
            raise TargetStoreError(f"the teacher targets at {self.root} are computed online: no stored targets to read")
        return TargetStore(self.root).reader(self.fingerprint)


class TeacherTargetsDataset(AbstractDataset[Mapping[str, Any] | TeacherTargets, TeacherTargets]):
    """The teacher targets (``teacher_targets``): a target-store folder and the receipt of the run that filled it.

    Two catalog entries name the same folder (the catalog's ``_teacher_targets`` variable): this one, which the
    teacher_targets node *outputs*, and ``teacher_targets_store`` (a :class:`FolderDataset`), which the node takes
    as *input* to write the shards into. The store is resumable, so it is written in place and cannot pass through
    ``save``; Kedro forbids one dataset as both input and output of a node; so the writable handle and the finished
    result are two datasets, and the downstream nodes depend on the result.

    ``save`` takes the receipt (a mapping, or a :class:`TeacherTargets`) and writes it into the folder as
    ``receipt.json`` (atomically), after checking that the stores it describes are complete: in ``cached`` mode
    every shard of its ``fingerprint``, and with a validation set the ``validation/`` store of its own fingerprint.
    An incomplete store is refused, so no receipt ever describes targets that are not there. ``load`` returns a
    :class:`TeacherTargets` (the receipt's fields, ``reader()``, ``store_root``, ``validation_root``); no receipt
    is a clear error naming the pipeline to run.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = PurePosixPath(filepath)
        self.metadata = metadata

    @property
    def _root(self) -> Path:
        return Path(self._filepath)

    def load(self) -> TeacherTargets:
        path = self._root / RECEIPT_FILE
        if not path.exists():
            raise DatasetError(
                f"no teacher targets at {self._root} ({RECEIPT_FILE} missing): run the teacher_targets pipeline "
                "(kedro run --pipelines teacher_targets)"
            )
        try:
            return TeacherTargets.from_receipt(self._root, json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError) as exc:
            raise DatasetError(
                f"unreadable teacher_targets receipt {path} ({exc}): re-run the teacher_targets pipeline"
            ) from None

    def save(self, data: Mapping[str, Any] | TeacherTargets) -> None:
        receipt = data.receipt() if isinstance(data, TeacherTargets) else dict(data)
        try:
            targets = TeacherTargets.from_receipt(self._root, receipt)
        except (ValueError, TypeError, KeyError) as exc:
            raise DatasetError(f"not a teacher_targets receipt: {exc}") from None
        problems = []
        if targets.cached and not TargetStore(self._root).is_complete(targets.fingerprint):
            problems.append(f"the target store {self._root} is not complete for the receipt's fingerprint")
        if targets.validation is not None:
            validation = TargetStore(self._root / VALIDATION_STORE)
            if not validation.is_complete(targets.validation["fingerprint"]):
                problems.append(f"the validation store {validation.root} is not complete for its fingerprint")
        if problems:
            raise DatasetError(f"refusing to save the teacher_targets receipt: {'; '.join(problems)}")
        text = json.dumps(targets.receipt(), indent=2, sort_keys=True)
        replace_atomically(self._root / RECEIPT_FILE, lambda tmp: tmp.write_text(text))

    def _exists(self) -> bool:
        return (self._root / RECEIPT_FILE).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "receipt": RECEIPT_FILE}


# ------------------------------------------------------------------------------------------------ student config
class StudentConfigDataset(AbstractDataset[PretrainParams | Mapping[str, Any], PretrainParams]):
    """The resolved student configuration (``student_config``): the ``pretrain`` block, validated and with every
    default filled in, as YAML (``pretrain: {...}``, readable and an MLflow artifact of the run).

    The one place downstream nodes (teacher_targets, train_student, evaluation) read the student's settings from:
    ``load`` validates the file into :class:`~eva_pipeline.config.PretrainParams` again, so a file written by other
    code (a field since removed or renamed) is a clear error naming the pipeline that rewrites it. ``save`` takes
    the validated block (or a mapping, validated first).
    """

    KEY = "pretrain"

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = PurePosixPath(filepath)
        self.metadata = metadata

    def load(self) -> PretrainParams:
        path = Path(self._filepath)
        if not path.exists():
            raise DatasetError(
                f"no student config at {path}: run the student_config pipeline (kedro run --pipelines student_config)"
            )
        document = yaml.safe_load(path.read_text())
        if not isinstance(document, dict) or self.KEY not in document:
            raise DatasetError(f"{path} is not a student config (no top-level '{self.KEY}' block)")
        try:
            return PretrainParams.model_validate(document[self.KEY])
        except ValidationError as exc:
            raise DatasetError(
                f"the student config {path} does not fit this code's pretrain parameters; re-run the student_config "
                f"pipeline (kedro run --pipelines student_config):\n{exc}"
            ) from None

    def save(self, data: PretrainParams | Mapping[str, Any]) -> None:
        try:
            params = data if isinstance(data, PretrainParams) else PretrainParams.model_validate(data)
        except ValidationError as exc:
            raise DatasetError(f"not a valid pretrain block:\n{exc}") from None
        text = yaml.safe_dump({self.KEY: params.model_dump(mode="json")}, sort_keys=False)
        replace_atomically(Path(self._filepath), lambda tmp: tmp.write_text(text))

    def _exists(self) -> bool:
        return Path(self._filepath).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
