"""Settings checked before any work, conflicting overrides, error classification, epoch summary numbers."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import open_dict

from deeploc.config import CONF_DIR
from deeploc.errors import ConfigError, DeeplocError, deeploc_error


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def _check(*overrides: str) -> None:
    """check_config on a job's config, as Hydra hands it to deeploc-train (${hydra:...} values resolvable)."""
    from deeploc.training.settings import check_config

    cfg = _compose(*overrides, hydra=True)
    cfg.hydra.runtime.output_dir = "/tmp/run"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        check_config(cfg)
    finally:
        HydraConfig.instance().cfg = None


def _problem(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        _check(*overrides)
    return str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=abc", "data.batch_size='abc' must be a positive integer"),
        ("data.batch_size=0", "data.batch_size=0 must be a positive integer"),
        ("data.batch_size=2.5", "data.batch_size=2.5 must be a positive integer"),
        ("data.eval_batch_size=-4", "data.eval_batch_size=-4 must be a positive integer, or null"),
        ("trainer.max_epochs=abc", "trainer.max_epochs='abc' must be a positive integer"),
        (
            "trainer.max_epochs=-1",
            "trainer.max_epochs=-1 must be a positive integer (-1, Lightning's 'no limit', would train forever",
        ),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be a positive integer"),
        ("model.lr=abc", "model.lr='abc' must be a number >= 0"),
        ("model.lr=-0.1", "model.lr=-0.1 must be a number >= 0"),
        ("model.lr=nan", "model.lr=nan must be a number >= 0"),
        ("model.weight_decay=-1", "model.weight_decay=-1 must be a number >= 0"),
        ("trainer.devices=0", "trainer.devices=0 must be a positive integer, -1 (all), 'auto' or a list"),
        ("trainer.devices=two", "trainer.devices='two' must be"),
        ("data.num_workers=-2", "data.num_workers=-2 must be an integer >= 0"),
        ("data.num_workers=true", "data.num_workers=True must be an integer >= 0"),
        ("split.n_train=0", "split.n_train=0 must be a positive integer, or null"),
        ("features.batch_size=x", "features.batch_size='x' must be a positive integer"),
        (
            "optimized_metric=val/acc",
            "optimized_metric='val/acc' must be val/loss or val/<name> of a registered metric",
        ),
        ("if_finished=maybe", "if_finished='maybe' must be one of skip, eval, retrain"),
    ],
)
def test_bad_settings_are_refused_naming_the_key_and_the_rule(override: str, message: str) -> None:
    assert message in _problem(override)


def test_every_problem_is_reported_at_once() -> None:
    text = _problem("data.batch_size=abc", "model.lr=-1", "trainer.max_epochs=-1")
    assert "data.batch_size='abc'" in text and "model.lr=-1" in text and "trainer.max_epochs=-1" in text


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("trainer.devices=auto",),
        ("trainer.devices=-1",),
        ("trainer.devices=[0,1]",),
        ("trainer=ddp", "trainer.devices=4"),
        ("trainer.fast_dev_run=true",),
        ("trainer.fast_dev_run=2",),
        ("data.eval_batch_size=64", "model.lr=1", "model.weight_decay=0"),
        ("model.lr=0",),
        ("schedule=declip",),
        ("experiment=leave_one_out",),
        ("optimized_metric=val/loss",),
    ],
)
def test_valid_settings_pass(overrides: tuple[str, ...]) -> None:
    _check(*overrides)


def _choices_error(*overrides: str, multirun: bool) -> str | None:
    from deeploc.training.settings import check_choices

    cfg = _compose(*overrides, hydra=True)
    cfg.hydra.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
    try:
        check_choices(cfg.hydra)
    except ConfigError as exc:
        return str(exc)
    return None


def test_arch_with_a_decoder_or_feature_override_is_refused_naming_both() -> None:
    # One job of `-m experiment=paper_table decoder=conv4 feature=image_embed subset_index=0`.
    text = _choices_error("experiment=paper_table", "arch=conv12_image_embed", "decoder=conv4", "feature=image_embed",
                          "subset_index=0", multirun=True)  # fmt: skip
    assert text is not None
    assert "arch=conv12_image_embed" in text and "decoder=conv4" in text and "feature=image_embed" in text
    assert "~arch" in text and "conv20_high_res_feats_1" in text
    # An experiment's own arch choice counts too; a depth override is a decoder override.
    text = _choices_error("experiment=study", "decoder.depth=12", multirun=False)
    assert text is not None and "experiment=study chooses arch=conv20_high_res_feats_1" in text
    # Without arch, or with arch alone, nothing to refuse.
    assert _choices_error("experiment=study", "~arch", "decoder=conv12", multirun=False) is None
    assert _choices_error("arch=conv4_image_embed", multirun=False) is None
    assert _choices_error("decoder=conv12", "feature=image_embed", multirun=False) is None


def test_a_sweep_experiment_without_multirun_is_refused_with_the_fix() -> None:
    text = _choices_error("experiment=paper_table", "data.batch_size=8", multirun=False)
    assert text is not None
    assert "experiment=paper_table is a sweep" in text and "arch=conv4_image_embed,conv12_image_embed" in text
    assert "deeploc-train -m experiment=paper_table data.batch_size=8" in text
    assert "experiment=leave_one_out is a sweep" in (_choices_error("experiment=leave_one_out", multirun=False) or "")
    assert _choices_error("experiment=paper_table", multirun=True) is None
    assert _choices_error("experiment=demo", multirun=False) is None


def test_deeploc_errors_are_found_behind_the_errors_that_wrap_them() -> None:
    from hydra.utils import instantiate

    from deeploc.data.errors import DatasetError
    from deeploc.features.store import FeatureStoreError
    from deeploc.inference.inputs import InputError
    from deeploc.models.encoders import EncoderError
    from deeploc.runs.checkpoints import ModelError
    from deeploc.training.module import IncompatibleCheckpointError

    for error in (DatasetError, ModelError, FeatureStoreError, EncoderError, IncompatibleCheckpointError, InputError):
        assert issubclass(error, DeeplocError)
    # An error deeploc raises in a constructor that Hydra instantiates comes out wrapped in Hydra's exception.
    node = {"_target_": "deeploc.data.datamodule.LocalizationDataModule", "root": "/data", "subsets": ["a"],
            "split": {"mode": "bogus", "subset": "a"}}  # fmt: skip
    with pytest.raises(InstantiationException) as info:
        instantiate(node)
    found = deeploc_error(info.value)
    assert found is not None and "split.mode 'bogus' is unknown" in str(found)
    # A ValueError raised by deeploc's own code is a user error too; one from elsewhere is a bug.
    from deeploc.config import subset_at

    with pytest.raises(ValueError) as info:
        subset_at(["a"], 3)
    assert deeploc_error(info.value) is info.value
    with pytest.raises(ValueError) as info:
        int("x")
    assert deeploc_error(info.value) is None


def test_epoch_summary_prints_percentages_in_fixed_notation() -> None:
    from deeploc.training.callbacks import epoch_line

    line = epoch_line(2, 20, {"train/loss_epoch": 0.61234, "val/loss": 0.5, "val/iou": 7.465e-11,
                              "val/f1_best": 35.214, "val/ap": 100.0}, lr=1e-3, seconds=1.25)  # fmt: skip
    assert line == (
        "epoch 3/20 | train/loss 0.6123 | val/loss 0.5000 | val/iou 0.00 | val/f1_best 35.21 | val/ap 100.00 | "
        "lr 0.001 | 1.2s"
    )
    assert not re.search(r"\de[-+]\d", line.replace("lr 0.001", ""))
