"""The data-source contract: where a dataset's samples come from, and how its masks are read.

A source turns a folder (or a file) into :class:`~deeploc.data.samples.Sample` records: manipulated images with
their masks, per localization subset and split; optionally the pristine (real) images of a split. Everything after
it (splits, validation, datasets, the feature cache, metrics) works on samples, so a new on-disk layout is one
module in this package with ``@SOURCES.register("<name>")`` on a ``DataSource`` subclass plus a
``conf/data/<name>.yaml`` (docs/extending.md). Every sample carries the source's mask polarity, so every reader
(training, validation, the cache, evaluation, panels) reads its mask the same way.

Sources never skip a bad file: a missing mask, an empty split or an unknown subset raises
:class:`~deeploc.data.errors.DatasetError` naming the paths and the fix.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from deeploc.data.errors import DatasetError
from deeploc.data.masks import DEFAULT_POLARITY, check_polarity, check_threshold
from deeploc.data.samples import SPLITS, Sample
from deeploc.registry import RecordsOptions, Registry

__all__ = ["SOURCES", "DataSource", "build_source"]


class DataSource(RecordsOptions, abc.ABC):
    """Base class of data sources.

    Args:
        root: the dataset's folder (what ``data.root`` names).
        mask_polarity: how its masks are drawn (``black_is_manipulated``: Dolos; ``white_is_manipulated``).
        mask_threshold: binarise masks first: values above it are white, the others black (None: exact 0 / 255
            masks, the Dolos rule; :mod:`deeploc.data.masks`).
    """

    registry_name: ClassVar[str]

    def __init__(
        self, root: str | Path, mask_polarity: str = DEFAULT_POLARITY, mask_threshold: int | None = None
    ) -> None:
        if root is None:
            raise DatasetError("data.root is not set: pass data.root=/path/to/the/dataset")
        self.given_root = Path(str(root)).expanduser()
        self.mask_polarity = check_polarity(mask_polarity)
        self.mask_threshold = check_threshold(mask_threshold)

    def prepare(self) -> None:
        """Make the data exist (e.g. generate it); called once before :meth:`root`. Nothing by default."""

    @abc.abstractmethod
    def root(self) -> Path:
        """The resolved dataset folder (identifies the data in reports and run records)."""

    @abc.abstractmethod
    def available_subsets(self) -> list[str]:
        """The localization subsets the data holds (those with masks)."""

    @abc.abstractmethod
    def samples(self, subsets: Sequence[str], splits: Sequence[str] = SPLITS) -> list[Sample]:
        """Manipulated images and their masks of ``subsets`` x ``splits``, ordered by subset, split, name."""

    def real_samples(self, split: str) -> list[Sample]:
        """Pristine images of ``split`` (``mask=None``, subset ``real``), ordered by name; sources without real
        images say so."""
        raise DatasetError(f"the {self.registry_name} data source at {self.given_root} has no real (pristine) images")

    def describe(self) -> dict[str, Any]:
        """Plain record of the source (its registered name, options and resolved root)."""
        return {"source": self.registry_name, "options": self.options(), "root": str(self.root())}


SOURCES: Registry[type[DataSource]] = Registry("data source", "deeploc.data.sources", "deeploc.sources")


def build_source(name: str, **options: Any) -> DataSource:
    """The registered data source ``name`` built from plain keywords (``root``, ``mask_polarity``, ...)."""
    cls = SOURCES.get(name)
    try:
        return cls(**options)
    except TypeError as exc:  # an option the source does not take
        raise DatasetError(f"data source {name!r}: {exc} (set its options under data.source_options)") from None
