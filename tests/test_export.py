"""deeploc-export: one small safetensors file that rebuilds the trained model exactly, and refuses wrong pairings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deeploc.cli.export import main as export_main
from deeploc.cli.predict import main as predict_main
from deeploc.export import (
    FORMAT,
    IncompatibleModelError,
    MissingCheckpointError,
    ModelError,
    load_exported,
    load_model,
    read_export,
)
from deeploc.models.decoders import ConvDecoder
from deeploc.models.encoder import file_digest, save_random_checkpoint
from deeploc.module import LocalizationModule
from deeploc.predict import predict_images
from tests.test_predict import shared_base, train_run

pytestmark = [
    pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights"),
    pytest.mark.filterwarnings("ignore:Found keys that are in the model state dict"),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The same run as tests/test_predict.py (trained once per session).
    return train_run(shared_base(tmp_path_factory), "random-encoder", "trainer.max_epochs=2")


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "decoder.safetensors"
    assert export_main([str(run_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(64, 64, 3), (40, 90, 3), (9, 7, 3)]]


def test_export_is_one_small_self_describing_file(exported: Path, run_dir: Path) -> None:
    assert exported.stat().st_size < 1_000_000
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with safe_open(str(exported), framework="pt") as handle:
        keys = set(handle.keys())
        header = json.loads(handle.metadata()["deeploc"])
    assert keys == set(ConvDecoder("high_res_feats_1", 4).state_dict())  # decoder only, no encoder weights
    assert header["format"] == FORMAT and header["deeploc_version"]
    assert header["decoder"]["feature"] == "high_res_feats_1" and header["decoder"]["depth"] == 4
    assert header["encoder"] == ckpt["deeploc"]["encoder"]
    assert header["encoder"]["config"] == "sam2.1_hiera_micro" and header["encoder"]["weights"] == "random:seed=0"
    assert header["input"]["image_size"] == 64
    assert header["test"] == metrics["test"]
    assert header["training"]["config"] == metrics["config"]
    assert header["training"]["data"]["subsets"] == metrics["config"]["subsets"]
    assert header["decoder_sha256"].startswith("sha256:")
    for key, value in ckpt["state_dict"].items():
        if key.startswith("decoder."):
            assert torch.equal(read_export(exported)[0][key.removeprefix("decoder.")], value)


def test_export_then_import_gives_identical_outputs(exported: Path, run_dir: Path, images) -> None:
    reference = LocalizationModule.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt", map_location="cpu")
    reference.eval()
    from_export, metadata = load_exported(exported)
    from_run = load_model(run_dir)
    from_ckpt = load_model(run_dir / "checkpoints" / "best.ckpt")
    assert metadata["decoder"]["feature"] == from_export.hparams.feature
    for image, p_export, p_run, p_ckpt in zip(
        images,
        predict_images(from_export, images, batch_size=1),
        predict_images(from_run, images, batch_size=1),
        predict_images(from_ckpt, images, batch_size=1),
    ):
        expected = reference.predict_probabilities(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0]
        assert torch.equal(p_export, expected) and torch.equal(p_run, expected) and torch.equal(p_ckpt, expected)


def test_predict_cli_accepts_the_export(exported: Path, run_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "in" / "face.png"
    image.parent.mkdir()
    from PIL import Image

    Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(image)
    for model, out in ((exported, tmp_path / "a"), (run_dir, tmp_path / "b")):
        assert predict_main([str(image), "--model", str(model), "--out", str(out), "--save-probs", "--quiet"]) == 0
    assert np.array_equal(
        np.load(tmp_path / "a" / "probs" / "face.npy"), np.load(tmp_path / "b" / "probs" / "face.npy")
    )
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["model"]["encoder"]["weights"] == "random:seed=0"


def test_export_for_another_encoder_or_feature_is_refused_naming_both(exported: Path) -> None:
    _, metadata = read_export(exported)
    other_seed = {**metadata["encoder"], "weights": "random:seed=1"}
    with pytest.raises(IncompatibleModelError, match=r"random:seed=0.*random:seed=1"):
        load_exported(exported, expect_encoder=other_seed)
    other_config = {**metadata["encoder"], "config": "sam2.1_hiera_t", "image_size": 1024}
    with pytest.raises(IncompatibleModelError, match=r"sam2.1_hiera_micro.*sam2.1_hiera_t"):
        load_model(exported, expect_encoder=other_config)
    with pytest.raises(IncompatibleModelError, match=r"'high_res_feats_1'.*'image_embed'"):
        load_model(exported, expect_feature="image_embed")
    # The matching pair loads.
    load_exported(exported, expect_encoder=metadata["encoder"], expect_feature="high_res_feats_1")


def test_damaged_or_foreign_files_are_refused(exported: Path, tmp_path: Path) -> None:
    state, metadata = read_export(exported)
    header = {"deeploc": json.dumps(metadata)}
    tampered = {k: v.clone() for k, v in state.items()}
    tampered["head.bias"] += 1
    save_file(tampered, tmp_path / "tampered.safetensors", metadata=header)
    with pytest.raises(ModelError, match=r"digest .* differs from the recorded"):
        load_model(tmp_path / "tampered.safetensors")
    # Weights of another architecture under this metadata (a hand-edited header) are refused, naming both.
    wrong = ConvDecoder("image_embed", 4).state_dict()
    from deeploc.export import write_export

    write_export(tmp_path / "wrong.safetensors", wrong, metadata)
    with pytest.raises(IncompatibleModelError, match="not a CONV-4 decoder on feature 'high_res_feats_1'"):
        load_model(tmp_path / "wrong.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ModelError, match="not a deeploc decoder export"):
        load_model(tmp_path / "plain.safetensors")


class _Pickled:
    """Unpickling this creates a marker file: proof that a loader executed pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_never_unpickles(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    for name in ("evil.safetensors", "evil.ckpt"):
        torch.save({"state_dict": {}, "deeploc": {}, "hyper_parameters": _Pickled(marker)}, tmp_path / name)
        with pytest.raises(ModelError):
            load_model(tmp_path / name)
    assert not marker.exists()


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run trained on a SAM2 checkpoint file (official format; random weights written by save_random_checkpoint)."""
    base = shared_base(tmp_path_factory)
    sam2 = save_random_checkpoint(base / "sam2" / "micro-seed5.pt", "sam2.1_hiera_micro", seed=5)
    run = train_run(
        base, "checkpoint-encoder", f"encoder.checkpoint={sam2}", "encoder.random_init=false", "trainer.max_epochs=1"
    )
    return run, sam2


def test_sam2_checkpoint_is_verified_by_digest(checkpoint_run, run_dir: Path, tmp_path: Path, images, capsys) -> None:
    run, sam2 = checkpoint_run
    right = f"sha256:{file_digest(sam2)}"
    out = tmp_path / "decoder.safetensors"
    assert export_main([str(run), "--out", str(out)]) == 0
    assert read_export(out)[1]["encoder"]["weights"] == right

    with pytest.raises(MissingCheckpointError, match=rf"{right}.*--sam2-checkpoint"):
        load_exported(out)
    other = save_random_checkpoint(tmp_path / "other.pt", "sam2.1_hiera_micro", seed=6)
    wrong = f"sha256:{file_digest(other)}"
    with pytest.raises(IncompatibleModelError, match=rf"{wrong}.*{right}"):
        load_exported(out, sam2_checkpoint=other)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(images[1]).save(image)
    rc = predict_main([str(image), "--model", str(out), "--sam2-checkpoint", str(other), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 1 and wrong in err and right in err

    # The right checkpoint rebuilds the trained model exactly; a run directory finds the path it was trained with.
    model, _ = load_exported(out, sam2_checkpoint=sam2)
    from_run = load_model(run)
    for a, b in zip(predict_images(model, images, 1), predict_images(from_run, images, 1)):
        assert torch.equal(a, b)
    # A checkpoint given for a decoder trained on random weights is a mismatch too.
    with pytest.raises(IncompatibleModelError, match=r"RANDOM weights \(random:seed=0\).*other.pt"):
        load_model(run_dir, sam2_checkpoint=other)


def test_export_cli_refuses_what_it_cannot_export(tmp_path: Path, capsys) -> None:
    assert export_main([str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty-run").mkdir()
    assert export_main([str(tmp_path / "empty-run")]) == 1
    assert "has no checkpoint" in capsys.readouterr().err
