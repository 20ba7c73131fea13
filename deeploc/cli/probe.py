"""`deeploc-probe`: a training-free k-NN probe of an encoder's maps (deeploc/evaluation/knn_probe.py).

Same conf/ and overrides as ``deeploc-train`` (data, split, encoder, metrics); it probes every map the encoder
returns (``encoder.layers`` of a ViT: a layer sweep from one pass; ``probe.maps=[...]`` picks some) and writes
``results.json`` and ``table.md`` under ``${paths.output_dir}/probe/<overrides>``, then refreshes
``${paths.output_dir}/probe/table.md`` with every probe so far (backbones x maps x test subsets)::

    deeploc-probe encoder=dinov2_vitb14 encoder.checkpoint=/w/dinov2_vitb14_pretrain.pth data=dolos data.root=...
    deeploc-probe -m encoder=hiera_s,clip_vitl14,dinov2_vitl14 data=dolos data.root=...

Settings (``probe.*``): ``k`` neighbours (10), ``bank_size`` patches kept per map (65536), ``chunk`` queries per
similarity block (4096), ``seed`` of the patch subsampling (0), ``maps`` (null: all).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from deeploc.cli.app import run_hydra_app
from deeploc.config import CONF_DIR
from deeploc.registry import import_modules

# Before the user's overrides (which win): this job's folders and the probe's settings.
_OVERRIDES = (
    "hydra.run.dir='${paths.output_dir}/probe/${run_name:${hydra.overrides.task},${hydra.job.config.override_dirname.exclude_keys}}'",
    "hydra.sweep.dir=${paths.output_dir}/probe/sweeps/${sweep_name}",
    "++probe.k=10",
    "++probe.bank_size=65536",
    "++probe.chunk=4096",
    "++probe.seed=0",
    "++probe.maps=null",
)


def probe(cfg: DictConfig) -> dict[str, Any]:
    """Run the probe ``cfg`` describes, write its results; returns its record."""
    from deeploc.evaluation.probe_run import run_probe, write_probe

    record = run_probe(cfg)
    table = write_probe(record, Path(HydraConfig.get().runtime.output_dir), Path(cfg.paths.output_dir) / "probe")
    print(f"deeploc-probe: {record['backbone']}: {len(record['results'])} map(s), bank {record['bank_patches']}")
    print((Path(HydraConfig.get().runtime.output_dir) / "table.md").read_text(), end="")
    print(f"deeploc-probe: every probe so far: {table}")
    return record


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _app(cfg: DictConfig) -> None:
    import_modules(cfg.get("plugins"), "plugins")  # an outside encoder is probed like a built-in one
    probe(cfg)


def main() -> None:
    """Console entry point: ``deeploc-probe [--verbose] [hydra overrides]`` (errors a user can fix: one line)."""
    run_hydra_app("deeploc-probe", _app, _OVERRIDES)


if __name__ == "__main__":
    main()
