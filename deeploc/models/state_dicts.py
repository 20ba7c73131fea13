"""The one check of a state dict against the module it should load into, with a message a user can act on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["state_dict_mismatch"]


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, Any]) -> str:
    """What keeps ``found`` from loading strictly where ``expected`` is (missing / unexpected keys, other shapes,
    non-tensors), with an example of each; empty when it loads."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        k
        for k in set(expected) & set(found)
        if not isinstance(found[k], torch.Tensor) or found[k].shape != expected[k].shape
    )
    return "; ".join(
        f"{len(keys)} {what} (e.g. {keys[0]}{_shapes(expected, found, keys[0]) if what == 'shape mismatches' else ''})"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        if keys
    )


def _shapes(expected: Mapping[str, torch.Tensor], found: Mapping[str, Any], key: str) -> str:
    value = found[key]
    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
    return f": expected {tuple(expected[key].shape)}, found {got}"
