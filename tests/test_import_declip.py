"""``deeploc-import declip``: a DeCLIP-format decoder written here (random weights, DeCLIP's keys and nesting) becomes
a deeploc export that ``deeploc-predict`` and ``deeploc-eval`` run on CLIP ViT-L/14 (random weights in OpenAI's
half-precision format), with the probabilities and scores of a reference forward: OpenAI's model code up to block
20, DeCLIP's map and DeCLIP's decoder on the same weights (tests/clip_reference.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

from deeploc.cli.evaluate import main as eval_main
from deeploc.cli.import_decoder import main as import_main
from deeploc.cli.predict import main as predict_main
from deeploc.data.datasets import ImageMaskDataset
from deeploc.data.layout import index_subsets
from deeploc.data.synthetic import generate_dataset
from deeploc.inference.export import read_export
from deeploc.metrics import LocalizationMetrics
from deeploc.models.encoders.clip import ARCHITECTURES
from tests.clip_reference import CLIP_MEAN, CLIP_STD, declip_fc, openai_layer_map, openai_model_code

VIT = ARCHITECTURES["ViT-L-14"]
LAYER, DEPTH, SUBSET = 20, 4, "inpaint-telea"


def declip_payload(fc: torch.nn.Module, **meta: Any) -> dict[str, Any]:
    """DeCLIP's save_networks format: the localisation model's state dict (decoder ``fc.*``, frozen CLIP under
    ``model.``, here two of its tensors), optimizer, step counter, layer and decoder names."""
    model = {
        "model.visual.conv1.weight": torch.zeros(VIT.width, 3, VIT.patch_size, VIT.patch_size),
        "model.visual.positional_embedding": torch.zeros(257, VIT.width),
        **{f"fc.{k}": v for k, v in fc.state_dict().items()},
    }
    payload = {
        "model": model,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "total_steps": 777,
        "feature_layer": f"layer{LAYER}",
        "decoder_type": f"conv-{DEPTH}",
    }
    return {**payload, **meta}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The DeCLIP file, the CLIP weights file, a one-image test split, and the reference logits."""
    root = tmp_path_factory.mktemp("declip")
    torch.manual_seed(0)
    openai = openai_model_code()
    visual = openai.VisionTransformer(224, VIT.patch_size, VIT.width, VIT.layers, VIT.heads, VIT.output_dim).eval()
    state = {k: v.half() for k, v in visual.state_dict().items()}  # OpenAI's file holds float16 weights
    visual.load_state_dict({k: v.float() for k, v in state.items()})
    weights = root / "ViT-L-14-random.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in state.items()}, str(weights))
    fc = declip_fc(DEPTH, seed=5)
    declip = root / f"ViT_layer{LAYER}_conv-{DEPTH}_lama.pth"
    torch.save(declip_payload(fc), declip)

    data = generate_dataset(root / "data", n_train=1, n_valid=1, n_test=1, size=256, n_real=0)
    samples = index_subsets(data, [SUBSET], ("test",))
    images = [torch.from_numpy(np.array(Image.open(s.image).convert("RGB"))).permute(2, 0, 1) / 255.0 for s in samples]
    preprocess = transforms.Compose(
        [transforms.Resize((224, 224), antialias=True), transforms.Normalize(CLIP_MEAN, CLIP_STD)]
    )
    with torch.no_grad():
        logits = fc(openai_layer_map(visual, preprocess(torch.stack(images)), LAYER))  # DeCLIP: fc(map of layer 20)
    del visual
    return {"root": root, "weights": weights, "declip": declip, "data": data, "samples": samples, "logits": logits}


@pytest.fixture(scope="module")
def export(world: dict[str, Any]) -> Path:
    out = world["root"] / "declip_lama.safetensors"
    assert (
        import_main(["declip", str(world["declip"]), "--out", str(out), "--encoder-checkpoint", str(world["weights"])])
        == 0
    )
    return out


def test_the_export_says_what_the_decoder_is(export: Path, world: dict[str, Any]) -> None:
    _, metadata = read_export(export)
    assert metadata["decoder"]["label"] == f"conv{DEPTH}" and metadata["decoder"]["inputs"] == [f"layer{LAYER}"]
    encoder = metadata["encoder"]
    assert (encoder["kind"], encoder["config"], encoder["layers"], encoder["image_size"]) == (
        "clip",
        "ViT-L-14",
        [LAYER],
        224,
    )
    from deeploc.io import file_digest

    assert encoder["weights"] == f"sha256:{file_digest(world['weights'])}"
    training = metadata["training"]["config"]
    assert (training["split"], training["subset"], training["trained_by"]) == (
        "cross",
        "lama",
        "DeCLIP (github.com/bit-ml/DeCLIP)",
    )
    assert metadata["source"]["file"] == world["declip"].name and metadata["source"]["total_steps"] == 777
    assert metadata["training"]["checkpoint_global_step"] == 777


def test_predict_gives_the_reference_probabilities(export: Path, world: dict[str, Any], tmp_path: Path) -> None:
    images = [str(s.image) for s in world["samples"]]
    args = [
        "--model",
        str(export),
        "--encoder-checkpoint",
        str(world["weights"]),
        "--out",
        str(tmp_path),
        "--save-probs",
    ]
    assert predict_main([*images, *args, "--device", "cpu", "--workers", "0", "--quiet"]) == 0
    expected = torch.sigmoid(world["logits"])[:, 0]  # 256 x 256 logits = the images' native size
    for sample, reference in zip(world["samples"], expected):
        probs = np.load(tmp_path / "probs" / f"{Path(sample.image).stem}.npy")
        assert probs.shape == (256, 256)
        torch.testing.assert_close(torch.from_numpy(probs), reference, rtol=0, atol=2e-5)


def test_eval_scores_the_reference_logits(export: Path, world: dict[str, Any], tmp_path: Path) -> None:
    args = [str(export), "--encoder-checkpoint", str(world["weights"]), "--data-root", str(world["data"])]
    assert eval_main([*args, "--subsets", SUBSET, "--out", str(tmp_path), "--device", "cpu"]) == 0
    scores = json.loads((tmp_path / "eval.json").read_text())["test"][SUBSET]
    dataset = ImageMaskDataset(world["samples"])
    metric = LocalizationMetrics()
    metric.update(
        world["logits"], torch.stack([dataset[i]["mask"] for i in range(len(dataset))]), torch.arange(len(dataset))
    )
    expected = {k: float(v) for k, v in metric.compute().items()}
    assert scores["n_images"] == len(dataset) == 1
    for key in ("iou", "f1_fixed", "f1_best", "ap"):
        assert scores[key] == pytest.approx(expected[key], abs=0.05), key


# ------------------------------------------------------------------------------------------------------ refusals
def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert import_main(["declip", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("deeploc-import: ") and err.count("\n") == 1  # one line
    return err


def test_truncated_or_mismatched_files_are_refused_by_name(world: dict[str, Any], tmp_path: Path, capsys) -> None:
    good = world["declip"].read_bytes()
    cut = tmp_path / world["declip"].name
    cut.write_bytes(good[: len(good) // 2])
    message = _refused([str(cut)], capsys)
    assert "cannot read DeCLIP checkpoint" in message and str(cut) in message
    # A file whose name says conv-20 but holds conv-4.
    renamed = tmp_path / f"ViT_layer{LAYER}_conv-20_lama.pth"
    renamed.write_bytes(good)
    assert "the file name says layer20_conv-20" in _refused([str(renamed)], capsys)
    # A weights file for another CLIP: named, with what it holds.
    micro = tmp_path / "micro.safetensors"
    visual = openai_model_code().VisionTransformer(224, 14, 64, 24, 1, 32)
    save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, str(micro))
    message = _refused(
        [str(world["declip"]), "--out", str(tmp_path / "x.safetensors"), "--encoder-checkpoint", str(micro)], capsys
    )
    assert "micro.safetensors" in message and "width 64" in message
    assert not (tmp_path / "x.safetensors").exists()
    # A layer the file contradicts.
    assert "says feature_layer='layer20', but 'layer12' was given" in _refused(
        [str(world["declip"]), "--feature-layer", "layer12"], capsys
    )
