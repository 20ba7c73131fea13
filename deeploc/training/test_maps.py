"""The encoder maps of the first few test images of each test subset, kept as the test step computes (or reads) them,
so a run's overlays are drawn without a second encoder pass over images it has just encoded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["TestMaps"]


class TestMaps:
    """Up to ``keep`` images per test subset: their names and maps (on the CPU), in test-loader order."""

    __test__ = False  # not a pytest test class

    def __init__(self, keep: int = 0) -> None:
        self.keep = keep
        self.names: dict[str, list[str]] = {}
        self.maps: dict[str, dict[str, list[torch.Tensor]]] = {}

    def add(self, subset: str, maps: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
        """Keep the first images of a test batch of ``subset`` until ``keep`` are held."""
        held = self.names.setdefault(subset, [])
        room = min(self.keep - len(held), len(names))
        if room <= 0:
            return
        held.extend(names[:room])
        kept = self.maps.setdefault(subset, {})
        for name, fmap in maps.items():
            kept.setdefault(name, []).append(fmap[:room].detach().to("cpu", copy=True))

    def of(self, subset: str, samples: Sequence[Any]) -> dict[str, torch.Tensor] | None:
        """The kept maps of ``samples`` (the first images of ``subset``), or None when they were not kept (fewer
        kept, or other images: e.g. this process tested another shard under DDP)."""
        names = [s.name for s in samples]
        if self.names.get(subset, [])[: len(names)] != names or not names:
            return None
        return {name: torch.cat(parts)[: len(names)] for name, parts in self.maps[subset].items()}
