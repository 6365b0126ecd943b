"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

CONFIG_LOADER_CLASS = OmegaConfigLoader
# `--params pretrain.lr=1e-4` must override one key, not replace the whole `pretrain` block.
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "merge_strategy": {"parameters": "soft"},
}

from eva_pipeline.hooks import MlflowRunHook, PreflightHook  # noqa: E402

HOOKS = (PreflightHook(), MlflowRunHook())
