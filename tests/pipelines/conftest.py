"""Shared fixtures of the pipeline tests: a tiny configuration, a catalog under tmp, a throw-away Kedro project.

Tiny run: 256 pre-training / 200 probe images of the embedded Fashion-MNIST subset (and 60 fine-tuning Animal-MNIST /
40 evaluation Fashion-MNIST images, which no stage of pre-training reads), teacher batch 32, 5 training steps of
batch 32. Everything the pipelines write goes under pytest's tmp folders; the repository's data/ and
mlflow.db are never touched (MLFLOW_TRACKING_URI points into tmp too, in case anything logs without a run).

Fixtures rather than a helper module: under pytest's importlib import mode, test modules cannot import siblings.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from eva_pipeline.config import PARAMETER_BLOCKS
from eva_pipeline.pipeline_registry import STAGES

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_BASE = PROJECT_ROOT / "conf" / "base"
RAW = PROJECT_ROOT / "data" / "01_raw" / "fashion_mnist"
PIPELINES = STAGES
#: The parameter files of conf/base, one block each (parameters_<block>.yml).
PARAMETER_FILES = tuple(PARAMETER_BLOCKS)
PRETRAIN_IMAGES, PROBE_IMAGES, BATCH, STEPS = 256, 200, 32, 5
FINETUNE_IMAGES, EVAL_IMAGES = 60, 40  # limits of the animal_mnist and fashion_mnist_fresh sources
VALIDATION_IMAGES = 40  # of the probe images: the held-out MIM loss


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def read_catalog(path: Path = CONF_BASE / "catalog.yml") -> dict[str, dict]:
    """A catalog file as Kedro's config loader reads it: ``${_var}`` interpolated, ``_`` templating keys dropped."""
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return {name: entry for name, entry in resolved.items() if not name.startswith("_")}


def base_params() -> dict[str, dict]:
    """The parameter blocks as conf/base has them (plain dicts)."""
    out: dict[str, dict] = {}
    for name in PARAMETER_FILES:
        out.update(_read_yaml(CONF_BASE / f"parameters_{name}.yml"))
    return out


def tiny_params(workdir: Path) -> dict[str, dict]:
    """conf/base scaled down for tests; raw paths absolute (outputs go where the catalog says: catalog_config)."""
    params = base_params()
    limits = (PRETRAIN_IMAGES, PROBE_IMAGES, FINETUNE_IMAGES, EVAL_IMAGES)
    for source, limit in zip(params["ingestion"]["sources"], limits, strict=True):
        source["limit"] = limit
        for key in ("images", "labels"):
            source[key] = str(PROJECT_ROOT / source[key])
    params["teacher_targets"].update(batch_size=BATCH)
    params["teacher_targets"]["validation"]["num_images"] = VALIDATION_IMAGES
    params["pretrain"].update(batch_size=BATCH, max_steps=STEPS, log_every_steps=1, mask_examples=4)
    # Fine-tuning: 4 images per class (20 classes, then 10), one short epoch each; a few images per evaluation set.
    params["finetune_intermediate"].update(epochs=1, batch_size=16, log_every_steps=1)
    params["finetune_intermediate"]["data"]["per_class"] = 4
    params["finetune"].update(epochs=1, batch_size=8, log_every_steps=1)
    params["finetune"]["data"]["per_class"] = 4
    params["finetune"]["validation"].update(num_images=20, batch_size=10)
    params["classification_eval"].update(max_images=20, batch_size=10)
    _tiny_video(params, workdir)
    return params


def _tiny_video(params: dict[str, dict], workdir: Path) -> None:
    """Video: 3 training and 2 validation clips per class of 8 frames, generated under ``workdir``; 4 then 8 frames
    (tubelets of 2) at 12 px, one short epoch per stage, 2 temporal clips x 3 crops of 6 clips per version."""
    video = params["video_ingestion"]
    synthetic = video["synthetic"]
    out_dir = workdir / synthetic["out_dir"]
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        synthetic[key] = str(PROJECT_ROOT / synthetic[key])
    synthetic.update(out_dir=str(out_dir), frames=8, train_per_class=3, validate_per_class=2)
    for version in video["versions"]:
        for key in ("annotations", "clips"):
            version[key] = str(workdir / version[key])
    video.update(min_frames=8)
    params["finetune_video_intermediate"].update(num_frames=4, img_size=12, epochs=1, batch_size=16, log_every_steps=1)
    params["finetune_video_intermediate"]["validation"].update(num_clips=12, batch_size=12)
    params["finetune_video"].update(num_frames=8, img_size=12, epochs=1, batch_size=8, log_every_steps=1)
    params["video_eval"].update(num_clips=2, max_clips=6, batch_size=3)


def typed_params(params: dict[str, dict]) -> dict[str, Any]:
    """``params:<block>`` -> the validated pydantic object, as a KedroSession puts it into the catalog."""
    from eva_pipeline.config import PARAMETER_BLOCKS as models

    return {f"params:{name}": models[name].model_validate(value) for name, value in params.items()}


def catalog_config(workdir: Path) -> dict[str, dict]:
    """conf/base/catalog.yml with every filepath under ``workdir``; MLflow wrappers replaced by what they wrap."""
    conf = copy.deepcopy(read_catalog())
    for name, entry in list(conf.items()):
        if entry["type"].endswith("MlflowArtifactDataset"):
            entry = conf[name] = entry["dataset"]
        elif entry["type"].startswith("kedro_mlflow.") or entry["type"].endswith(".MlflowMetricsDataset"):
            conf[name] = {"type": "kedro.io.MemoryDataset"}
            continue
        for key in ("filepath", "path"):  # path: a PartitionedDataset's folder
            if key in entry:
                entry[key] = str(workdir / entry[key])
    return conf


def make_catalog(workdir: Path, params: dict[str, dict]):
    from kedro.io import DataCatalog

    catalog = DataCatalog.from_config(catalog_config(workdir))
    for name, value in typed_params(params).items():
        catalog[name] = value
    return catalog


def run_pipeline(name: str, catalog) -> dict:
    """One registered stage on ``catalog`` with Kedro's SequentialRunner (no hooks: the slice alone)."""
    import importlib

    from kedro.runner import SequentialRunner

    stage = importlib.import_module(f"eva_pipeline.pipelines.{name}")
    return SequentialRunner().run(stage.create_pipeline(), catalog)


@pytest.fixture(scope="session", autouse=True)
def _isolated_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Stray MLflow calls (no run opened by kedro-mlflow) must not create ./mlflow.db or ./mlruns in the repo."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('stray_mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        mlflow.set_tracking_uri(uri)
        yield
        mlflow.set_tracking_uri(previous)


# ------------------------------------------------------------------------------------------------ stage chain
class Workspace:
    """One tmp folder, its catalog and the tiny params; stages run lazily, each once per test session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.params = tiny_params(root)
        self.catalog = make_catalog(root, self.params)
        self.outputs: dict[str, dict] = {}

    def path(self, dataset: str) -> Path:
        entry = catalog_config(self.root)[dataset]
        return Path(entry.get("filepath") or entry["path"])

    def run(self, stage: str) -> dict:
        if stage not in self.outputs:
            for upstream in PIPELINES[: PIPELINES.index(stage)]:
                self.run(upstream)
            self.outputs[stage] = run_pipeline(stage, self.catalog)
        return self.outputs[stage]

    def run_again(self, stage: str) -> dict:
        self.run(stage)
        return run_pipeline(stage, self.catalog)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("pipelines"))


# ------------------------------------------------------------------------------------------------ Kedro project
def write_project(root: Path, env: str = "test", extra_params: dict | None = None) -> Path:
    """A Kedro project in ``root`` with this repo's conf/base and an env ``env`` holding the tiny config.

    The package is the installed ``eva_pipeline`` (``src/`` is an empty folder so bootstrapping accepts the layout).
    Parameters with relative paths resolve against the working directory: run with ``cwd=root``.
    """
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT_ROOT / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(CONF_BASE, root / "conf" / "base")
    (root / "conf" / "local").mkdir()
    (root / "src").mkdir()
    env_dir = root / "conf" / env
    env_dir.mkdir()
    params = tiny_params(root / "data")
    del params["evaluation"]
    for block, values in (extra_params or {}).items():
        params.setdefault(block, {}).update(values)
    (env_dir / "parameters.yml").write_text(yaml.safe_dump(params, sort_keys=False))
    mlflow_conf = _read_yaml(CONF_BASE / "mlflow.yml")
    mlflow_conf["server"]["mlflow_tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    (env_dir / "mlflow.yml").write_text(yaml.safe_dump(mlflow_conf, sort_keys=False))
    return root


@contextlib.contextmanager
def project_context(root: Path, **kwargs: Any) -> Iterator[Path]:
    """Write a test project in ``root``, chdir into it and bootstrap it; undone on exit."""
    import mlflow
    from kedro.framework.startup import bootstrap_project

    write_project(root, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.syspath_prepend(str(root / "src"))  # what bootstrap_project adds, restored on exit
        bootstrap_project(root)
        try:
            yield root
        finally:
            while mlflow.active_run() is not None:  # a failed test must not leave a run open for the next one
                mlflow.end_run("FAILED")
            mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"))  # kedro-mlflow pointed it at root


@pytest.fixture
def kedro_project(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: ``kedro_project(name, extra_params=...)`` -> a bootstrapped test project (cwd) under tmp_path."""
    with contextlib.ExitStack() as stack:
        yield lambda name="project", **kwargs: stack.enter_context(project_context(tmp_path / name, **kwargs))


def file_listing(root: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file below ``root``: compare two listings to see what a run wrote."""
    if not root.exists():
        return {}
    files = (p for p in sorted(root.rglob("*")) if p.is_file())
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


@pytest.fixture(scope="session")
def pl() -> SimpleNamespace:
    """The helpers above for test modules (which cannot import this conftest under --import-mode=importlib)."""
    return SimpleNamespace(
        PROJECT_ROOT=PROJECT_ROOT,
        CONF_BASE=CONF_BASE,
        RAW=RAW,
        PIPELINES=PIPELINES,
        PRETRAIN_IMAGES=PRETRAIN_IMAGES,
        PROBE_IMAGES=PROBE_IMAGES,
        FINETUNE_IMAGES=FINETUNE_IMAGES,
        EVAL_IMAGES=EVAL_IMAGES,
        BATCH=BATCH,
        STEPS=STEPS,
        read_yaml=_read_yaml,
        read_catalog=read_catalog,
        base_params=base_params,
        tiny_params=tiny_params,
        typed_params=typed_params,
        catalog_config=catalog_config,
        make_catalog=make_catalog,
        run_pipeline=run_pipeline,
        file_listing=file_listing,
        project_context=project_context,
        write_project=write_project,
    )
