"""``LocalizationDataModule``: layout (index + validate) -> splits -> datasets -> loaders.

Hyperparameters are primitives (str, int, float, bool, list, dict of those), so they survive checkpoint
``weights_only`` loading. A feature cache can replace the image datasets via :meth:`set_dataset_factory`.

Reproducibility: the training loader draws its order from ``(seed, epoch)`` (:class:`EpochSeededSampler`), and
Lightning calls ``set_epoch`` before every epoch, so a run resumed at an epoch boundary sees exactly the batches
of an uninterrupted run. The same (seed, epoch) also seeds the loader's generator, from which PyTorch derives the
worker seeds, and :func:`seed_worker` reseeds the augmentation pipeline from them; with augmentation on, training
workers are therefore not persistent (a persistent worker would keep its epoch-0 state).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from deeploc.data.augment import build_augmentations
from deeploc.data.datasets import ImageMaskDataset
from deeploc.data.errors import DatasetError
from deeploc.data.masks import DEFAULT_POLARITY, MAX_MANIPULATED_FRACTION, MaskRules
from deeploc.data.regions import ERODE_SIZE
from deeploc.data.samples import Sample, count_table, format_count_table
from deeploc.data.sources import DataSource, build_source
from deeploc.data.splits import SPLIT_MODES, SplitPlan, make_split, subsets_needed
from deeploc.data.validate import validate_samples

__all__ = ["DatasetFactory", "EpochSeededSampler", "LocalizationDataModule", "seed_worker"]

log = logging.getLogger(__name__)

DatasetFactory = Callable[[list[Sample], str], Dataset]
_SPLIT_KEYS = {"mode", "subset", "n_train", "n_valid", "seed"}


def _mix(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence)."""
    return int(
        np.random.SeedSequence([int(v) % (2**63) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


class EpochSeededSampler(Sampler[int]):
    """A random permutation of ``range(n)`` that depends only on ``(seed, epoch)``.

    ``set_epoch(epoch)`` (called by Lightning before each training epoch) selects the epoch; without it, each
    new iteration advances the epoch by one. ``loader_generator`` (the DataLoader's ``generator``, from which
    worker seeds are drawn) is reseeded from (seed, epoch) too, and ``on_epoch(epoch)`` is called, e.g. to
    reseed augmentations when loading in the main process.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        loader_generator: torch.Generator | None = None,
        on_epoch: Callable[[int], None] | None = None,
    ) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.loader_generator = loader_generator
        self.on_epoch = on_epoch
        self.epoch = 0
        self._iterated: int | None = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._iterated = None
        if self.loader_generator is not None:
            self.loader_generator.manual_seed(_mix(self.seed, self.epoch, 1))
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator()
        g.manual_seed(_mix(self.seed, int(epoch), 0))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        if self._iterated == self.epoch:  # iterated again without set_epoch: next epoch
            self.set_epoch(self.epoch + 1)
        self._iterated = self.epoch
        return iter(self.order(self.epoch))

    def __len__(self) -> int:
        return self.n


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reseed the worker's dataset (its augmentations) from the worker seed."""
    info = get_worker_info()
    if info is None:
        return
    reseed = getattr(info.dataset, "reseed", None)
    if callable(reseed):
        reseed(info.seed % (2**32))


def _plain(value: Any) -> Any:
    """Recursively turn mappings into dicts and non-string sequences into lists (e.g. OmegaConf containers)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _default_cache_file(root: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:16]
    return base / "deeploc" / "validated" / f"{digest}.json"


class LocalizationDataModule(L.LightningDataModule):
    """Any data source (Dolos, generated data, your layout) for localization training and evaluation.

    Args:
        root: the dataset's folder, as the source reads it (Dolos: ``.../wacv_data`` or its ``data/`` child).
        subsets: the localization subsets of the study (cross: the test subsets; leave_one_out: all four).
        split: ``{"mode": "in_domain" | "cross" | "leave_one_out", "subset": str, "n_train": int = 3000,
            "n_valid": int = 300, "seed": int = 42}``; ``subset`` is the training subset (held out for
            leave_one_out); ``n_*``/``seed`` apply to leave_one_out only (absent or null = the defaults).
        batch_size / eval_batch_size: training / evaluation batch size (eval defaults to batch_size).
        augment: ``deeploc.data.augment`` config for training images; None = off.
        validate: decode and check every used image and mask in ``setup`` (fails naming bad files), and apply the
            mask and size rules (:mod:`deeploc.data.masks`; one image size per batch).
        source: the registered data source (:mod:`deeploc.data.sources`: ``dolos``, ``generated``, ...) or a
            :class:`~deeploc.data.sources.DataSource` instance (then ``root``, ``mask_polarity`` and
            ``source_options`` are its own).
        source_options: the source's other keyword arguments.
        synthetic: the ``generated`` source's parameters (``n_train``, ``size``...); setting them selects that
            source: a dataset is generated under ``root`` on first use, one folder per parameter set.
        seed: seeds the training order and augmentation (the split's own seed is ``split["seed"]``).
        validate_cache: validation cache file; "auto" = ``$XDG_CACHE_HOME/deeploc/validated/<hash of root>.json``,
            None = no cache.
        mask_polarity: how the masks are drawn: ``black_is_manipulated`` (Dolos) or ``white_is_manipulated``.
        mask_threshold: binarise masks first (values above it white, the others black); None = exact 0 / 255 masks.
        allow_empty_masks: accept masks with no manipulated pixel (refused by default: usually a wrong file).
        max_manipulated_fraction: refuse a ``<subset>/<split>`` whose masks mark more than this share of each
            image as manipulated on average (inverted polarity).
    """

    def __init__(
        self,
        root: str,
        subsets: list[str],
        split: dict,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        augment: dict | None = None,
        validate: bool = True,
        synthetic: dict | None = None,
        seed: int = 0,
        validate_cache: str | None = "auto",
        mask_polarity: str = DEFAULT_POLARITY,
        allow_empty_masks: bool = False,
        max_manipulated_fraction: float = MAX_MANIPULATED_FRACTION,
        source: str | DataSource = "dolos",
        source_options: dict | None = None,
        mask_threshold: int | None = None,
    ) -> None:
        super().__init__()
        # Plain containers only (an OmegaConf DictConfig in the saved hyperparameters breaks weights_only loading).
        subsets = [str(s) for s in _plain(subsets)]
        split = _plain(split)
        augment = _plain(augment) or None
        synthetic = _plain(synthetic) or None
        if not isinstance(split, dict):
            raise ValueError(f"split must be a mapping, got {split!r}")
        unknown = set(split) - _SPLIT_KEYS
        if unknown:
            raise ValueError(f"split: unknown keys {sorted(unknown)}; known: {sorted(_SPLIT_KEYS)}")
        for key in ("mode", "subset"):
            if not split.get(key):
                raise ValueError(f"split.{key} is required (split = {split})")
        if split["mode"] not in SPLIT_MODES:
            raise ValueError(f"split.mode {split['mode']!r} is unknown; choose one of {list(SPLIT_MODES)}")
        for key, default in (("n_train", 3000), ("n_valid", 300), ("seed", 42)):
            if split.get(key) is None:  # absent or null (configs leave n_* null for cross / in_domain)
                split[key] = default
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size}, {eval_batch_size}")
        root = str(root)  # the saved hyperparameters read the (plain) locals
        options = {"mask_polarity": mask_polarity, "mask_threshold": mask_threshold, **(_plain(source_options) or {})}
        self.data_source = _make_source(source, root, synthetic, options)
        self.root = root
        self.subsets = subsets
        self.split = split
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.augment = augment
        self.validate = bool(validate)
        self.validate_cache = validate_cache
        self.synthetic = synthetic
        self.seed = int(seed)
        self.mask_polarity = self.data_source.mask_polarity
        self.mask_rules = MaskRules(allow_empty_masks, max_manipulated_fraction)
        # Plain values only in checkpoints: a source instance is recorded by name and options.
        self.save_hyperparameters(ignore=["source"])
        self.hparams.update(source=self.data_source.registry_name, source_options=self.data_source.options())
        # Fail on a bad augmentation config now, not in the first training step.
        build_augmentations(self.augment)

        self.plan: SplitPlan | None = None
        self.data_root: Path | None = None
        self._factory: DatasetFactory | None = None
        self._datasets: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------- data

    def prepare_data(self) -> None:
        """Make the data exist (the generated source writes its dataset; idempotent, run on one process)."""
        self.data_source.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Index the subsets the split needs, build the plan, validate the samples it uses, log counts."""
        if self.plan is not None:
            return
        root = self.data_source.root()
        mode, subset = self.split["mode"], self.split["subset"]
        needed = subsets_needed(mode, subset, self.subsets)
        samples = self.data_source.samples(needed)
        plan = make_split(
            samples,
            mode,
            subset,
            self.subsets,
            n_train=int(self.split["n_train"]),
            n_valid=int(self.split["n_valid"]),
            seed=int(self.split["seed"]),
        )
        used = plan.all_samples()
        if self.validate:
            cache = _default_cache_file(root) if self.validate_cache == "auto" else self.validate_cache
            # Every loader stacks its batches, so each needs one image size.
            batches = {"the train split": plan.train, "the valid split": plan.valid}
            batches.update({f"the test split of {name}": samples for name, samples in plan.test.items()})
            stats = validate_samples(
                used, cache_file=cache, workers=max(1, self.num_workers), rules=self.mask_rules, batches=batches
            )
            thin = sum(st.thin for st in stats.values())
            if thin:
                log.info(
                    "%d of %d masks have regions thinner than the metrics' %dx%d erosion (no F1 positive)",
                    thin,
                    len(stats),
                    ERODE_SIZE,
                    ERODE_SIZE,
                )
        self.data_root = root
        self.plan = plan
        log.info(
            "dataset %s, split %s (subset %s): train %d, valid %d, test %s\n%s",
            root,
            mode,
            subset,
            len(plan.train),
            len(plan.valid),
            {k: len(v) for k, v in plan.test.items()},
            format_count_table(count_table(used)),
        )

    @property
    def test_subsets(self) -> list[str]:
        return self._plan().test_subsets

    def _plan(self) -> SplitPlan:
        if self.plan is None:
            raise RuntimeError("LocalizationDataModule.setup() has not run yet")
        return self.plan

    # ------------------------------------------------------------------------------------- datasets

    def set_dataset_factory(self, factory: DatasetFactory | None) -> None:
        """Replace how datasets are built: ``factory(samples, stage)`` with stage "train", "valid" or "test".

        None restores the default (:class:`ImageMaskDataset`, augmented for "train" only). Datasets already
        built are dropped.
        """
        self._factory = factory
        self._datasets.clear()

    def _build(self, samples: list[Sample], stage: str) -> Dataset:
        if self._factory is not None:
            return self._factory(samples, stage)
        transform = build_augmentations(self.augment, seed=self.seed) if stage == "train" else None
        return ImageMaskDataset(samples, transform=transform)

    def dataset(self, stage: str, test_subset: str | None = None) -> Dataset:
        """The (cached) dataset of a stage; for "test", the one of ``test_subset``."""
        plan = self._plan()
        key = stage if stage != "test" else f"test/{test_subset}"
        if key not in self._datasets:
            if stage == "train":
                samples = plan.train
            elif stage == "valid":
                samples = plan.valid
            elif stage == "test":
                if test_subset not in plan.test:
                    raise KeyError(f"no test subset {test_subset!r}; test subsets: {plan.test_subsets}")
                samples = plan.test[test_subset]
            else:
                raise ValueError(f"unknown stage {stage!r}; use train, valid or test")
            self._datasets[key] = self._build(samples, stage)
        return self._datasets[key]

    # ---------------------------------------------------------------------------------------- loaders

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        persistent = kwargs.pop("persistent_workers", self.num_workers > 0)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=persistent and self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        generator = torch.Generator()
        reseed = getattr(dataset, "reseed", None)
        on_epoch = None
        if callable(reseed) and self.num_workers == 0:

            def on_epoch(epoch: int) -> None:
                reseed(_mix(self.seed, epoch, 2) % (2**32))

        sampler = EpochSeededSampler(len(dataset), self.seed, loader_generator=generator, on_epoch=on_epoch)
        randomised = getattr(dataset, "transform", None) is not None
        return self._loader(
            dataset,
            self.batch_size,
            sampler=sampler,
            generator=generator,
            worker_init_fn=seed_worker,
            drop_last=False,
            persistent_workers=not randomised,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("valid"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per test subset, in :attr:`test_subsets` order."""
        return [
            self._loader(self.dataset("test", name), self.eval_batch_size, shuffle=False) for name in self.test_subsets
        ]

    def describe(self) -> dict[str, Any]:
        """Counts for logging / metrics.json: root, mode, subset, n per stage and per test subset."""
        plan = self._plan()
        return {
            "root": str(self.data_root),
            "mode": self.split["mode"],
            "subset": self.split["subset"],
            "n_train": len(plan.train),
            "n_valid": len(plan.valid),
            "n_test": {k: len(v) for k, v in plan.test.items()},
        }


def _make_source(source: str | DataSource, root: Any, synthetic: dict | None, options: dict[str, Any]) -> DataSource:
    """The data source of a data module's settings (see :class:`LocalizationDataModule`); ``options`` holds the
    mask settings and ``data.source_options``."""
    if isinstance(source, DataSource):
        return source
    if synthetic is not None:
        own = {k: v for k, v in options.items() if k not in ("mask_polarity", "mask_threshold")}
        if source not in ("dolos", "generated") or own:
            raise DatasetError(
                f"data.synthetic holds the generated data's parameters, which do not go with data.source={source} "
                f"and data.source_options={own}: set data.synthetic=null (or use data=synthetic alone)"
            )
        return build_source("generated", root=root, **options, **synthetic)
    if source == "generated":
        raise DatasetError(
            "data.source=generated needs its parameters in data.synthetic (n_train, n_valid, n_test, size, seed); to "
            "read a generated dataset as it is, use data.source=dolos with data.root=<its wacv_data folder>"
        )
    return build_source(source, root=root, **options)
