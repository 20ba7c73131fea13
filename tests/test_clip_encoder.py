"""CLIP ViT encoder (DeCLIP's backbone): layer tokens, preprocessing, weights files, identity, decoder layouts.

References: open_clip's own forward (hooks on its blocks), OpenAI CLIP's model code as shipped in the PyPI package
``clip-anytorch`` (OpenAI's ``clip/model.py``, repackaged), DeCLIP's feature reshaping and preprocessing as read from
bit-ml/DeCLIP, torchvision's transforms. All models are the ``clip_micro`` architecture with random weights.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

from deeploc.models.decoders import build_decoder, count_parameters
from deeploc.models.encoders import EncoderError, build_encoder, encoder_from_identity
from deeploc.models.encoders.clip import _CONVERT, ARCHITECTURES, CLIPEncoder
from deeploc.testing import EncoderContract
from tests.clip_reference import CLIP_MEAN, CLIP_STD, declip_conv_parameters, openai_layer_map, openai_model_code

CONF = Path(__file__).resolve().parents[1] / "conf" / "encoder"
MICRO = ARCHITECTURES["clip_micro"]


@pytest.fixture(scope="module")
def openai() -> ModuleType:
    return openai_model_code()


@pytest.fixture(scope="module")
def openai_clip(openai: ModuleType) -> torch.nn.Module:
    """A whole OpenAI-code CLIP (vision + text) of the clip_micro vision size, random weights."""
    torch.manual_seed(1)
    # embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, context, vocab, text w/h/layers
    model = openai.CLIP(MICRO.output_dim, 224, MICRO.layers, MICRO.width, MICRO.patch_size, 8, 50, 64, 1, 1)
    assert model.visual.transformer.resblocks[0].attn.num_heads == MICRO.heads
    return model.float().eval()


@pytest.fixture(scope="module")
def micro() -> CLIPEncoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_encoder("clip", config="clip_micro", layers=[0, 2, 3], random_init=True, seed=3)


def images(n: int = 2, size: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_layer_maps_equal_open_clips_own_block_outputs(micro: CLIPEncoder) -> None:
    x = images()
    maps = micro(x)
    assert list(maps) == ["layer0", "layer2", "layer3"]
    outputs: dict[int, torch.Tensor] = {}
    blocks = micro.model.transformer.resblocks
    hooks = [blocks[k].register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o)) for k in (0, 2, 3)]
    try:
        micro.model(micro.preprocess(x))  # the library's full forward (all blocks, pooling, projection)
    finally:
        for hook in hooks:
            hook.remove()
    for k in (0, 2, 3):
        tokens = outputs[k] if micro.model.transformer.batch_first else outputs[k].transpose(0, 1)
        expected = tokens[:, 1:].reshape(2, 16, 16, MICRO.width).permute(0, 3, 1, 2)
        assert maps[f"layer{k}"].shape == (2, MICRO.width, 16, 16)
        torch.testing.assert_close(maps[f"layer{k}"], expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_layer_maps_equal_openai_reference_computation(micro: CLIPEncoder, openai: ModuleType) -> None:
    visual = openai.VisionTransformer(224, MICRO.patch_size, MICRO.width, MICRO.layers, MICRO.heads, MICRO.output_dim)
    visual.load_state_dict(micro.model.state_dict(), strict=True)  # same key names as OpenAI's
    x = images()
    maps = micro(x)
    inputs = micro.preprocess(x)
    for k in (0, 2, 3):
        torch.testing.assert_close(maps[f"layer{k}"], openai_layer_map(visual.eval(), inputs, k), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_subset_of_layers_is_computed_alone_and_equal(micro: CLIPEncoder) -> None:
    x = images(1)
    assert torch.equal(micro(x, ["layer2"])["layer2"], micro(x)["layer2"])


def test_preprocessing_is_declips_resize_and_clip_normalisation(micro: CLIPEncoder) -> None:
    x = images(2, 256)
    ours = micro.preprocess(x)
    assert ours.shape == (2, 3, 224, 224)
    # torchvision's Resize((224, 224)) (bilinear, antialiased) + Normalize on the float tensor: the same numbers.
    tv = transforms.Compose([transforms.Resize((224, 224), antialias=True), transforms.Normalize(CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(ours, tv(x), rtol=0, atol=1e-5)
    # DeCLIP's own path on an 8-bit PIL image: equal up to PIL's rounding to 8 bits (<= 1 grey level).
    pixels = (x[0] * 255).round().to(torch.uint8)
    declip = transforms.Compose(
        [transforms.Resize((224, 224)), transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)]
    )(Image.fromarray(pixels.permute(1, 2, 0).numpy()))
    ours_8bit = micro.preprocess(pixels[None].float() / 255)[0]
    grey_levels = (ours_8bit - declip) * torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    assert grey_levels.abs().max() <= 1.01
    # A 224 input is only normalised.
    y = images(1, 224)
    expected = (y - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(micro.preprocess(y), expected)
    assert micro.identity()["preprocessing"] == "bilinear-antialias-resize+clip-norm"


# ------------------------------------------------------------------------------------------------- weights files
def _traced(model: torch.nn.Module, path: Path) -> Path:
    """OpenAI's distribution format: a traced whole CLIP saved as a TorchScript archive."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.rand(1, 3, 224, 224), torch.randint(0, 50, (1, 8))), check_trace=False)
        torch.jit.save(traced, str(path))
    return path


def _write(fmt: str, model: torch.nn.Module, path: Path) -> Path:
    if fmt == "torchscript":
        return _traced(model, path.with_suffix(".pt"))
    if fmt == "ddp_state_dict":  # open_clip training checkpoint nesting
        state = {f"module.{k}": v for k, v in model.state_dict().items()}
        torch.save({"epoch": 3, "state_dict": state}, path.with_suffix(".pt"))
        return path.with_suffix(".pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path.with_suffix(".safetensors")))
    return path.with_suffix(".safetensors")


@pytest.mark.parametrize("fmt", ["torchscript", "ddp_state_dict", "safetensors"])
@torch.no_grad()
def test_weights_files_load_and_give_openai_features(fmt: str, openai_clip: torch.nn.Module, tmp_path: Path) -> None:
    path = _write(fmt, openai_clip, tmp_path / "ViT-micro")
    encoder = build_encoder("clip", config="clip_micro", layers=[1, 3], checkpoint=str(path))
    x = images(1)
    maps = encoder(x)
    inputs = encoder.preprocess(x)
    for k in (1, 3):
        torch.testing.assert_close(
            maps[f"layer{k}"], openai_layer_map(openai_clip.visual, inputs, k), rtol=1e-5, atol=1e-5
        )
    identity = encoder.identity()
    assert identity["weights"].startswith("sha256:") and identity["layers"] == [1, 3]
    # The identity rebuilds the same encoder from the same file, and refuses another file.
    rebuilt = encoder_from_identity(identity, checkpoint=path, bf16=False)
    assert torch.equal(rebuilt(x)["layer3"], maps["layer3"])
    other = tmp_path / "other.safetensors"
    save_file({k: v + 1 for k, v in openai_clip.state_dict().items()}, str(other))
    with pytest.raises(EncoderError, match="digest"):
        encoder_from_identity(identity, checkpoint=other)


def test_torchscript_archive_is_read_without_running_its_code(openai_clip: torch.nn.Module, tmp_path: Path) -> None:
    good = _traced(openai_clip, tmp_path / "ViT-micro.pt")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/data.pkl"):  # a pickle that would create a file if anything ran it
                data = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
            dst.writestr(item, data)
    with pytest.raises(EncoderError, match=r"evil\.pt.*os\.system.*If you trust the file, convert it once"):
        build_encoder("clip", config="clip_micro", layers=[1], checkpoint=str(evil))
    assert not marker.exists()
    with zipfile.ZipFile(evil) as archive:  # the forged pickle is a real threat: plain unpickling runs it
        pickle.loads(archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl"))))
    assert marker.exists()


@torch.no_grad()
def test_documented_conversion_of_a_trusted_archive_loads(openai_clip: torch.nn.Module, tmp_path: Path) -> None:
    archive = _traced(openai_clip, tmp_path / "ViT-micro.pt")
    command = _CONVERT.format(path=archive)
    assert command.startswith('python -c "') and command.endswith('"')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(command[len('python -c "') : -1], {})  # the one-liner the refusal message prints
    converted = build_encoder("clip", config="clip_micro", layers=[2], checkpoint=f"{archive}.safetensors")
    safe = build_encoder("clip", config="clip_micro", layers=[2], checkpoint=str(archive))
    x = images(1)
    assert torch.equal(converted(x)["layer2"], safe(x)["layer2"])


def test_truncated_or_mismatched_weights_are_refused(openai_clip: torch.nn.Module, tmp_path: Path) -> None:
    good = _traced(openai_clip, tmp_path / "ViT-micro.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(EncoderError, match=r"cut\.pt"):
        build_encoder("clip", config="clip_micro", checkpoint=str(cut), layers=[1])
    # Weights trained at 224 px do not fit a 112 px model: the message names the size to use.
    with pytest.raises(EncoderError, match=r"positional_embedding.*trained at 224 px.*encoder.image_size=224"):
        build_encoder("clip", config="clip_micro", checkpoint=str(good), layers=[1], image_size=112)
    # A tower with one block less.
    state = {k: v for k, v in openai_clip.state_dict().items() if ".resblocks.3." not in k}
    short = tmp_path / "short.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(short))
    with pytest.raises(EncoderError, match=r"short\.safetensors.*missing keys \(e\.g\. transformer\.resblocks\.3\."):
        build_encoder("clip", config="clip_micro", checkpoint=str(short), layers=[1])
    # Not a CLIP file at all.
    other = tmp_path / "other.pt"
    torch.save({"model": {"weight": torch.zeros(2)}}, other)
    with pytest.raises(EncoderError, match=r"other\.pt hold no CLIP vision tower"):
        build_encoder("clip", config="clip_micro", checkpoint=str(other), layers=[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": [24]}, r"encoder.layers=\[24\].*0\.\.23"),
        ({"layers": [1, 1]}, r"distinct"),
        ({"layers": []}, r"encoder.layers"),
        ({"config": "ViT-H-99"}, r"ViT-H-99.*ViT-L-14"),
        ({"image_size": 230}, r"image_size=230.*14-px"),
    ],
)
def test_bad_arguments_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(EncoderError, match=message):
        build_encoder("clip", **{"config": "clip_micro", "layers": [1], "random_init": True, **kwargs})


def test_identity_round_trip_rebuilds_an_identical_encoder() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = build_encoder("clip", config="clip_micro", layers=[3, 1], random_init=True, seed=7)
        identity = encoder.identity()
        assert identity == {
            "kind": "clip",
            "config": "clip_micro",
            "layers": [1, 3],
            "image_size": 224,
            "weights": "random:seed=7",
            "preprocessing": "bilinear-antialias-resize+clip-norm",
            "precision": "fp32",
        }
        kwargs = CLIPEncoder.kwargs_from_identity(identity, bf16=False)
        rebuilt = build_encoder("clip", **kwargs)
    assert rebuilt.identity() == identity
    x = images(1)
    with torch.no_grad():
        a, b = encoder(x), rebuilt(x)
    assert all(torch.equal(a[n], b[n]) for n in ("layer1", "layer3"))
    assert encoder.init_config() == {"kind": "clip", **encoder.options()}


# --------------------------------------------------------------------------------------- decoders on CLIP maps
@pytest.mark.parametrize(("depth", "millions"), [(4, 17.4), (12, 34.8), (20, 52.2)])
def test_conv_n_on_vit_l14_has_declips_parameter_count(depth: int, millions: float) -> None:
    vit = ARCHITECTURES["ViT-L-14"]
    specs = {"layer20": (vit.width, vit.patch_size)}
    decoder = build_decoder("conv", specs, CLIPEncoder.target_stride, inputs="layer20", depth=depth)
    assert count_parameters(decoder) == declip_conv_parameters(depth)
    assert round(count_parameters(decoder) / 1e6, 1) == millions


@torch.no_grad()
def test_conv_decoder_on_clip_maps_gives_256_logits(micro: CLIPEncoder) -> None:
    decoder = build_decoder("conv", micro.feature_specs, micro.target_stride, inputs="layer2", depth=4).eval()
    assert sum(isinstance(m, torch.nn.Upsample) for m in decoder.modules()) == 4  # 16 -> 256, as DeCLIP
    logits = decoder(micro(images(1, 256), ["layer2"]))
    assert logits.shape == (1, 1, 256, 256)


# ------------------------------------------------------------------------------------------------------ configs
def _encoder_node(name: str) -> Any:
    """A conf/encoder file as the encoder node Hydra composes from it (its defaults list chooses other groups)."""
    node = OmegaConf.load(CONF / name)
    node.pop("defaults", None)
    return node


def test_encoder_configs_build(monkeypatch: pytest.MonkeyPatch) -> None:
    micro_cfg = _encoder_node("clip_micro.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = instantiate(micro_cfg)
    assert encoder.identity()["config"] == "clip_micro" and list(encoder.feature_specs) == ["layer20"]
    # The test model has ViT-L-14's block indices, so the configs written for ViT-L-14 run on it.
    assert MICRO.layers == ARCHITECTURES["ViT-L-14"].layers
    monkeypatch.delenv("CLIP_CHECKPOINT", raising=False)
    vitl = _encoder_node("clip_vitl14.yaml")
    assert (vitl["config"], vitl["layers"], vitl["image_size"]) == ("ViT-L-14", [20], 224)
    with pytest.raises(InstantiationException) as refused:
        instantiate(vitl)
    assert re.search(r"encoder.checkpoint is not set.*ViT-L-14\.pt", str(refused.value.__cause__))
    monkeypatch.setenv("CLIP_CHECKPOINT", "/nowhere/ViT-L-14.pt")
    vitl = OmegaConf.to_container(_encoder_node("clip_vitl14.yaml"), resolve=True)
    assert vitl["_target_"] == "deeploc.models.encoders.clip.CLIPEncoder"
    assert vitl["checkpoint"] == "/nowhere/ViT-L-14.pt"


class TestClipMicroContract(EncoderContract):
    name = "clip"
    options: ClassVar = {"config": "clip_micro", "layers": [20], "image_size": 224, "random_init": True, "seed": 0}
