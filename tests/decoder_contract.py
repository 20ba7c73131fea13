"""Checks every decoder must pass; a decoder's test file subclasses :class:`DecoderContract` in a few lines.

(segmentation_models.pytorch's BaseModelTester, for deeploc's contract: deeploc/models/decoders/base.py.)
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from deeploc.models.decoders import DecoderError, build_decoder, decoder_from_record
from deeploc.models.encoders import FeatureSpec

# SAM2's maps (deeploc/models/encoders/sam2.py) and a CLIP-like map, written out so the test states what it checks.
SAM2_SPECS = {
    "image_embed": FeatureSpec(256, 16),
    "high_res_feats_0": FeatureSpec(32, 4),
    "high_res_feats_1": FeatureSpec(64, 8),
}


def sam2_conv(feature: str, depth: int) -> torch.nn.Module:
    """The study's CONV-``depth`` on SAM2 map ``feature``."""
    return build_decoder("conv", SAM2_SPECS, 4.0, inputs=feature, depth=depth)


def random_maps(specs: dict[str, FeatureSpec], image_size: int, batch: int = 2) -> dict[str, torch.Tensor]:
    """Random features of an encoder whose input side is ``image_size``."""
    return {
        n: torch.randn(batch, s.channels, round(image_size / s.stride), round(image_size / s.stride))
        for n, s in specs.items()
    }


class DecoderContract:
    """Subclass and set ``name`` (registered decoder) and ``options`` (its keyword arguments)."""

    name: ClassVar[str]
    options: ClassVar[dict[str, Any]]
    specs: ClassVar[dict[str, FeatureSpec]] = SAM2_SPECS
    target_stride: ClassVar[float] = 4.0

    def build(self, **extra: Any) -> Any:
        torch.manual_seed(0)
        return build_decoder(self.name, self.specs, self.target_stride, **{**self.options, **extra})

    @pytest.mark.parametrize("image_size", [128, 256])
    def test_forward_backward_at_target_stride(self, image_size: int) -> None:
        decoder = self.build().train()
        logits = decoder(random_maps(self.specs, image_size))
        side = round(image_size / self.target_stride)
        assert logits.shape == (2, 1, side, side)
        logits.mean().backward()
        assert all(p.grad is not None for p in decoder.parameters() if p.requires_grad)

    def test_record_rebuilds_an_identical_decoder(self) -> None:
        decoder = self.build().eval()
        rebuilt = decoder_from_record(decoder.record()).eval()
        rebuilt.load_state_dict(decoder.state_dict(), strict=True)
        maps = random_maps(self.specs, 128)
        assert torch.equal(decoder(maps), rebuilt(maps))
        assert rebuilt.record() == decoder.record()

    def test_reads_only_its_inputs_and_refuses_a_missing_or_wrong_map(self) -> None:
        decoder = self.build().eval()
        maps = random_maps(self.specs, 128)
        extra = {**maps, "unrelated": torch.randn(2, 3, 4, 4)}
        assert torch.equal(decoder(maps), decoder(extra))
        first = decoder.inputs[0]
        with pytest.raises(DecoderError, match=f"reads map '{first}'"):
            decoder({k: v for k, v in maps.items() if k != first})
        with pytest.raises(DecoderError, match=f"expects {first} as B x"):
            decoder({**maps, first: maps[first][:, :1]})

    def test_unknown_input_names_the_available_maps(self) -> None:
        with pytest.raises(DecoderError, match="not maps of the encoder; it provides"):
            self.build(inputs=["no_such_map"])

    def test_record_is_plain_json(self) -> None:
        import json

        record = self.build().record()
        assert json.loads(json.dumps(record)) == record
        assert record["name"] == self.name
