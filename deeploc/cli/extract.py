"""`deeploc-extract`: precompute the frozen-encoder features a training run (or a whole sweep) will read.

Same conf/ and the same overrides as ``deeploc-train``; it builds the run's data module (split, validation) and
its model exactly as training does (:func:`deeploc.train.build_components`), which fills the feature store with every
sample of the run's train / valid / test plan, with a progress bar. Run it once before a sweep so that the sweep's
jobs start from a full cache instead of waiting on each other's extraction::

    deeploc-extract data=dolos data.root=/data/wacv_data encoder=hiera_s encoder.checkpoint=/ckpt/sam2.1_hiera_small.pt
    deeploc-extract -m feature=image_embed,high_res_feats_0,high_res_feats_1 ...   # one store per feature

It never writes into the training run or sweep directories: its own Hydra output goes to
``${paths.output_dir}/extract/``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from deeploc.config import to_primitive

log = logging.getLogger("deeploc.extract")

# Keep this job's Hydra folders (logs) away from the run / sweep directories that deeploc-report scans.
_OUTPUT_OVERRIDES = (
    "hydra.run.dir='${paths.output_dir}/extract/${run_label:${hydra.job.override_dirname}}'",
    "hydra.sweep.dir=${paths.output_dir}/extract/sweeps/${sweep_name}",
    "hydra.output_subdir=null",
)


def extract(cfg: DictConfig) -> dict[str, Any]:
    """Fill the feature store the run described by ``cfg`` reads; returns a summary."""
    from deeploc.features.store import FeatureStore, cache_allowed
    from deeploc.train import build_components

    if not cfg.features.enabled:
        msg = "features.enabled=false (features=none): this run reads no feature cache, nothing to extract"
        print(f"deeploc-extract: {msg}")
        return {"status": "skipped", "reason": msg}
    allowed, reason = cache_allowed(to_primitive(cfg.data.get("augment")))
    if not allowed:
        print(f"deeploc-extract: nothing to extract, the run will not use the cache: {reason}")
        return {"status": "skipped", "reason": reason}
    _, model = build_components(cfg)  # data module + model + attach_feature_store, exactly as deeploc-train
    store = FeatureStore(cfg.features.dir, model.encoder.identity(), model.hparams.feature)
    print(f"deeploc-extract: {store.describe()}")
    return {"status": "done", "store": str(store.path)}


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def _app(cfg: DictConfig) -> None:
    extract(cfg)


def main() -> None:
    """Console entry point: ``deeploc-extract [hydra overrides]``."""
    sys.argv[1:1] = list(_OUTPUT_OVERRIDES)  # user overrides come later and win
    _app()


if __name__ == "__main__":
    main()
