"""Ingestion: every source into one manifest (Kedro-free; the ``ingestion`` pipeline calls it from thin nodes).

In the order of the data flow:

- :mod:`~eva_pipeline.ingest.scan`: :class:`SourceSpec` (a source to read), :class:`SourceScan` (what a reader
  found) and the registry of source kinds (:func:`register_source_kind`): the interface of every reader.
- :mod:`~eva_pipeline.ingest.readers`: the built-in readers, one module per source kind (``image_folder``,
  ``file_list``, ``webdataset``, ``idx``: the IDX container of the embedded demo data).
- :mod:`~eva_pipeline.ingest.decode`: robust decoding (every rejection has a reason;
  :mod:`~eva_pipeline.ingest.details`: details without memory addresses, the same on every run);
  :mod:`~eva_pipeline.ingest.scan_cache`: the incremental scan cache.
- :mod:`~eva_pipeline.ingest.spill`: what keeps a build's memory flat (spill files, sets on disk).
- :mod:`~eva_pipeline.ingest.build`: :func:`write_manifest` / :func:`build_manifest`, the steps in order;
  :mod:`~eva_pipeline.ingest.dedup`: de-duplication and the list of duplicates; :mod:`~eva_pipeline.ingest.write`:
  the validated rows written to Parquet; :mod:`~eva_pipeline.ingest.report`: the ingestion report and the
  rejections file (every item not kept: rejections and duplicates).

Import from the modules themselves; this package file imports nothing, so ``eva_pipeline.manifest`` and the pipeline
definitions stay free of torch.
"""
