"""Training input: manifest rows -> pixels -> views, masks and targets -> batches (Kedro-free).

- :mod:`~eva_pipeline.loader.order`: :class:`EpochOrder`, every epoch a uniform permutation in O(1) memory.
- :mod:`~eva_pipeline.loader.rows`: rows by index (:class:`FrameRows`, :class:`ParquetRows` over
  :mod:`~eva_pipeline.loader.row_index`, the manifest's memory-mapped row index).
- :mod:`~eva_pipeline.loader.pixels`: decoding a location's pixels (:class:`PixelReader`, :func:`load_images`,
  :class:`ManifestPixels`, :class:`TensorPixels`).
- :mod:`~eva_pipeline.loader.augment` (EVA's RandomResizedCrop + flip, seeded per sample) and
  :mod:`~eva_pipeline.loader.transforms` (model input: resize, CLIP normalisation).
- :mod:`~eva_pipeline.loader.batches`: :class:`BatchPlan` and :func:`batch_loader`, the pre-training batches.
- :mod:`~eva_pipeline.loader.classification`: :class:`ClassificationDataset` and :func:`classification_loader`,
  labelled fine-tuning and evaluation batches (the transform is the caller's, e.g. ``finetune.augment``'s).
"""
