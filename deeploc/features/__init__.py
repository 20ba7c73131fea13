"""Frozen-encoder features computed once and reused by every decoder: the entry format (:mod:`.entry`), stores
(:mod:`.store`), filling them (:mod:`.extraction`), the cached dataset (:mod:`.dataset`) and the one policy that
decides between cache and stream (:mod:`.serving`)."""

from deeploc.features.dataset import CachedFeatureDataset
from deeploc.features.entry import FeatureStoreError
from deeploc.features.extraction import FeatureCache, extract_features
from deeploc.features.store import FeatureStore

__all__ = ["CachedFeatureDataset", "FeatureCache", "FeatureStore", "FeatureStoreError", "extract_features"]
