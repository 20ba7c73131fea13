"""Frozen-encoder features computed once and reused by every decoder (see :mod:`deeploc.features.store`)."""

from deeploc.features.store import (
    CachedFeatureDataset,
    FeatureStore,
    FeatureStoreError,
    cache_allowed,
    extract_features,
)

__all__ = ["CachedFeatureDataset", "FeatureStore", "FeatureStoreError", "cache_allowed", "extract_features"]
