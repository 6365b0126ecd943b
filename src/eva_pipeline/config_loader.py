"""Kedro's OmegaConfigLoader with one rule added to the soft merge of environments: blocks with a ``kind`` are
replaced, not merged.

Parameters of an environment (``conf/eva01``) merge into ``conf/base`` key by key, so an environment only writes what
it changes. That is wrong for a block whose ``kind`` selects a class with its own options (a teacher, a source): the
base teacher's ``options.block_index`` would reach the environment's open_clip teacher. The rule: **an environment
block that names a ``kind`` replaces the base block whole**; one that leaves ``kind`` out merges into it key by key
(e.g. one changed option of the same teacher). Lists (``ingestion.sources``) are replaced whole by OmegaConf already.
"""

from __future__ import annotations

from typing import Any

from kedro.config import OmegaConfigLoader

#: The key whose presence in an environment's block makes that block replace the base block.
KIND_KEY: str = "kind"


def replace_kind_blocks(base: Any, env: Any) -> Any:
    """``base`` with every block that ``env`` redefines with a ``kind`` key removed (so the merge takes env's whole).

    Works on plain dicts or OmegaConf containers; returns a new top-level dict, nested dicts are copied on the way
    down where something is removed.
    """
    if not hasattr(base, "items") or not hasattr(env, "items"):
        return base
    out = dict(base.items())
    for key, env_value in env.items():
        if key not in out or not hasattr(env_value, "items"):
            continue
        if KIND_KEY in env_value:
            del out[key]  # the environment's block stands alone
        else:
            out[key] = replace_kind_blocks(out[key], env_value)
    return out


class KindAwareConfigLoader(OmegaConfigLoader):
    """Soft merge of environments in which a block that names its ``kind`` replaces the base block (module doc)."""

    def _soft_merge(self, config: dict[str, Any], env_config: dict[str, Any], env_path: str | None = None) -> Any:
        return super()._soft_merge(replace_kind_blocks(config, env_config), env_config, env_path)
