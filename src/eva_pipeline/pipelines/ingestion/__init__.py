"""Ingestion: configured image sources -> one manifest (Parquet) + an ingestion report."""

from eva_pipeline.pipelines.ingestion.pipeline import create_pipeline

__all__ = ["create_pipeline"]
