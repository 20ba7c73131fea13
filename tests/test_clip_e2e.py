"""CLIP under deeploc's protocol end to end: experiment=backbones (SAM2 beside CLIP) through the real training path,
the feature cache and the report; a sweep over CLIP layers encoding each image once. Test models: SAM2 ``micro`` and
``clip_micro`` (ViT-L-14's block indices, random weights) at 112 px (8 x 8 tokens -> 128 x 128 logits, the tiny
data's size)."""

from __future__ import annotations

import csv
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from deeploc.cli.evaluate import main as eval_main
from deeploc.cli.predict import main as predict_main
from deeploc.cli.report import main as report_main
from deeploc.errors import deeploc_error
from deeploc.models.decoders import UnknownMapError, count_parameters
from deeploc.models.encoders.clip import ARCHITECTURES, CLIPEncoder
from deeploc.training.steps import build_model
from tests.clip_reference import declip_conv_parameters, declip_fc
from tests.e2e import TINY_DATA, run_cli, sweep_jobs

CONF = str(Path(__file__).resolve().parents[1] / "conf")
STUDY_ARCHS = {"conv4_image_embed", "conv12_image_embed", "conv20_image_embed", "conv20_high_res_feats_0"}
STUDY_ARCHS |= {"conv20_high_res_feats_1"}
CLIP_MICRO = ["encoder=clip_micro", "encoder.image_size=112"]
QUICK = ["subset_index=0", "trainer.max_epochs=1", "overlays=0", "logger=csv"]


def tiny(shared: Path, features: Path, *overrides: str) -> list[str]:
    """The tiny generated data of tests/e2e.py with the feature cache in ``features``; encoder from ``overrides``."""
    data = [arg for arg in TINY_DATA if not arg.startswith("encoder=")]
    return [f"data.root={shared / 'data'}", f"features.dir={features}", *data, *overrides]


# ----------------------------------------------------------------------------------------- experiment=backbones
def test_backbones_experiment_pairs_each_configuration_with_its_encoder() -> None:
    jobs = sweep_jobs(CONF, ["experiment=backbones", "data=dolos", "data.root=/data/wacv_data"])
    grid = {(job[0], job[1]) for job in jobs}  # the swept keys come first: arch, subset_index
    archs = {f"arch={arch}" for arch in STUDY_ARCHS | {"conv20_layer20", "conv20_dinov2_layer20"}}
    assert len(jobs) == 28 and grid == {(a, f"subset_index={i}") for a in archs for i in range(4)}
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for job in (job for job in jobs if "subset_index=3" in job):  # one job per configuration
            cfg = compose("train", overrides=job, return_hydra_config=True)
            arch = cfg.hydra.runtime.choices.arch
            assert cfg.data.split.mode == "cross" and cfg.trainer.max_epochs == 20 and cfg.sweep_name == "backbones"
            assert cfg.subset == "pluralistic"
            if arch == "conv20_layer20":  # DeCLIP's: CONV-20 on layer 20 of CLIP ViT-L/14
                assert (cfg.encoder.config, cfg.encoder.layers, cfg.feature.name, cfg.decoder.depth) == (
                    "ViT-L-14",
                    [20],
                    "layer20",
                    20,
                )
            elif arch == "conv20_dinov2_layer20":  # CONV-20 on block 20 of DINOv2 ViT-L/14 (docs/backbones.md)
                assert (cfg.encoder.model, cfg.feature.name, cfg.decoder.depth) == (
                    "vit_large_patch14_dinov2",
                    "layer20",
                    20,
                )
                assert 20 in cfg.encoder.layers
            else:  # the study's backbone for its configurations
                assert cfg.encoder.config == "sam2.1_hiera_s" and cfg.encoder.image_size == 1024


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


@dataclass(frozen=True)
class Sweep:
    path: Path  # the sweep directory: one SAM2 run, two CLIP runs
    features: Path  # the CLIP runs' feature cache
    clip_output: str  # the console of the CLIP multirun


@pytest.fixture(scope="module")
def backbones_sweep(shared_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """One sweep directory: experiment=backbones narrowed to one SAM2 configuration on the micro SAM2, and a sweep over
    two CLIP layers (CONV-4 on layer12 and layer20 of clip_micro, which computes layers 12, 16, 20 and 23)."""
    workdir = tmp_path_factory.mktemp("backbones")
    sam2 = ["experiment=backbones", "arch=conv4_image_embed", "encoder=micro", *QUICK]
    run_cli("deeploc.cli.train", ["-m", *tiny(shared_workdir, shared_workdir / "features", *sam2)], workdir)
    features = workdir / "clip-features"
    layers = ["encoder.layers=[12,16,20,23]", "decoder=conv4", "feature=layer12,layer20", "sweep_name=backbones"]
    proc = run_cli("deeploc.cli.train", ["-m", *tiny(shared_workdir, features, *CLIP_MICRO, *layers, *QUICK)], workdir)
    return Sweep(workdir / "outputs" / "sweeps" / "backbones", features, proc.stdout)


def _run_of(sweep: Path, feature: str) -> tuple[Path, dict]:
    for path in sweep.glob("*/metrics.json"):
        metrics = json.loads(path.read_text())
        if metrics["config"]["feature"] == feature:
            return path.parent, metrics
    raise AssertionError(f"no run on {feature} in {sweep}")


def test_a_sweep_over_clip_layers_encodes_each_image_once(backbones_sweep: Sweep) -> None:
    out = backbones_sweep.clip_output
    # The first job computes the four layers in one pass; the second finds its layer (and the others) cached.
    computed = [line for line in out.splitlines() if ": computing " in line]
    assert sorted(line.split(":")[0] for line in computed) == [f"[feature store] layer{k}" for k in (12, 16, 20, 23)]
    assert out.count("images already cached") == 4
    stores = sorted(p.name.split("-")[2] for p in backbones_sweep.features.glob("clip_micro-*"))
    assert stores == ["layer12", "layer16", "layer20", "layer23"]


def test_a_clip_run_trains_from_the_cache_and_says_what_it_is(backbones_sweep: Sweep) -> None:
    run, metrics = _run_of(backbones_sweep.path, "layer20")
    config = metrics["config"]
    assert metrics["status"] == "finished" and set(metrics["test"]) == set(config["subsets"])
    assert (config["encoder_kind"], config["encoder"], config["decoder"]) == ("clip", "clip_micro", "conv4")
    assert (config["image_size"], config["weights"]) == (112, "random:seed=0")
    # DeCLIP's conv-4 layout on the 64-channel test map: four stages of 64 channels.
    assert config["parameters"] == declip_conv_parameters(4, (64, 64, 64, 64, 64))
    # Trained from the cache: its store of layer 20 holds every image of the run's plan.
    (store,) = backbones_sweep.features.glob("clip_micro-112-layer20-*")
    n_images = config["n_train"] + config["n_valid"] + sum(s["n_images"] for s in metrics["test"].values())
    assert sum(1 for _ in (store / "entries").rglob("*.f16")) == n_images
    log = (run / "train.log").read_text()
    assert "NOTE: CLIP encoder clip_micro had RANDOM weights" in log and "pretrained SAM2" not in log


def test_eval_and_predict_rebuild_the_clip_run(backbones_sweep: Sweep, shared_workdir: Path, tmp_path: Path) -> None:
    """deeploc-eval reproduces the run's test scores from the cache it trained on (the CLIP encoder rebuilt from its
    recorded identity: random seed, layers); deeploc-predict writes a prediction at the image's size."""
    run, metrics = _run_of(backbones_sweep.path, "layer20")
    subset = metrics["config"]["subset"]
    args = [str(run), "--out", str(tmp_path / "eval"), "--subsets", subset, "--device", "cpu"]
    assert eval_main([*args, "--features-dir", str(backbones_sweep.features)]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())["test"][subset]
    for key in ("iou", "f1_fixed", "f1_best", "ap"):
        assert evaluated[key] == pytest.approx(metrics["test"][subset][key], abs=1e-6)
    image = next((shared_workdir / "data").glob(f"**/fake/{subset}/images/test/*.png"))
    out = tmp_path / "predict"
    assert predict_main([str(image), "--model", str(run), "--out", str(out), "--workers", "0", "--quiet"]) == 0
    with Image.open(out / "masks" / f"{image.stem}.png") as mask, Image.open(image) as source:
        assert mask.size == source.size


def test_the_report_puts_both_backbones_in_one_table_and_one_figure(backbones_sweep: Sweep, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert report_main([str(backbones_sweep.path), "--out", str(out)]) == 0
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["decoder"], r["feature"], r["encoder"]) for r in rows} == {
        ("conv4", "image_embed", "sam2.1_hiera_micro"),
        ("conv4", "layer12", "clip_micro"),
        ("conv4", "layer20", "clip_micro"),
    }
    summary = (out / "summary.md").read_text()
    # The configurations are told apart by the settings that differ: the encoder among them.
    assert "| encoder |" in summary.splitlines()[2] and "clip_micro" in summary and "sam2.1_hiera_micro" in summary
    figures = {p.name for p in out.glob("*.png")}
    assert "id_ood.png" in figures and sum(name.startswith("heatmap_") for name in figures) == 3


@pytest.mark.filterwarnings("ignore:CLIP encoder .* RANDOM weights")
def test_a_layer_the_encoder_does_not_return_names_encoder_layers() -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["encoder=clip_micro", "feature=layer12"])
    with pytest.raises(Exception) as raised:
        build_model(cfg)
    error = deeploc_error(raised.value)  # what deeploc-train prints, in one line
    assert isinstance(error, UnknownMapError)
    assert re.search(r"\['layer12'\].*provides \['layer20'\].*encoder\.layers=\[20\]", str(error))


def test_backbones_experiment_runs_tiny_in_one_command_with_its_own_encoder_keys(
    shared_workdir: Path, tmp_path: Path
) -> None:
    """The documented recipe (conf/experiment/backbones.yaml): backbone.sam2 / backbone.clip choose each family's
    encoder, so one command trains a SAM2 and a CLIP configuration on the test models."""
    recipe = ["experiment=backbones", "backbone.sam2=micro", "backbone.clip=clip_micro", "subset_index=0"]
    recipe += ["arch=conv4_image_embed,conv4_layer20", "trainer.max_epochs=1"]
    quick = ["split=in_domain", "overlays=0", "logger=csv", "+trainer.limit_train_batches=1"]
    run_cli("deeploc.cli.train", ["-m", *tiny(shared_workdir, tmp_path / "features", *recipe, *quick)], tmp_path)
    runs = [json.loads(p.read_text()) for p in (tmp_path / "outputs" / "sweeps" / "backbones").glob("*/metrics.json")]
    encoders = {(m["config"]["feature"], m["config"]["encoder"]) for m in runs if m["status"] == "finished"}
    assert encoders == {("image_embed", "sam2.1_hiera_micro"), ("layer20", "clip_micro")}
