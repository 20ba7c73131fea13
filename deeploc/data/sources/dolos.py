"""Dolos (bit-ml/dolos, WACV 2024) on disk, and deeploc's generated data in the same layout.

``data.root`` is the unzipped ``wacv_data`` folder or its ``data/`` child (:mod:`deeploc.data.layout` has the
layout and its checks). The generated source writes a byte-deterministic dataset in that layout first
(:mod:`deeploc.data.synthetic`), keyed by its parameters, then reads it like Dolos.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deeploc.data.errors import DatasetError
from deeploc.data.layout import available_subsets, index_real, index_subsets, resolve_root
from deeploc.data.masks import DEFAULT_POLARITY
from deeploc.data.samples import SPLITS, Sample
from deeploc.data.sources.base import SOURCES, DataSource
from deeploc.data.synthetic import dataset_home, generate_dataset


@SOURCES.register("dolos")
class DolosSource(DataSource):
    """The Dolos layout: ``<root>/[data/]<source>/fake/<subset>/{images,masks}/<split>/<name>.png``.

    Real (pristine) images: ``<root>/[data/]<source>/real/<split>/<name>.png``.

    Args:
        source: the image source folder under ``data/`` (``celebahq``, the study's; or ``ffhq``).
    """

    def __init__(
        self,
        root: str | Path,
        mask_polarity: str = DEFAULT_POLARITY,
        source: str = "celebahq",
        mask_threshold: int | None = None,
    ) -> None:
        super().__init__(root, mask_polarity, mask_threshold)
        self.source = source

    def root(self) -> Path:
        return resolve_root(self.given_root)

    def available_subsets(self) -> list[str]:
        return available_subsets(self.root(), self.source)

    def samples(self, subsets: Sequence[str], splits: Sequence[str] = SPLITS) -> list[Sample]:
        return index_subsets(self.root(), subsets, splits, self.source, self.mask_polarity, self.mask_threshold)

    def real_samples(self, split: str) -> list[Sample]:
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; splits are {list(SPLITS)}")
        fix = "re-extract the archive (Dolos ships data/<source>/real/{train,valid,test}) or evaluate without --real"
        return index_real(self.root() / self.source / "real" / split, split, fix)


@SOURCES.register("generated")
class GeneratedSource(DolosSource):
    """deeploc's generated dataset (four classical manipulations) in the Dolos layout, made on first use.

    ``root`` is the folder the generated datasets live under (one subfolder per set of parameters), or a
    ``wacv_data`` folder itself (then used as named; other parameters are refused). The keywords are
    :func:`~deeploc.data.synthetic.generate_dataset`'s; its real images (``n_real`` per split, at most the split's
    size) are the unmanipulated sources of the first names of each split.
    """

    def __init__(
        self,
        root: str | Path,
        mask_polarity: str = DEFAULT_POLARITY,
        n_train: int = 256,
        n_valid: int = 64,
        n_test: int = 64,
        size: int = 256,
        seed: int = 0,
        n_real: int = 16,
        mask_threshold: int | None = None,
    ) -> None:
        super().__init__(root, mask_polarity, mask_threshold=mask_threshold)
        self.params: dict[str, Any] = {
            "n_train": n_train, "n_valid": n_valid, "n_test": n_test, "size": size, "seed": seed, "n_real": n_real,
        }  # fmt: skip
        self._root: Path | None = None

    def _home(self) -> Path:
        root = self.given_root.absolute()
        if root.name == "wacv_data":  # the dataset folder itself: used as named (other parameters are refused)
            return root.parent
        return dataset_home(root, self.params)

    def prepare(self) -> None:
        self._root = resolve_root(generate_dataset(self._home(), **self.params))

    def root(self) -> Path:
        if self._root is None:
            self.prepare()
        return self._root
