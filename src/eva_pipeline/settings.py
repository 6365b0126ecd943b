"""Kedro project settings."""

from eva_pipeline.config_loader import KindAwareConfigLoader
from eva_pipeline.hooks import MlflowModelHook, MlflowRunHook, PreflightHook, ProjectMlflowHook, RunSummaryHook

# OmegaConfigLoader whose environments replace (not merge) blocks that name a `kind` (teacher, ...): config_loader.py.
CONFIG_LOADER_CLASS = KindAwareConfigLoader
# `--params pretrain.lr=1e-4` must override one key, not replace the whole `pretrain` block.
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "merge_strategy": {"parameters": "soft"},
}

# kedro-mlflow's hook is registered as ProjectMlflowHook (its subclass: readable params, run tags, dead runs closed)
# instead of the instance its entry point registers (distribution name as pluggy reads it; both spellings).
DISABLE_HOOKS_FOR_PLUGINS = ("kedro_mlflow", "kedro-mlflow")
HOOKS = (PreflightHook(), ProjectMlflowHook(), MlflowRunHook(), MlflowModelHook(), RunSummaryHook())
