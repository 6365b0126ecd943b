"""Teacher targets on disk: :mod:`~eva_pipeline.targets.store` (the store, its reader, crops of stored views)."""
