"""Shards of a sample list: disjoint, stable parts that parallel jobs (``deeploc-extract shard=k num_shards=n``) each
take, whatever the list order or the dataset's mount point."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["shard_of", "shard_samples"]


def shard_of(key: str, num_shards: int) -> int:
    """The shard (0..num_shards-1) of a stable string key (sha1, so every job computes the same split)."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) % num_shards


def shard_samples(samples: Sequence[T] | Iterable[T], shard: int, num_shards: int) -> list[T]:
    """The samples of shard ``shard`` of ``num_shards`` (disjoint, together all of them), keyed by
    ``subset/split/name`` so the split does not depend on the list order or on where the dataset is mounted."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard={shard} must be in 0..num_shards-1 with num_shards >= 1 (num_shards={num_shards})")
    if num_shards == 1:
        return list(samples)
    return [s for s in samples if shard_of(_sample_key(s), num_shards) == shard]


def _sample_key(sample: Any) -> str:
    if all(hasattr(sample, a) for a in ("subset", "split", "name")):
        return f"{sample.subset}/{sample.split}/{sample.name}"
    return str(getattr(sample, "image", sample))
