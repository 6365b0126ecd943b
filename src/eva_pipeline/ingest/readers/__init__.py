"""The built-in source readers, one module per source kind; importing this package registers every kind.

- :mod:`~eva_pipeline.ingest.readers.image_folder`: a directory tree of image files (class folders or flat);
- :mod:`~eva_pipeline.ingest.readers.file_list`: a text file of image paths with optional labels;
- :mod:`~eva_pipeline.ingest.readers.webdataset`: tar shards (img2dataset);
- :mod:`~eva_pipeline.ingest.readers.idx`: IDX files (the embedded Fashion-MNIST demo data), format and reader;
- :mod:`~eva_pipeline.ingest.readers.common`: what the readers of encoded images share (:class:`UnitRunner`).

A reader is registered with :func:`eva_pipeline.ingest.scan.register_source_kind` (also the way to add a kind of
your own) and fills a :class:`~eva_pipeline.ingest.scan.SourceScan`.

Encoded images: every candidate item is read once, hashed (sha1 of the raw file bytes: ``content_hash``) and fully
decoded with :func:`~eva_pipeline.ingest.decode.decode_image`, so the manifest's width/height are those after EXIF
rotation and an unreadable item becomes a rejection with a reason in the ingestion report; nothing is dropped
silently and nothing is substituted. ``limit`` keeps the first ``limit`` candidates (in sorted order); the rest are
counted in ``available`` without being read (webdataset: reading stops, see ``available_is_lower_bound``).

Locations: a file is its path (the source's folder or the list file's folder joined with the relative path,
so relative sources give relative locations); a webdataset item is ``"shard.tar#member"``, an IDX item
``"file#index"``. A ``#`` inside a file path or member name would make the location ambiguous, so such items are
rejected (``unsupported path``).

Incremental scans: given a :class:`~eva_pipeline.ingest.scan_cache.UnitCache` (``units``), each image file, each
shard and each IDX images + labels pair is one cache unit; an unchanged one is replayed from the cache without
being opened.

Memory: readers stream items into the :class:`~eva_pipeline.ingest.scan.SourceScan` (which spills to disk) and
hold at most one directory listing per tree level, one shard sample, or (file lists) one chunk of seen lines.
"""

from eva_pipeline.ingest.readers import file_list, idx, image_folder, webdataset

__all__ = ["file_list", "idx", "image_folder", "webdataset"]
