"""Ingestion: every source into one manifest (Kedro-free; the ``ingestion`` pipeline calls it from thin nodes).

- :mod:`~eva_pipeline.ingest.build`: :func:`write_manifest` / :func:`build_manifest`, de-duplication, the report.
- :mod:`~eva_pipeline.ingest.scan`: :class:`SourceSpec`, :class:`SourceScan` (spills to disk) and the registry of
  source kinds (:func:`register_source_kind`).
- :mod:`~eva_pipeline.ingest.sources`: the readers of encoded images (``image_folder``, ``file_list``,
  ``webdataset``); :mod:`~eva_pipeline.ingest.idx`: the IDX container (the embedded demo data).
- :mod:`~eva_pipeline.ingest.decode`: robust decoding (every rejection has a reason);
  :mod:`~eva_pipeline.ingest.scan_cache`: the incremental scan cache.

Import from the modules themselves; this package file imports nothing, so ``eva_pipeline.manifest`` and the pipeline
definitions stay free of torch.
"""
