"""Reading DeCLIP's released decoders: files written here in DeCLIP's format (random weights), converted, checked.

DeCLIP's format, as read from bit-ml/DeCLIP (networks/base_model.py ``save_networks``, models/clip_models.py):
``{"model": <localisation model state dict>, "optimizer", "total_steps", "feature_layer", "decoder_type"}``; the
decoder is the ``nn.Sequential`` ``fc`` (conv-N: per stage N/4 x [Conv 5x5, BatchNorm, ReLU] then a x2 bilinear
Upsample, last a Conv 5x5 64 -> 1); the frozen CLIP backbone sits under ``model.``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from deeploc.inference.declip import DeclipImportError, parse_release_name, read_declip_decoder
from deeploc.models.decoders import count_parameters, decoder_from_record
from tests.clip_reference import declip_fc


def backbone_keys() -> dict[str, torch.Tensor]:
    """A few of the CLIP ViT-L/14 weights DeCLIP's state dict carries under ``model.`` (shapes as OpenAI's)."""
    keys = {
        "model.visual.conv1.weight": torch.zeros(1024, 3, 14, 14),
        "model.visual.positional_embedding": torch.zeros(257, 1024),
        "model.logit_scale": torch.zeros(()),
    }
    keys.update({f"model.visual.transformer.resblocks.{i}.ln_1.weight": torch.ones(1024) for i in range(24)})
    return keys


def declip_payload(fc_state: dict[str, torch.Tensor], **meta: Any) -> dict[str, Any]:
    model = {**backbone_keys(), **{f"fc.{k}": v for k, v in fc_state.items()}}
    payload = {
        "model": model,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        "total_steps": 4321,
        "feature_layer": "layer20",
        "decoder_type": "conv-4",
    }
    payload.update(meta)
    return {k: v for k, v in payload.items() if v is not None}


@pytest.fixture(scope="module")
def conv4() -> nn.Sequential:
    return declip_fc(4)


@pytest.fixture
def save(tmp_path: Path):
    def write(payload: Any, name: str = "model_epoch_best.pth") -> Path:
        path = tmp_path / name
        torch.save(payload, path)
        return path

    return write


@torch.no_grad()
def test_converted_decoder_gives_declips_logits(tmp_path: Path) -> None:
    depth = 12  # N/4 = 3 blocks per stage: the repeated blocks' indices are mapped too
    fc = declip_fc(depth, seed=depth)
    path = tmp_path / f"ViT_layer20_conv-{depth}_lama.pth"
    torch.save(declip_payload(fc.state_dict(), decoder_type=f"conv-{depth}"), path)
    converted = read_declip_decoder(path)
    decoder = decoder_from_record(converted.record)
    decoder.load_state_dict(converted.state_dict, strict=True)
    decoder.eval()
    features = torch.randn(2, 1024, 2, 2, generator=torch.Generator().manual_seed(1))
    expected = fc(features)  # DeCLIP's forward on a ViT map: self.fc(map)
    logits = decoder({"layer20": features})
    assert logits.shape == expected.shape == (2, 1, 32, 32)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert converted.record["name"] == "conv" and converted.record["options"]["depth"] == depth
    assert converted.record["inputs"] == ["layer20"]
    assert converted.record["feature_specs"] == {"layer20": {"channels": 1024, "stride": 14.0}}
    assert converted.record["target_stride"] == 14 / 16
    assert converted.record["parameters"] == count_parameters(fc)
    assert converted.encoder == {"kind": "clip", "config": "ViT-L-14", "layers": [20], "image_size": 224}
    assert (converted.feature_layer, converted.decoder_type) == ("layer20", f"conv-{depth}")
    assert (converted.training_subset, converted.total_steps) == ("lama", 4321)
    assert all(v.dtype in (torch.float32, torch.int64) for v in converted.state_dict.values())


def test_files_without_layer_or_decoder_need_them_given(conv4: nn.Sequential, save) -> None:
    path = save(declip_payload(conv4.state_dict(), feature_layer=None, decoder_type=None))
    with pytest.raises(DeclipImportError, match=r"does not record its feature_layer.*--feature-layer layer20"):
        read_declip_decoder(path)
    converted = read_declip_decoder(path, feature_layer="layer20", decoder_type="conv-4")
    assert converted.record["options"]["depth"] == 4 and converted.training_subset is None
    recorded = save(declip_payload(conv4.state_dict()), "recorded.pth")
    with pytest.raises(DeclipImportError, match=r"says feature_layer='layer20', but 'layer12' was given"):
        read_declip_decoder(recorded, feature_layer="layer12")


def test_truncated_file_is_refused(conv4: nn.Sequential, save) -> None:
    path = save(declip_payload(conv4.state_dict()))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DeclipImportError, match=r"cannot read DeCLIP checkpoint .*model_epoch_best\.pth.*truncated"):
        read_declip_decoder(path)


class Options:
    """Stands for any pickled object: DeCLIP never saves one, so a file that does is not unpickled."""


def test_pickled_objects_are_refused(save) -> None:
    path = save({"model": {}, "opt": Options()})
    with pytest.raises(DeclipImportError, match="weights_only"):
        read_declip_decoder(path)


def test_other_nesting_is_refused(conv4: nn.Sequential, save) -> None:
    path = save({f"fc.{k}": v for k, v in conv4.state_dict().items()})
    with pytest.raises(DeclipImportError, match=r"not a DeCLIP checkpoint: expected a dict with a 'model'"):
        read_declip_decoder(path)
    payload = declip_payload(conv4.state_dict())
    payload["model"] = {f"decoder.{k}": v for k, v in conv4.state_dict().items()}
    with pytest.raises(DeclipImportError, match=r"unexpected keys in 'model' \(e\.g\. \['decoder\."):
        read_declip_decoder(save(payload))


def test_declared_depth_must_match_the_weights(conv4: nn.Sequential, save) -> None:
    path = save(declip_payload(conv4.state_dict(), decoder_type="conv-12"))
    with pytest.raises(DeclipImportError, match=r"does not match DeCLIP's conv-12 on layer20: .*missing keys.*conv-4"):
        read_declip_decoder(path)


def test_shape_mismatch_is_named(conv4: nn.Sequential, save) -> None:
    state = dict(conv4.state_dict())
    state["4.weight"] = torch.zeros(256, 512, 3, 3)  # a 3x3 conv where DeCLIP has 5x5
    with pytest.raises(
        DeclipImportError, match=r"fc\.4\.weight: expected \(256, 512, 5, 5\), found \(256, 512, 3, 3\)"
    ):
        read_declip_decoder(save(declip_payload(state)))


def test_vit_rn50_decoders_are_refused(conv4: nn.Sequential, save) -> None:
    state = dict(conv4.state_dict())
    state["0.weight"] = torch.zeros(512, 2048, 5, 5)
    with pytest.raises(DeclipImportError, match=r"2048 channels: a ViT\+RN50 decoder"):
        read_declip_decoder(save(declip_payload(state)))
    named = save(declip_payload({"0.weight": torch.zeros(1)}), "ViT_layer20+RN50_layer3_conv-4_lama.pth")
    with pytest.raises(DeclipImportError, match=r"ViT\+RN50 release"):
        read_declip_decoder(named)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"feature_layer": "layer24"}, r"'layer24' is not a ViT-L/14 block"),
        ({"decoder_type": "conv-6"}, r"decoder_type 'conv-6' is not importable"),
        ({"decoder_type": "attention"}, r"'attention' is not importable"),
        ({"feature_layer": 20}, r"'feature_layer' is 20, expected a string"),
    ],
)
def test_bad_layer_or_decoder_names_are_refused(change: dict, message: str, save) -> None:
    with pytest.raises(DeclipImportError, match=message):
        read_declip_decoder(save(declip_payload({"0.weight": torch.zeros(1)}, **change)))


def test_linear_and_attention_weights_are_refused(save) -> None:
    linear = declip_payload({"0.weight": torch.zeros(1, 1024), "0.bias": torch.zeros(1)})
    with pytest.raises(DeclipImportError, match=r"linear decoder \(fc\.0 is a Linear \(1, 1024\)\)"):
        read_declip_decoder(save(linear))
    attention = declip_payload({"0.weight": torch.zeros(1, 1024)})
    attention["model"]["att1.attn.in_proj_weight"] = torch.zeros(3)
    with pytest.raises(DeclipImportError, match="attention decoder"):
        read_declip_decoder(save(attention))


def test_backbone_must_be_vit_l14(conv4: nn.Sequential, save) -> None:
    payload = declip_payload(conv4.state_dict())
    payload["model"]["model.visual.conv1.weight"] = torch.zeros(768, 3, 16, 16)  # ViT-B/16
    with pytest.raises(DeclipImportError, match=r"model\.visual\.conv1\.weight has shape \(768, 3, 16, 16\)"):
        read_declip_decoder(save(payload))


def test_file_name_must_agree_with_contents(conv4: nn.Sequential, save) -> None:
    path = save(declip_payload(conv4.state_dict()), "ViT_layer12_conv-4_ldm.pth")
    with pytest.raises(DeclipImportError, match=r"file name says layer12_conv-4, its contents say layer20_conv-4"):
        read_declip_decoder(path)


def test_non_finite_weights_are_refused(conv4: nn.Sequential, save) -> None:
    state = dict(conv4.state_dict())
    state["0.bias"] = state["0.bias"].clone()
    state["0.bias"][3] = float("nan")
    with pytest.raises(DeclipImportError, match=r"\['fc\.0\.bias'\] hold NaN"):
        read_declip_decoder(save(declip_payload(state)))


def test_release_names_parse() -> None:
    assert parse_release_name("x/ViT_layer20_conv-20_repaint-p2-9k.pth") == {
        "backbone": "ViT",
        "feature_layer": "layer20",
        "decoder_type": "conv-20",
        "training_subset": "repaint-p2-9k",
    }
    assert parse_release_name("ViT_layer20+RN50_layer3_conv-20_cocosd.pth")["backbone"] == "ViT+RN50"
    assert parse_release_name("model_epoch_best.pth") is None
