"""`deeploc-extract`: precompute the frozen-encoder features a training run (or a whole sweep) will read.

Same conf/ and the same overrides as ``deeploc-train``; it builds the run's data module (split, validation) and
its encoder and decoder exactly as training does, and fills the feature cache of the maps the decoder reads (of a
multi-head job, ``heads=[...]``: the maps every head reads) with every sample of the run's train / valid / test plan,
with a progress bar. It extracts whatever ``features=auto`` would choose (the cache is what it is asked for), refuses
when the cache cannot fit on its disk, and has nothing to do with ``features=stream``. Run it once before a sweep so
that the sweep's jobs start from a full cache instead of waiting on each other's extraction::

    deeploc-extract data=dolos data.root=/data/wacv_data encoder=hiera_s encoder.checkpoint=/ckpt/sam2.1_hiera_small.pt
    deeploc-extract -m feature=image_embed,high_res_feats_0,high_res_feats_1 ...   # one store per feature
    deeploc-extract experiment=paper_table_multihead subset_index=0 ...            # the maps of all five heads

It never writes into the training run or sweep directories: its own Hydra output goes to
``${paths.output_dir}/extract/``.

Damaged entries: besides computing what is missing, it checks the crc32 of every entry already cached and recomputes
the damaged ones, listing them (training itself only runs the cheap header/size checks and finds a damaged entry
when it reads it, naming the file). ``verify=false`` skips that check (it reads the whole store once).

Split across jobs: ``shard=K num_shards=N`` extracts only shard K of N of the samples (disjoint shards, together all
of them; :func:`deeploc.training.shards.shard_samples`); the per-image entries of the shards add up to the full cache, e.g.
``deeploc-extract -m hydra/launcher=slurm shard=0,1,2,3 num_shards=4 ...`` (docs/cluster.md).
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig

from deeploc.cli.app import run_hydra_app
from deeploc.config import CONF_DIR, to_primitive
from deeploc.registry import import_modules

log = logging.getLogger("deeploc.extract")

# Keep this job's Hydra folders (logs) away from the run / sweep directories that deeploc-report scans.
_OUTPUT_OVERRIDES = (
    "hydra.run.dir='${paths.output_dir}/extract/${run_name:${hydra.overrides.task},${hydra.job.config.override_dirname.exclude_keys}}'",
    "hydra.sweep.dir=${paths.output_dir}/extract/sweeps/${sweep_name}",
    "hydra.output_subdir=null",
    # deeploc-train's pre-launch check refuses a sweep experiment without -m; extracting one configuration of it is fine.
    "~hydra.callbacks.check_before_launch",
    "++shard=0",  # shard K of num_shards N (defaults: everything); set with shard=K num_shards=N
    "++num_shards=1",
    "++verify=true",  # check the crc32 of every cached entry, recompute the damaged ones; verify=false skips it
)


def extract(cfg: DictConfig) -> dict[str, Any]:
    """Fill the feature store the run described by ``cfg`` reads; returns a summary."""
    from deeploc.features.extraction import FeatureCache
    from deeploc.features.serving import decide, stream_without_cache
    from deeploc.training.run import extraction_device
    from deeploc.training.settings import check_settings
    from deeploc.training.shards import shard_samples
    from deeploc.training.steps import build_datamodule

    check_settings(cfg)  # the same checks of settings as deeploc-train, before any work
    shard, num_shards = int(cfg.get("shard") or 0), int(cfg.get("num_shards") or 1)
    encoder, names = _encoder_and_maps(cfg)
    augment = to_primitive(cfg.data.get("augment"))
    decision = stream_without_cache(cfg.features.mode, encoder, augment)  # before the data is indexed
    if decision is None:
        datamodule = build_datamodule(cfg)
        samples = shard_samples(datamodule.plan.all_samples(), shard, num_shards)  # checks 0 <= shard < num_shards
        device = extraction_device(cfg)
        decision = decide(
            cfg.features.mode, encoder, names, samples, cfg.features.dir, device, augment, extracting=True
        )
    if decision.mode == "stream":
        print(f"deeploc-extract: nothing to extract, the run will not read a feature cache: {decision.reason}")
        return {"status": "skipped", "reason": decision.reason}
    cache = FeatureCache(cfg.features.dir, encoder, names)
    sharded = (shard, num_shards) != (0, 1)
    if sharded:
        print(f"deeploc-extract: shard {shard} of {num_shards}: {len(samples)} images", flush=True)
    cache.extract(
        samples,
        encoder,
        batch_size=cfg.features.batch_size,
        device=device,
        verify=bool(cfg.get("verify", True)),  # training itself runs the cheap checks only; a damaged entry passes
        lock_scope=f"shard-{shard}-of-{num_shards}" if sharded else None,  # disjoint shards fill a store in parallel
    )
    print(f"deeploc-extract: {cache.describe()}")
    summary = {"status": "done", "stores": [str(store.path) for store in cache.stores.values()]}
    return {**summary, "shard": shard, "num_shards": num_shards} if sharded else summary


def _encoder_and_maps(cfg: DictConfig) -> tuple[Any, tuple[str, ...]]:
    """The run's encoder and the maps its decoder reads, as deeploc-train builds them; for a multi-head job
    (``heads=[...]``) the maps every head reads."""
    from hydra.core.hydra_config import HydraConfig

    from deeploc.training.steps import build_model

    if not cfg.get("heads"):
        model = build_model(cfg)
        return model.encoder, tuple(model.decoder.inputs)
    from hydra.utils import instantiate

    from deeploc.multihead.heads import compose_heads, head_inputs

    encoder = instantiate(cfg.encoder)
    return encoder, head_inputs(compose_heads(cfg, HydraConfig.get()), encoder)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _app(cfg: DictConfig) -> None:
    import_modules(cfg.get("plugins"), "plugins")  # before anything is built or checked
    extract(cfg)


def main() -> None:
    """Console entry point: ``deeploc-extract [--verbose] [hydra overrides]`` (errors a user can fix: one line)."""
    run_hydra_app("deeploc-extract", _app, _OUTPUT_OVERRIDES)


if __name__ == "__main__":
    main()
