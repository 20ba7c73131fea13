"""CLIP under deeploc's protocol end to end: experiment=backbones (SAM2 beside CLIP) through the real training path,
the feature cache and the report; a sweep over CLIP layers encoding each image once. Test models: SAM2 ``micro`` and
``clip_micro`` (ViT-L-14's block indices, random weights) at 112 px (8 x 8 tokens -> 128 x 128 logits, the tiny
data's size)."""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from deeploc.cli.report import main as report_main
from deeploc.errors import deeploc_error
from deeploc.models.decoders import UnknownMapError, count_parameters
from deeploc.models.encoders.clip import ARCHITECTURES, CLIPEncoder
from deeploc.train import build_model
from tests.clip_reference import declip_conv_parameters, declip_fc
from tests.e2e import TINY_DATA, run_cli, sweep_jobs

CONF = str(Path(__file__).resolve().parents[1] / "conf")
STUDY_ARCHS = {"conv4_image_embed", "conv12_image_embed", "conv20_image_embed", "conv20_high_res_feats_0"}
STUDY_ARCHS |= {"conv20_high_res_feats_1"}
CLIP_MICRO = ["encoder=clip_micro", "encoder.image_size=112"]
QUICK = ["subset_index=0", "trainer.max_epochs=2", "overlays=0", "logger=csv"]


def tiny(shared: Path, features: Path, *overrides: str) -> list[str]:
    """The tiny generated data of tests/e2e.py with the feature cache in ``features``; encoder from ``overrides``."""
    data = [arg for arg in TINY_DATA if not arg.startswith("encoder=")]
    return [f"data.root={shared / 'data'}", f"features.dir={features}", *data, *overrides]


# ----------------------------------------------------------------------------------------- experiment=backbones
def test_backbones_experiment_pairs_each_configuration_with_its_encoder() -> None:
    jobs = sweep_jobs(CONF, ["experiment=backbones", "data=dolos", "data.root=/data/wacv_data"])
    assert len(jobs) == 6 * 4
    seen = set()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for job in jobs:
            cfg = compose("train", overrides=job, return_hydra_config=True)
            arch = cfg.hydra.runtime.choices.arch
            assert cfg.data.split.mode == "cross" and cfg.trainer.max_epochs == 20 and cfg.sweep_name == "backbones"
            expected = ("ViT-L-14", "layer20", 20) if arch == "conv20_layer20" else ("sam2.1_hiera_s", None, None)
            assert cfg.encoder.config == expected[0], job
            if arch == "conv20_layer20":
                assert (cfg.feature.name, cfg.decoder.depth) == expected[1:]
            seen.add((arch, cfg.subset))
    assert {arch for arch, _ in seen} == STUDY_ARCHS | {"conv20_layer20"} and len(seen) == 24


@pytest.mark.filterwarnings("ignore:CLIP encoder .* RANDOM weights")
def test_conv_n_on_clip_has_declips_layout_and_size_through_the_training_path() -> None:
    """arch=conv<N>_layer20 builds DeCLIP's conv-N: the decoder the training job builds (deeploc.train.build_model,
    CLIP ViT-L/14 with random weights) has DeCLIP's modules in DeCLIP's order and its parameter count."""
    random = ["encoder.random_init=true", "encoder.checkpoint=null"]
    vit = ARCHITECTURES["ViT-L-14"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=backbones", "arch=conv20_layer20", *random])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model(cfg)
        decoder = model.decoder
        assert count_parameters(decoder) == declip_conv_parameters(20)
        assert round(count_parameters(decoder) / 1e6, 1) == 52.2
        reference = declip_fc(20)
        ours = [*decoder.body, decoder.head]
        assert [type(m) for m in ours] == [type(m) for m in reference]
        shapes = [tuple(p.shape) for p in decoder.parameters()]
        assert shapes == [tuple(p.shape) for p in reference.parameters()]
        for depth, millions in ((4, 17.4), (12, 34.8)):
            cfg = compose("train", overrides=[f"arch=conv{depth}_layer20", *random])
            specs = {"layer20": (vit.width, vit.patch_size)}
            built = instantiate(cfg.decoder)(feature_specs=specs, target_stride=CLIPEncoder.target_stride)
            assert count_parameters(built) == declip_conv_parameters(depth)
            assert round(count_parameters(built) / 1e6, 1) == millions


@pytest.fixture(scope="module")
def backbones_sweep(shared_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """experiment=backbones narrowed to one SAM2 and the CLIP configuration, one training subset, tiny models."""
    workdir = tmp_path_factory.mktemp("backbones")
    features = shared_workdir / "features"
    sam2 = tiny(shared_workdir, features, "experiment=backbones", "arch=conv4_image_embed", "encoder=micro", *QUICK)
    run_cli("deeploc.train", ["-m", *sam2], workdir)
    clip = tiny(shared_workdir, features, "experiment=backbones", "arch=conv20_layer20", *CLIP_MICRO, *QUICK)
    run_cli("deeploc.train", ["-m", *clip], workdir)
    return workdir / "outputs" / "sweeps" / "backbones"


def _run_of(sweep: Path, encoder: str) -> tuple[Path, dict]:
    for path in sweep.glob("*/metrics.json"):
        metrics = json.loads(path.read_text())
        if metrics["config"]["encoder"] == encoder:
            return path.parent, metrics
    raise AssertionError(f"no {encoder} run in {sweep}")


def test_a_clip_run_trains_from_the_cache_and_says_what_it_is(backbones_sweep: Path, shared_workdir: Path) -> None:
    run, metrics = _run_of(backbones_sweep, "clip_micro")
    config = metrics["config"]
    assert metrics["status"] == "finished" and set(metrics["test"]) == set(config["subsets"])
    assert (config["encoder_kind"], config["decoder"], config["feature"]) == ("clip", "conv20", "layer20")
    assert (config["image_size"], config["weights"]) == (112, "random:seed=0")
    # DeCLIP's conv-20 layout on the 64-channel test map: four stages of 64 channels.
    assert config["parameters"] == declip_conv_parameters(20, (64, 64, 64, 64, 64))
    # Trained from the cache: one store of layer 20 holding every image of the run's plan.
    (store,) = (shared_workdir / "features").glob("clip_micro-112-layer20-*")
    n_images = config["n_train"] + config["n_valid"] + sum(s["n_images"] for s in metrics["test"].values())
    assert sum(1 for _ in (store / "entries").rglob("*.f16")) == n_images
    log = (run / "train.log").read_text()
    assert "NOTE: CLIP encoder clip_micro had RANDOM weights" in log and "pretrained SAM2" not in log
    with open(run / "csv" / "metrics.csv") as handle:
        losses = [float(row["train/loss_epoch"]) for row in csv.DictReader(handle) if row.get("train/loss_epoch")]
    assert len(losses) == 2


def test_the_report_puts_both_backbones_in_one_table_and_one_figure(backbones_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert report_main([str(backbones_sweep), "--out", str(out)]) == 0
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["decoder"], r["feature"], r["encoder"]) for r in rows} == {
        ("conv4", "image_embed", "sam2.1_hiera_micro"),
        ("conv20", "layer20", "clip_micro"),
    }
    summary = (out / "summary.md").read_text()
    # The configurations are told apart by the settings that differ: the encoder among them.
    assert "| encoder |" in summary.splitlines()[2] and "clip_micro" in summary and "sam2.1_hiera_micro" in summary
    figures = {p.name for p in out.glob("*.png")}
    assert "id_ood.png" in figures and sum(name.startswith("heatmap_") for name in figures) == 2


# ------------------------------------------------------------------------------------------ several CLIP layers
def test_a_sweep_over_clip_layers_encodes_each_image_once(shared_workdir: Path, tmp_path: Path) -> None:
    layers = "encoder.layers=[12,16,20,23]"
    sweep = ["decoder=conv4", "feature=layer12,layer20", "trainer.max_epochs=1", *QUICK[:1], *QUICK[2:]]
    args = tiny(shared_workdir, tmp_path / "features", *CLIP_MICRO, layers, *sweep)
    proc = run_cli("deeploc.train", ["-m", *args], tmp_path)
    out = proc.stdout
    # The first job computes the four layers in one pass; the second finds its layer (and the others) cached.
    computed = [line for line in out.splitlines() if ": computing " in line]
    assert sorted(line.split(":")[0] for line in computed) == [f"[feature store] layer{k}" for k in (12, 16, 20, 23)]
    assert out.count("images already cached") == 4
    stores = sorted(p.name.split("-")[2] for p in (tmp_path / "features").glob("clip_micro-*"))
    assert stores == ["layer12", "layer16", "layer20", "layer23"]
    runs = [json.loads(p.read_text())["config"] for p in (tmp_path / "outputs").glob("sweeps/*/*/metrics.json")]
    assert sorted(c["feature"] for c in runs) == ["layer12", "layer20"]


@pytest.mark.filterwarnings("ignore:CLIP encoder .* RANDOM weights")
def test_a_layer_the_encoder_does_not_return_names_encoder_layers() -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["encoder=clip_micro", "feature=layer12"])
    with pytest.raises(Exception) as raised:
        build_model(cfg)
    error = deeploc_error(raised.value)  # what deeploc-train prints, in one line
    assert isinstance(error, UnknownMapError)
    assert re.search(r"\['layer12'\].*provides \['layer20'\].*encoder\.layers=\[20\]", str(error))
