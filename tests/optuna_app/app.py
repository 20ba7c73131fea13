"""A tiny Hydra app for the sweeper tests: each job writes a deeploc-style metrics.json with a value computed from
its settings. DEEPLOC_TEST_FAIL (job numbers) makes jobs fail, DEEPLOC_TEST_HOLD (a job number) makes that job wait
until the driver is killed; every job start is appended to ``started.txt``."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from deeploc.cli.app import run_hydra_app
from deeploc.config import CONF_DIR
from deeploc.errors import DeeplocError

# The sweeper's real config (conf/hydra/sweeper/deeploc_optuna.yaml), as deeploc-train gets it.
ConfigStore.instance().store(
    group="hydra/sweeper",
    name="deeploc_optuna",
    node=OmegaConf.load(Path(CONF_DIR) / "hydra/sweeper/deeploc_optuna.yaml"),
)


def _numbers(name: str) -> set[int]:
    return {int(n) for n in os.environ.get(name, "").split(",") if n.strip()}


@hydra.main(version_base="1.3", config_path=".", config_name="search")
def job(cfg: DictConfig) -> float:
    number = HydraConfig.get().job.num
    with open("started.txt", "a") as handle:
        handle.write(f"{number} lr={cfg.lr} width={cfg.width}\n")
    if number in _numbers("DEEPLOC_TEST_HOLD"):
        Path("holding").write_text(str(os.getpid()))
        time.sleep(600)
    if number in _numbers("DEEPLOC_TEST_FAIL"):
        raise DeeplocError(f"trial {number} broke on purpose")
    value = 50.0 - 10 * (math.log10(cfg.lr) + 3) ** 2 + cfg.width
    run = Path(HydraConfig.get().runtime.output_dir)
    (run / "metrics.json").write_text(json.dumps({"status": "finished", "best_val": {"val/iou": value}}))
    return value


if __name__ == "__main__":
    run_hydra_app("optuna-app", job)
