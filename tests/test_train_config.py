"""Optimizer, LR schedule and loss come from conf/model (``_partial_`` nodes); the study's stay the defaults."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from deeploc.config import CONF_DIR
from deeploc.training.module import LocalizationModule
from deeploc.training.steps import build_model


def _model(*overrides: str) -> LocalizationModule:
    return build_model(_compose("encoder=micro", *overrides))


def test_the_study_adam_and_bce_are_the_defaults_and_model_lr_still_sets_the_rate() -> None:
    model = _model("model.lr=0.01", "model.weight_decay=0.5")
    optimizer = model.configure_optimizers()
    assert type(optimizer) is torch.optim.Adam
    assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"]) == (0.01, 0.5)
    assert type(model.loss_fn) is torch.nn.BCEWithLogitsLoss
    # Saved hyperparameters stay plain values (checkpoints load with weights_only).
    assert model.hparams.optimizer == {"_target_": "torch.optim.adam.Adam"}
    assert model.hparams.loss == {"_target_": "torch.nn.modules.loss.BCEWithLogitsLoss"}
    json.dumps(dict(model.hparams))


def test_the_optimizer_and_loss_are_chosen_by_config_and_rebuilt_from_their_record() -> None:
    model = _model(
        "model.optimizer._target_=torch.optim.SGD",
        "+model.optimizer.momentum=0.9",
        "model.loss._target_=torch.nn.MSELoss",
        "schedule=declip",
    )
    optimizer = model.configure_optimizers()
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["momentum"] == 0.9
    assert type(model.loss_fn) is torch.nn.MSELoss and model.hparams.schedule == "plateau"
    assert model.hparams.optimizer == {"_target_": "torch.optim.sgd.SGD", "momentum": 0.9}
    again = LocalizationModule(
        model.encoder, model.decoder.record(), optimizer=model.hparams.optimizer, loss=model.hparams.loss
    )
    assert type(again.configure_optimizers()) is torch.optim.SGD and type(again.loss_fn) is torch.nn.MSELoss


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_choosing_an_encoder_chooses_its_natural_map_and_an_explicit_feature_or_arch_wins() -> None:
    assert _compose("encoder=clip_micro").feature.name == "layer20"  # DeCLIP's map
    assert _compose("encoder=clip_vitl14").feature.name == "layer20"
    assert _compose("encoder=micro").feature.name == "high_res_feats_1"  # SAM2's, as before
    assert _compose("encoder=clip_micro", "feature=layer12").feature.name == "layer12"
    assert _compose("encoder=clip_micro", "arch=conv4_image_embed").feature.name == "image_embed"
    model = _model("encoder=clip_micro", "encoder.image_size=112")  # builds: the decoder reads a map CLIP returns
    assert list(model.decoder.inputs) == ["layer20"]


def test_a_torch_lr_scheduler_is_chosen_by_config_and_refused_beside_the_plateau_schedule() -> None:
    node = "{_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:2,gamma:0.5}"
    model = _model(f"model.lr_scheduler={node}")
    configured = model.configure_optimizers()
    assert type(configured["lr_scheduler"]["scheduler"]) is torch.optim.lr_scheduler.StepLR
    assert model.hparams.lr_scheduler == {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 2, "gamma": 0.5}
    assert "lr_scheduler" not in _model().hparams  # the study's hyperparameters stay as they were
    with pytest.raises(Exception, match="both set the learning rate"):
        _model(f"model.lr_scheduler={node}", "schedule=declip")
