"""Teacher targets on disk, in the order they are made and read.

- :mod:`~eva_pipeline.targets.extract`: the extraction run (one or several ranks) that fills a store;
- :mod:`~eva_pipeline.targets.store`: :class:`TargetStore`, computing and writing shards, resume, completeness;
- :mod:`~eva_pipeline.targets.reader`: :class:`TargetReader` and :func:`read_shard`, reading a complete store;
- :mod:`~eva_pipeline.targets.layout`: the on-disk layout both share (file names, fingerprint, ``TargetStoreError``).
"""
