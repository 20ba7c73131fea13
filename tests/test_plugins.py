"""Plug-ins end to end: a decoder written outside deeploc, the fusion decoder and the linear probe train, resume,
evaluate, export and predict exactly like the study's CONV-N; loading never imports what a file names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from deeploc.inference.loading import load_model
from deeploc.registry import UnknownComponentError
from deeploc.runs.checkpoints import ModelError
from deeploc.testing import SAM2_SPECS
from deeploc.training.module import LocalizationModule
from tests.e2e import env_for, run_cli, train_args

pytestmark = [
    pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights"),
    pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode"),
]

# A user's decoder, in the user's own module and config folder (the README's and docs/extending.md's recipe).
USER_MODULE = '''
import torch
import torch.nn.functional as F
from torch import nn

from deeploc.models.decoders import DECODERS, Decoder, upsample_steps


@DECODERS.register("{name}")
class TinyHead(Decoder):
    """1x1 conv to `width`, ReLU, 3x3 conv to one logit, bilinear upsampling to the target stride."""

    n_inputs = 1

    def __init__(self, feature_specs, target_stride=4.0, inputs=None, width=8):
        super().__init__(feature_specs, target_stride, inputs)
        spec = self.in_specs[self.inputs[0]]
        self.scale = 2 ** upsample_steps(spec.stride, self.target_stride, "tiny head")
        self.proj = nn.Conv2d(spec.channels, width, 1)
        self.out = nn.Conv2d(width, 1, 3, padding=1)

    def decode(self, features):
        logits = self.out(torch.relu(self.proj(features[self.inputs[0]])))
        return F.interpolate(logits, scale_factor=self.scale, mode="bilinear", align_corners=False)
'''
USER_CONFIG = """\
_target_: user_decoders.TinyHead
_partial_: true
inputs: ${feature.name}
width: 8
"""


@pytest.fixture(scope="module")
def user_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding user_decoders.py (registers "tiny_head") and conf/decoder/tiny_head.yaml."""
    home = tmp_path_factory.mktemp("user-plugin")
    (home / "user_decoders.py").write_text(USER_MODULE.format(name="tiny_head"))
    (home / "conf" / "decoder").mkdir(parents=True)
    (home / "conf" / "decoder" / "tiny_head.yaml").write_text(USER_CONFIG)
    return home


def _user_env(workdir: Path, plugin: Path) -> dict[str, str]:
    env = env_for(workdir)
    env["PYTHONPATH"] = f"{plugin}:{env.get('PYTHONPATH', '')}"
    return env


def _run(module: str, args: list[str], workdir: Path, plugin: Path, check: bool = True):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=workdir,
        env=_user_env(workdir, plugin),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def test_a_decoder_defined_outside_deeploc_trains_resumes_evaluates_exports_and_predicts(
    user_plugin: Path, shared_workdir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    common = [
        "--config-dir",
        str(user_plugin / "conf"),
        *train_args(shared_workdir, "decoder=tiny_head", "logger=csv", "overlays=1", f"hydra.run.dir={run_dir}"),
    ]
    _run("deeploc.cli.train", [*common, "trainer.max_epochs=1"], tmp_path, user_plugin)
    first = json.loads((run_dir / "metrics.json").read_text())
    assert first["config"]["decoder"] == "tiny_head" and first["config"]["decoder_name"] == "tiny_head"
    assert first["config"]["parameters"] == 64 * 8 + 8 + 8 * 9 + 1  # proj 64->8 (1x1) + out 8->1 (3x3)

    # Resume: the unfinished run (its metrics.json removed) continues from last.ckpt into a second epoch.
    (run_dir / "metrics.json").unlink()
    resumed = _run("deeploc.cli.train", [*common, "trainer.max_epochs=2"], tmp_path, user_plugin)
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2

    # Loading elsewhere needs the class registered: deeploc never imports what a file names ...
    refused = _run("deeploc.cli.evaluate", [str(run_dir), "--out", str(tmp_path / "e0")], tmp_path, user_plugin, False)
    assert refused.returncode == 1 and "unknown decoder 'tiny_head'" in refused.stderr and "--import" in refused.stderr
    # ... and with --import the run is evaluated exactly like a built-in decoder: the run's own test scores.
    _run(
        "deeploc.cli.evaluate",
        [str(run_dir), "--import", "user_decoders", "--out", str(tmp_path / "e")],
        tmp_path,
        user_plugin,
    )
    evaluated = json.loads((tmp_path / "e" / "eval.json").read_text())["test"]
    trained = json.loads((run_dir / "metrics.json").read_text())["test"]
    for subset, scores in trained.items():
        assert evaluated[subset]["iou"] == pytest.approx(scores["iou"], abs=1e-4)
    exported = tmp_path / "tiny.safetensors"
    _run(
        "deeploc.cli.export", [str(run_dir), "--import", "user_decoders", "--out", str(exported)], tmp_path, user_plugin
    )
    image = next(run_dir.glob("overlays/*/*.png"))
    predict = ["--model", str(exported), "--import", "user_decoders", "--out", str(tmp_path / "p"), "--workers", "0"]
    _run("deeploc.cli.predict", [str(image), *predict], tmp_path, user_plugin)
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["model"]["decoder"]["name"] == "tiny_head"


def test_an_unregistered_decoder_trains_but_loading_it_names_the_fix(tmp_path: Path) -> None:
    from deeploc.models.decoders import Decoder

    class Unregistered(Decoder):
        n_inputs = 1

        def __init__(self, feature_specs, target_stride=4.0, inputs=None) -> None:
            super().__init__(feature_specs, target_stride, inputs)
            self.proj = torch.nn.Conv2d(self.in_specs[self.inputs[0]].channels, 1, 1)

        def decode(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.nn.functional.interpolate(self.proj(features[self.inputs[0]]), scale_factor=4)

    encoder = {"config": "sam2.1_hiera_micro", "image_size": 64, "random_init": True}
    model = LocalizationModule(encoder=encoder, decoder=Unregistered(SAM2_SPECS, 4.0, "image_embed"))
    batch = {"features": {"image_embed": torch.randn(2, 256, 4, 4)}, "mask": (torch.rand(2, 1, 16, 16) > 0.5).float()}
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader([batch], batch_size=None))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    record = model.decoder.record()
    assert record["name"] is None and record["class"].endswith("Unregistered")
    with pytest.raises(ModelError, match=r"trained without being registered.*DECODERS\.register"):
        load_model(tmp_path / "model.ckpt")


def test_a_checkpoint_never_makes_deeploc_import_a_module(tmp_path: Path) -> None:
    """A record naming a module to import (even a real one) selects nothing: only registered names load."""
    from deeploc.models.decoders import decoder_from_record

    record = {"name": "os.system", "class": "os.system", "options": {}, "feature_specs": {}, "target_stride": 4.0}
    with pytest.raises(UnknownComponentError, match=r"unknown decoder 'os\.system'.*never imports a module"):
        decoder_from_record(record)


@pytest.mark.slow  # ~27 s each; default suite: the decoder contract tests, fusion as a multi-head head, a user decoder
@pytest.mark.parametrize(("decoder", "feature"), [("fusion", "high_res_feats_1"), ("linear", "image_embed")])
def test_new_decoders_train_from_the_cache_as_on_the_fly_and_round_trip_through_export(
    decoder: str, feature: str, shared_workdir: Path, tmp_path: Path
) -> None:
    runs = {}
    for features in ("cache", "stream"):
        runs[features] = tmp_path / features
        args = train_args(
            shared_workdir,
            f"decoder={decoder}",
            f"feature={feature}",
            f"features={features}",
            "trainer.max_epochs=1",
            "logger=csv",
            "overlays=1",
            f"hydra.run.dir={runs[features]}",
        )
        run_cli("deeploc.cli.train", args, tmp_path)
    cached, fly = (json.loads((runs[k] / "metrics.json").read_text()) for k in ("cache", "stream"))
    inputs = ["image_embed", "high_res_feats_0", "high_res_feats_1"] if decoder == "fusion" else [feature]
    assert cached["config"]["feature"] == "+".join(inputs) and cached["config"]["decoder_name"] == decoder
    # fp16 cached maps vs fp32 maps computed on the fly: the same training up to float16 rounding.
    for subset, scores in cached["test"].items():
        assert fly["test"][subset]["ap"] == pytest.approx(scores["ap"], abs=1.0)
    ckpt = {k: torch.load(runs[k] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for k in runs}
    for key, value in ckpt["cache"].items():
        if value.is_floating_point() and value.ndim == 4:  # conv weights
            assert torch.linalg.norm(value - ckpt["stream"][key]) <= 0.02 * torch.linalg.norm(value) + 1e-6, key

    exported = tmp_path / "model.safetensors"
    run_cli("deeploc.cli.export", [str(runs["cache"]), "--out", str(exported)], tmp_path)
    from_run, from_export = load_model(runs["cache"]), load_model(exported)
    images = torch.rand(2, 3, 128, 128)
    assert torch.equal(from_run.predict_probabilities(images), from_export.predict_probabilities(images))
    assert from_export.decoder.label == cached["config"]["decoder"]

    # The report names the rows by decoder and its maps, with the decoder's parameter count.
    report_dir = tmp_path / "report"
    shutil.copytree(runs["cache"], tmp_path / "sweep" / "run")
    run_cli("deeploc.cli.report", [str(tmp_path / "sweep"), "--out", str(report_dir)], tmp_path)
    text = (report_dir / "report.md").read_text()
    params = cached["config"]["parameters"]
    assert f"| {cached['config']['decoder']} | {'+'.join(inputs)} | {params / 1e6:.2f} M |" in text
