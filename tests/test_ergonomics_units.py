"""The pieces of a quiet, self-explaining run, each on its own: loader defaults, console filters, the progress bar's
epoch numbers, titled panels and colour bars."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from deeploc.config import CONF_DIR, cpu_workers
from deeploc.visualize import PANEL_TITLES, colorbar, heatmap, panel, title_height, with_colorbar


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


# --------------------------------------------------------------------------------------------- loaders


def test_loader_defaults_follow_the_cpus_and_the_gpu_available() -> None:
    cpus = len(os.sched_getaffinity(0))
    for data, limit in (("dolos", 4), ("synthetic", 2)):
        cfg = _compose(f"data={data}", "data.root=/data/wacv_data")
        assert cfg.data.num_workers == min(limit, cpus) == cpu_workers(limit)
        assert cfg.data.pin_memory is torch.cuda.is_available()
    # An explicit value still wins.
    assert _compose("data=dolos", "data.num_workers=0", "data.pin_memory=true").data.num_workers == 0


def test_dolos_loaders_do_not_warn_about_workers_or_pinned_memory(synthetic_data: Path) -> None:
    """data=dolos on a generated dataset in Dolos's layout: building and iterating its loaders warns about nothing
    (before: too many workers for the CPUs and pinned memory without CUDA, for each loader)."""
    cfg = _compose("data=dolos", f"data.root={synthetic_data}", "data.subsets=[copy-move,blur-noise]")
    datamodule = instantiate(cfg.data, validate_cache=None)
    datamodule.setup("fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for loader in (datamodule.train_dataloader(), datamodule.val_dataloader(), *datamodule.test_dataloader()):
            next(iter(loader))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "worker" in m or "pin_memory" in m], messages


# --------------------------------------------------------------------------------------------- console


def test_console_filter_keeps_lightning_info_off_the_console_only() -> None:
    from deeploc.console import ConsoleFilter, DropMessages

    console = ConsoleFilter()

    def record(name: str, level: int, message: str = "x") -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, message, None, None)

    assert not console.filter(record("lightning.pytorch.utilities.rank_zero", logging.INFO))
    assert console.filter(record("lightning.pytorch.utilities.rank_zero", logging.WARNING))
    assert console.filter(record("deeploc.cli.train", logging.INFO)) and console.filter(record("hydra", logging.INFO))
    assert console.filter(record("lightning_utilities", logging.INFO))  # another package, not Lightning's logger
    adverts = DropMessages(["try installing [litlogger]"])
    assert not adverts.filter(record("x", logging.INFO, "💡 Tip: ... try installing [litlogger](...) ..."))
    assert adverts.filter(record("x", logging.INFO, "GPU available: False"))


def test_known_warnings_are_ignored_and_others_still_show() -> None:
    from deeploc.console import quiet_console

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_console()
        warnings.warn(
            "The number of training batches (4) is smaller than the logging interval", UserWarning, stacklevel=1
        )
        warnings.warn("Found 1 module(s) in eval mode at the start of training", UserWarning, stacklevel=1)
        warnings.warn("something deeploc does not know about", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something deeploc does not know about"]


def test_the_progress_bar_numbers_epochs_from_one() -> None:
    from types import SimpleNamespace

    from deeploc.training.callbacks import ProgressBar

    bar = ProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=20)
    assert bar._get_train_description(0).strip() == "Epoch 1/20"
    assert bar._get_train_description(19).strip() == "Epoch 20/20"


# --------------------------------------------------------------------------------------------- figures


def test_colorbar_ramps_from_one_at_the_top_to_zero_at_the_bottom() -> None:
    bar = colorbar(256)
    assert bar.shape[0] == 256 and bar.dtype == np.uint8
    ramp = bar[:, bar.shape[1] // 8 + 3]  # a column inside the ramp
    coloured = np.flatnonzero((ramp != 255).any(axis=1))
    top, bottom = ramp[coloured[0]], ramp[coloured[-1]]
    assert np.abs(top.astype(int) - heatmap(np.array([[1.0]]))[0, 0]).max() <= 8
    assert np.abs(bottom.astype(int) - heatmap(np.array([[0.0]]))[0, 0]).max() <= 8
    # Ticks are labelled: dark ink right of the ramp.
    assert (bar[:, bar.shape[1] // 2 :] < 128).any()


def test_with_colorbar_keeps_the_heatmap_pixels() -> None:
    probs = np.random.default_rng(0).random((90, 70))
    out = with_colorbar(heatmap(probs))
    assert out.shape[0] == 90 and out.shape[1] > 70
    np.testing.assert_array_equal(out[:, :70], heatmap(probs))


@pytest.mark.parametrize("size", [64, 128, 256])
def test_panel_tiles_are_titled(size: int) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    prob = rng.random((size, size))
    out = panel(image, prob, prob > 0.7)
    strip = title_height(size)
    assert out.shape[0] == size + strip and len(PANEL_TITLES) == 4
    # The image tile sits under its title, unchanged; every title strip has ink on white.
    np.testing.assert_array_equal(out[strip:, :size], image)
    titles = out[:strip]
    assert (titles == 255).mean() > 0.6 and (titles < 100).any()
    # Four tiles (the probability tile wider by its colour bar) and three gaps.
    assert out.shape[1] > 4 * size
