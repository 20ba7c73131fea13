"""Multi-head jobs and features=auto/cache/stream, in process: which runs a job's heads are, what is refused before
any work, and how the feature cache is chosen (real Hydra composition of conf/, real encoders, real files)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from deeploc.config import CONF_DIR
from deeploc.errors import ConfigError
from deeploc.features import FeatureCache, FeatureStoreError, serving
from deeploc.models.decoders import DecoderError
from deeploc.models.encoders.sam2 import SAM2Encoder
from deeploc.multihead.heads import check_run_folders, compose_heads
from deeploc.multihead.job import _build_heads, train_heads
from deeploc.report.collect import collect_runs
from deeploc.training.run import serve_features
from deeploc.training.steps import build_datamodule
from tests.e2e import TINY_DATA

pytestmark = pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights")

PAPER_TABLE = ["conv4_image_embed", "conv12_image_embed", "conv20_image_embed", "conv20_high_res_feats_0"]
PAPER_TABLE.append("conv20_high_res_feats_1")


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """``job(overrides, multirun=False)``: a job's config as Hydra composes it inside the job (its Hydra config
    installed, its output folder set as Hydra's launcher sets it), outputs under tmp_path."""
    monkeypatch.setenv("DEEPLOC_OUTPUTS", str(tmp_path / "outputs"))
    saved = HydraConfig.instance().cfg

    def make(overrides: list[str], multirun: bool = False, search: Path | None = None) -> DictConfig:
        mode = "MULTIRUN" if multirun else "RUN"
        extra = [f"hydra.searchpath=[file://{search}]"] if search else []
        cfg = compose("train", [f"hydra.mode={mode}", *extra, *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        folder = Path(str(OmegaConf.select(cfg, key))) / ("job" if multirun else "")
        with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = str(folder)
        HydraConfig.instance().set_config(cfg)
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        return task

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield make
    HydraConfig.instance().cfg = saved


def test_paper_table_multihead_heads_are_the_paper_table_runs(job, tmp_path: Path) -> None:
    cfg = job(["experiment=paper_table_multihead", "subset_index=2"], multirun=True)
    assert OmegaConf.to_container(HydraConfig.get().sweeper.params) == {"subset_index": "0,1,2,3"}  # 4 jobs
    heads = compose_heads(cfg, HydraConfig.get())
    assert [h.name for h in heads] == PAPER_TABLE
    for head in heads:
        decoder, feature = re.fullmatch(r"(conv\d+)_(\w+)", head.name).groups()
        assert (head.cfg.decoder.depth, head.cfg.feature.name) == (int(decoder[4:]), feature)
        # The directory `deeploc-train -m experiment=paper_table` gives this configuration's job (deeploc.runs.naming:
        # the sweep keys first), in that experiment's sweep folder.
        expected = (
            tmp_path / "outputs" / "sweeps" / "paper_table" / f"subset_index=2,arch={head.name},experiment=paper_table"
        )
        assert head.run.path == expected
        assert head.cfg.sweep_name == "paper_table" and head.cfg.subset == cfg.subset
        assert head.overrides == ["subset_index=2", "experiment=paper_table", f"arch={head.name}"]
        # The head's config is resolved as its single run resolves it: its checkpoints go to its own directory.
        assert head.cfg.callbacks.best.dirpath == str(expected / "checkpoints")


def test_decoder_heads_use_the_jobs_feature(job) -> None:
    cfg = job(["heads=[conv20,linear]", "feature=high_res_feats_0", "encoder=micro"])
    heads = compose_heads(cfg, HydraConfig.get())
    assert [h.overrides[-1] for h in heads] == ["decoder=conv20", "decoder=linear"]
    assert {h.cfg.feature.name for h in heads} == {"high_res_feats_0"}
    names = [f"decoder={d},feature=high_res_feats_0,encoder=micro" for d in ("conv20", "linear")]
    assert [h.run.path.name for h in heads] == names


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["heads=[conv4_image_embed,nope]"], "unknown head 'nope': it is neither a conf/arch choice"),
        (["heads=[conv4,conv4]"], "names conv4 twice"),
        (["heads=[]"], "must be a list of decoder names"),
        (["heads=[conv4]", "arch=conv20_image_embed"], "arch=conv20_image_embed would set one for all of them"),
        (["heads=[conv4_image_embed]", "feature=high_res_feats_1"], "head conv4_image_embed (the run"),
        (["heads=[conv4,conv20]", "hydra.run.dir=/tmp/one-folder"], "would write into the job's own folder"),
        (["heads=[conv4_high_res_feats_1,conv4]"], "the same configuration under two names"),
    ],
)
def test_bad_head_lists_are_refused_before_any_work(job, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg = job(overrides)
        check_run_folders(compose_heads(cfg, HydraConfig.get()), Path(HydraConfig.get().runtime.output_dir))


def test_deeploc_train_refuses_an_empty_head_list_instead_of_training_one_run(job) -> None:
    from deeploc.cli.train import train

    # Before the refusal existed, heads=[] trained an ordinary run (here: failing on the missing data folder).
    with pytest.raises(ConfigError, match=re.escape("heads=[] must be a list of decoder names")):
        train(job(["heads=[]", "data=dolos", "data.root=/nonexistent/folder"]))


def test_a_head_whose_run_would_use_other_shared_settings_is_refused(job, tmp_path: Path) -> None:
    # A user's arch config may set anything (it is @package _global_): one that changes the batches cannot be a head.
    (tmp_path / "conf" / "arch").mkdir(parents=True)
    (tmp_path / "conf" / "arch" / "big_batches.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /decoder: conv4\ndata:\n  batch_size: 4\n"
    )
    cfg = job(["heads=[conv4_image_embed,big_batches]"], search=tmp_path / "conf")
    with pytest.raises(ConfigError, match=r"head big_batches .* data.batch_size: 4 \(job: 16\)"):
        compose_heads(cfg, HydraConfig.get())


def test_a_head_reading_a_map_the_encoder_lacks_is_refused_naming_it(job) -> None:
    cfg = job(["heads=[conv4_image_embed]", "encoder=clip_micro"])
    heads = compose_heads(cfg, HydraConfig.get())
    with pytest.raises(DecoderError, match=r"head conv4_image_embed: .*\['image_embed'\] are not maps of the encoder"):
        _build_heads(cfg, heads)


@pytest.mark.parametrize(
    ("override", "message"),
    [("trainer.fast_dev_run=1", "trainer.fast_dev_run debugs one run"), ("+trainer.gradient_clip_val=1", "mix")],
)
def test_settings_that_would_couple_the_heads_are_refused(job, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train_heads(job(["heads=[conv4,linear]", override]))


# ------------------------------------------------------------------------------------------ features=auto


def _estimate(images: int, per_image: int, stored: int = 0, disk: int = 10**12, ram: int = 10**11):
    return serving.CacheEstimate(Path("/cache"), images, ("image_embed",), per_image, stored, disk, ram)


def test_auto_caches_what_fits_and_streams_what_does_not() -> None:
    # The Dolos paper table at 1024: 43,200 images x 8 MiB = 337.5 GiB, on a 64 GiB disk with 128 GiB of RAM.
    dolos = _estimate(43_200, 8 * 2**20, disk=64 * 2**30, ram=128 * 2**30)
    mode, why = serving.choose(dolos, "cuda")
    assert mode == "stream" and "337.5 GiB" in why and "64.0 GiB free" in why
    # It fits on a larger disk, but not in RAM: on a GPU recomputing beats reading it back every epoch.
    big_disk = _estimate(43_200, 8 * 2**20, disk=2**40, ram=128 * 2**30)
    assert serving.choose(big_disk, "cuda")[0] == "stream"
    # On the CPU a cache that fits on disk is always the faster serving.
    assert serving.choose(big_disk, "cpu")[0] == "cache"
    # Entries already stored need no room; the free space must hold the rest within DISK_SHARE.
    assert serving.choose(_estimate(100, 10**6, stored=90 * 10**6, disk=20 * 10**6), "cuda")[0] == "cache"
    assert serving.choose(_estimate(100, 10**6, disk=int(100 * 10**6 / serving.DISK_SHARE) - 1), "cpu")[0] == "stream"


def test_estimate_counts_what_the_stores_hold_already(synthetic_data: Path, tmp_path: Path) -> None:
    from deeploc.data.sources import build_source

    samples = build_source("dolos", root=str(synthetic_data)).samples(["inpaint-telea"], ["test"])
    encoder = SAM2Encoder("sam2.1_hiera_micro", random_init=True, image_size=64)
    names = ("image_embed", "high_res_feats_1")
    before = serving.estimate(tmp_path, encoder, names, samples)
    assert before.images == len(samples) and before.stored == 0
    assert not any(tmp_path.iterdir())  # estimating creates nothing
    FeatureCache(tmp_path, encoder, names).extract(samples[:3], encoder, progress=False)
    after = serving.estimate(tmp_path, encoder, names, samples)
    assert after.stored == 3 * after.bytes_per_image
    assert after.needed == (len(samples) - 3) * after.bytes_per_image


def test_features_cache_that_cannot_fit_is_refused_before_any_work(job, shared_workdir: Path) -> None:
    # An encoder input of 131072 px makes each image's maps ~100 GiB: no disk here holds the tiny dataset's cache.
    overrides = [f"data.root={shared_workdir / 'data'}", *TINY_DATA, "encoder.image_size=131072"]
    cfg = job([*overrides, f"features.dir={shared_workdir / 'features-too-big'}", "features=cache"])
    datamodule = build_datamodule(cfg)
    encoder = SAM2Encoder("sam2.1_hiera_micro", random_init=True, image_size=131072)
    with pytest.raises(FeatureStoreError, match=r"features=cache: the feature cache needs .* Use features=stream"):
        serve_features(cfg, datamodule, encoder, ("image_embed",))
    assert not (shared_workdir / "features-too-big").exists()  # refused before anything was written
    auto = job([*overrides, f"features.dir={shared_workdir / 'features-too-big'}"])  # features=auto, the default
    assert serve_features(auto, datamodule, encoder, ("image_embed",)) == "stream"


def test_the_report_does_not_take_a_multi_head_jobs_folder_for_a_run(tmp_path: Path) -> None:
    job_folder = tmp_path / "sweep" / "heads=[conv4,linear]"
    (job_folder / ".hydra").mkdir(parents=True)
    (job_folder / ".hydra" / "config.yaml").write_text("{}\n")
    (job_folder / "heads.json").write_text('{"heads": {}}\n')
    unfinished = tmp_path / "sweep" / "decoder=conv4"
    (unfinished / ".hydra").mkdir(parents=True)
    (unfinished / ".hydra" / "config.yaml").write_text("{}\n")
    runs, missing = collect_runs(tmp_path / "sweep")
    assert runs == [] and [m.path for m in missing] == [unfinished]


def test_deeploc_extract_fills_the_maps_of_every_head(job) -> None:
    from deeploc.cli.extract import _encoder_and_maps

    _, maps = _encoder_and_maps(job(["heads=[conv4_image_embed,conv20_high_res_feats_0]", "encoder=micro"]))
    assert maps == ("image_embed", "high_res_feats_0")  # the union, in the encoder's order
    _, single = _encoder_and_maps(job(["decoder=fusion", "encoder=micro"]))
    assert single == ("image_embed", "high_res_feats_0", "high_res_feats_1")
