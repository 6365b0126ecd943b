"""Kedro project settings."""

from eva_pipeline.config_loader import KindAwareConfigLoader
from eva_pipeline.hooks import MlflowRunHook, PreflightHook, RunSummaryHook

# OmegaConfigLoader whose environments replace (not merge) blocks that name a `kind` (teacher, ...): config_loader.py.
CONFIG_LOADER_CLASS = KindAwareConfigLoader
# `--params pretrain.lr=1e-4` must override one key, not replace the whole `pretrain` block.
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "merge_strategy": {"parameters": "soft"},
}

HOOKS = (PreflightHook(), MlflowRunHook(), RunSummaryHook())
