"""encoder.adapt=frozen|lora|full (deeploc/models/encoders/adaptation.py) on every encoder, through the real
LightningModule, Lightning checkpoints, exports and model loading; end to end through deeploc-train."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from deeploc.errors import ConfigError, DeeplocError
from deeploc.inference.export import export_decoder, read_export
from deeploc.inference.loading import load_model
from deeploc.models.decoders import build_decoder
from deeploc.models.encoders import build_encoder
from deeploc.models.encoders.adaptation import AdaptationError, merge_lora
from deeploc.multihead.job import train_heads
from deeploc.training.module import LocalizationModule
from tests.e2e import env_for, run_cli, train_args

CONF = str(Path(__file__).resolve().parents[1] / "conf")
pytestmark = pytest.mark.filterwarnings("ignore:.* RANDOM weights")

TIMM = {
    "kind": "timm",
    "model": "vit_small_patch14_dinov2",
    "layers": [3],
    "image_size": 56,
    "model_kwargs": {"depth": 4, "embed_dim": 32, "num_heads": 1},
    "random_init": True,
}
SAM2 = {"kind": "sam2", "config": "sam2.1_hiera_micro", "image_size": 64, "random_init": True, "bf16": False}
CLIP = {"kind": "clip", "config": "clip_micro", "layers": [2], "image_size": 56, "random_init": True}
MAP = {"timm": "layer3", "sam2": "image_embed", "clip": "layer2"}


def module(encoder: dict[str, Any], **adapt: Any) -> LocalizationModule:
    """The real LightningModule: a CONV-4 decoder on the encoder's map, the encoder adapted as asked."""
    built = build_encoder(**{**encoder, **adapt})
    decoder = build_decoder("conv", built.feature_specs, built.target_stride, inputs=MAP[encoder["kind"]], depth=4)
    return LocalizationModule(encoder=built, decoder=decoder)


def batch(size: int = 56, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, size, size, generator=generator)
    return {"image": image, "mask": (torch.rand(2, 1, size, size, generator=generator) > 0.7).float()}


def train_steps(model: LocalizationModule, data: dict[str, torch.Tensor], steps: int = 2) -> None:
    """Steps of the module's own optimizer (configure_optimizers) on its own forward."""
    optimizer = model.configure_optimizers()
    model.train()
    for _ in range(steps):
        logits = model(model.features(data))
        target = F.interpolate(data["mask"], size=logits.shape[-2:], mode="bilinear", antialias=True)
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(logits, target).backward()
        optimizer.step()
    model.eval()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_misspelled_adapt_or_lora_setting_is_one_line() -> None:
    with pytest.raises(AdaptationError, match=r"^encoder.adapt='lroa' is not one of frozen\|lora\|full") as err:
        build_encoder(**{**TIMM, "adapt": "lroa"})
    assert "\n" not in str(err.value)
    with pytest.raises(AdaptationError, match=r"encoder.lora has unknown key\(s\) \['r'\]"):
        build_encoder(**{**TIMM, "adapt": "lora", "lora": {"r": 4}})
    with pytest.raises(AdaptationError, match=r"targets=\['nothing'\] match no .*module names end in"):
        build_encoder(**{**TIMM, "adapt": "lora", "lora": {"targets": ["nothing"]}})


def test_frozen_records_optimizes_and_checkpoints_as_before_adaptation_existed() -> None:
    frozen = module(TIMM, adapt="frozen")
    default = module(TIMM)
    assert frozen.hparams["encoder"] == default.hparams["encoder"] and "adapt" not in frozen.hparams["encoder"]
    assert frozen.encoder.identity() == default.encoder.identity() and "adapt" not in frozen.encoder.identity()
    optimizer = frozen.configure_optimizers()
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["params"] == list(frozen.decoder.parameters())
    assert frozen.encoder.tuned_keys() == [] and frozen.encoder.trainable_parameters() == []
    assert not frozen.encoder(batch()["image"])[MAP["timm"]].requires_grad  # no graph through a frozen encoder
    frozen.train()
    assert not frozen.encoder.training  # a frozen encoder stays in eval mode


@pytest.mark.parametrize("encoder", [TIMM, SAM2, CLIP], ids=lambda e: e["kind"])
def test_lora_trains_only_adapters_and_decoder_and_merging_keeps_the_logits(encoder: dict[str, Any]) -> None:
    frozen = module(encoder)
    lora = module(encoder, adapt="lora", lora={"rank": 4, "alpha": 8})
    data = batch(encoder["image_size"])
    name = MAP[encoder["kind"]]
    # The adapters start at zero (LoRA's B): the adapted encoder starts from the frozen features (up to float
    # rounding where peft recomputes MultiheadAttention's projection weights, CLIP).
    with torch.no_grad():
        torch.testing.assert_close(lora.encoder(data["image"])[name], frozen.encoder(data["image"])[name])
    before = snapshot(lora)
    train_steps(lora, data)
    after = snapshot(lora)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapters = {k for k in before if "lora_" in k}
    tuned = {k for k in changed if k.startswith("encoder.")}
    # Every base weight is bit-identical; the adapters of the blocks computing the map trained (A and B); those
    # of later blocks (CLIP: past layer 2, where the pass stops) get no gradient.
    assert any(k.startswith("decoder.") for k in changed) and tuned and tuned <= adapters
    assert any("lora_A" in k for k in tuned) and any("lora_B" in k for k in tuned)
    assert lora.encoder.identity()["lora"] == {
        "rank": 4,
        "alpha": 8.0,
        "targets": list(type(lora.encoder).lora_targets),
        "dropout": 0.0,
    }
    with torch.no_grad():
        unmerged = lora(lora.features(data))
        assert merge_lora(lora.encoder.model) > 0
        merged = lora(lora.features(data))
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


def test_full_finetuning_trains_every_encoder_weight_at_its_own_rate() -> None:
    full = module(TIMM, adapt="full", lr=1e-5)
    groups = full.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-5]
    assert groups[1]["params"] == list(full.encoder.model.parameters())
    before = snapshot(full.encoder)
    train_steps(full, batch(), steps=1)
    after = snapshot(full.encoder)
    unchanged = {k for k, _ in full.encoder.named_parameters() if torch.equal(before[k], after[k])}
    # Every weight the maps depend on trained; the final norm is not on the path to block 3.
    assert unchanged == {"model.norm.weight", "model.norm.bias"}
    assert full.encoder.identity()["adapt"] == "full" and full.encoder.tuned_keys() == list(before)


def test_cached_features_are_refused_for_an_adapted_encoder() -> None:
    lora = module(TIMM, adapt="lora")
    with pytest.raises(DeeplocError, match=r"encoder.adapt=lora trains the encoder.*set features=stream"):
        lora.served_maps({"features": {"layer3": torch.zeros(2, 32, 4, 4)}})


@pytest.mark.parametrize("adapt", ["lora", "full"])
def test_checkpoint_and_export_carry_the_tuned_encoder(adapt: str, tmp_path: Path) -> None:
    model = module(TIMM, adapt=adapt)
    data = batch()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader([data], batch_size=None))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    saved = torch.load(tmp_path / "model.ckpt", map_location="cpu", weights_only=True)
    encoder_keys = {k.removeprefix("encoder.") for k in saved["state_dict"] if k.startswith("encoder.")}
    assert encoder_keys == set(model.encoder.tuned_keys()) and encoder_keys
    assert saved["deeploc"]["encoder"]["adapt"] == adapt
    model.eval()
    with torch.no_grad():
        expected = model(model.features(data))
    assert not torch.equal(expected, module(TIMM)(module(TIMM).features(data)))
    exported = export_decoder(tmp_path / "model.ckpt", tmp_path / "model.safetensors")
    tensors, _ = read_export(exported)
    assert {k for k in tensors if k.startswith("encoder.")} == {f"encoder.{k}" for k in encoder_keys}
    for source in (tmp_path / "model.ckpt", exported):  # predict / eval load through here
        loaded = load_model(source)
        assert loaded.encoder.adapt == adapt
        with torch.no_grad():
            torch.testing.assert_close(loaded(loaded.features(data)), expected, rtol=0, atol=0)


def _lora_args(shared: Path, *extra: str) -> list[str]:
    return train_args(
        shared,
        "encoder=timm_micro",
        "encoder.adapt=lora",
        "encoder.layers=[5]",
        "feature=layer5",
        "features=stream",
        "logger=csv",
        *extra,
    )


def test_lora_run_trains_and_predicts_end_to_end(shared_workdir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_cli(
        "deeploc.cli.train",
        [*_lora_args(shared_workdir, "trainer.max_epochs=1", "overlays=1"), f"hydra.run.dir={run_dir}"],
        tmp_path,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["test"]
    # The report tells adapted runs apart by the encoder's name (never averaged with frozen ones).
    assert metrics["config"]["encoder"] == "vit_small_patch14_dinov2 (lora rank 8)"
    ckpt = torch.load(next(run_dir.glob("checkpoints/*.ckpt")), map_location="cpu", weights_only=True)
    assert ckpt["deeploc"]["encoder"]["adapt"] == "lora"
    assert any("lora_B" in k for k in ckpt["state_dict"])
    image = next(run_dir.glob("overlays/*/*.png"))
    # Prediction from the run directory rebuilds the encoder with its adapters (exports: test_checkpoint_and_export...).
    run_cli(
        "deeploc.cli.predict",
        [str(image), "--model", str(run_dir), "--out", str(tmp_path / "p"), "--workers", "0"],
        tmp_path,
    )
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["model"]["encoder"]["adapt"] == "lora"


def test_a_multi_head_job_refuses_an_adapted_encoder() -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["encoder=timm_micro", "encoder.adapt=lora", "heads=[conv4,conv12]"])
    with pytest.raises(ConfigError, match=r"^encoder.adapt=lora: a multi-head job shares one frozen encoder pass"):
        train_heads(cfg)


@pytest.mark.slow  # ~5 min on the shared CPU; default suite: test_lora_run_trains_and_predicts_end_to_end, and
# test_checkpoint_and_export_carry_the_tuned_encoder (adapters saved and reloaded through Lightning)
def test_lora_resume_after_kill_equals_an_uninterrupted_run(shared_workdir: Path, tmp_path: Path) -> None:
    epochs = 4
    common = _lora_args(shared_workdir, f"trainer.max_epochs={epochs}", "overlays=0")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("deeploc.cli.train", [*common, f"hydra.run.dir={straight}"], tmp_path)
    cmd = [sys.executable, "-m", "deeploc.cli.train", *common, f"hydra.run.dir={resumed}"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = resumed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] < epochs - 1
    out = run_cli("deeploc.cli.train", [*common, f"hydra.run.dir={resumed}"], tmp_path)
    assert "resuming from" in out.stdout + out.stderr
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and any("lora_" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    straight_test = json.loads((straight / "metrics.json").read_text())["test"]
    assert json.loads((resumed / "metrics.json").read_text())["test"] == straight_test
