"""sam2 and Hydra share one global Hydra instance: deeploc must work whichever is imported or run first."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from deeploc.models.encoders.sam2 import SAM2Encoder

CONF = str(Path(__file__).resolve().parents[1] / "conf")
pytestmark = pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights")


def test_sam2_imported_first_then_a_hydra_app_builds_the_encoder_inside_and_after(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sam2  # sam2 initialises GlobalHydra at import, before the application starts
        import hydra
        import torch
        from hydra.utils import instantiate
        from deeploc.models.encoders.sam2 import SAM2Encoder

        @hydra.main(version_base="1.3", config_path={CONF!r}, config_name="train")
        def app(cfg):
            encoder = instantiate(cfg.encoder)
            print("inside", tuple(encoder(torch.rand(1, 3, 64, 64))["image_embed"].shape))

        app()
        encoder = SAM2Encoder("sam2.1_hiera_micro", random_init=True, image_size=256)
        print("after", tuple(encoder(torch.rand(1, 3, 64, 64))["high_res_feats_0"].shape))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "encoder=micro", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "inside (1, 256, 16, 16)" in proc.stdout
    assert "after (1, 32, 64, 64)" in proc.stdout


def test_encoder_builds_while_an_application_owns_hydra_and_after_it_is_released() -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["encoder=micro"])
        inside = instantiate(cfg.encoder)
    after = instantiate(cfg.encoder)
    assert isinstance(inside, SAM2Encoder)
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(inside(x)["image_embed"], after(x)["image_embed"])


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_every_logger_option_composes_and_writes(logger: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"logger={logger}", f"hydra.run.dir={tmp_path}"], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    loggers = [instantiate(node) for node in cfg.logger.values()]
    try:
        for instance in loggers:
            instance.log_metrics({"val/iou": 1.5}, step=0)
            instance.finalize("success")
    finally:
        import wandb

        wandb.finish()  # as train.py does after every job: later W&B users in this process get their own run
    written = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    expected = {"csv": "metrics.csv", "tensorboard": "events.out.tfevents", "wandb": ".wandb"}[logger]
    assert any(expected in name for name in written), written
