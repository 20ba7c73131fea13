"""Contracts every plug-in must pass, shipped in the package so a plug-in outside it tests itself the same way.

A test file subclasses one class per plug-in in a few lines (pytest collects the ``test_*`` methods)::

    from deeploc.testing import DecoderContract

    class TestMyHead(DecoderContract):
        name = "my_head"
        options = {"inputs": "image_embed", "width": 8}

* :class:`DecoderContract`: shapes at the target stride, gradients, record round trip, inputs (decoders/base.py);
* :class:`EncoderContract`: maps match ``feature_specs``, seeded random init is deterministic, the identity
  rebuilds an identical encoder (encoders/base.py);
* :class:`SourceContract`: sample counts per subset and split, mask polarity carried by every sample, bad input
  refused by name (data/sources/base.py);
* :class:`MetricContract`: registered with a direction, optimizable, per-image values in percent that rank a
  perfect prediction above its inverse (metrics/core.py).

(segmentation_models.pytorch's BaseModelTester, for deeploc's contracts.) Needs pytest (a test dependency).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from deeploc.data.errors import DatasetError
from deeploc.data.sources.base import build_source
from deeploc.metrics import METRICS, image_scores, metric_names, optimized_metrics
from deeploc.models.decoders import DecoderError, build_decoder, decoder_from_record
from deeploc.models.encoders import FeatureSpec, build_encoder, encoder_from_identity

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
        record = self.build().record()
        assert json.loads(json.dumps(record)) == record
        assert record["name"] == self.name


class EncoderContract:
    """Subclass and set ``name`` (registered encoder) and ``options`` (its keyword arguments, with
    ``random_init=True``: the contract needs no weights file)."""

    name: ClassVar[str]
    options: ClassVar[dict[str, Any]]
    batch: ClassVar[int] = 2

    def build(self, **extra: Any) -> Any:
        return build_encoder(self.name, **{**self.options, **extra})

    def images(self, encoder: Any) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.rand(self.batch, 3, encoder.image_size, encoder.image_size, generator=generator)

    def test_maps_match_the_feature_specs(self) -> None:
        encoder = self.build()
        maps = encoder(self.images(encoder))
        assert set(maps) == set(encoder.feature_specs)
        for name, value in maps.items():
            assert tuple(value.shape) == (self.batch, *encoder.feature_shape(name)), name
            assert value.dtype == torch.float32 and bool(torch.isfinite(value).all()), name
        assert all(not p.requires_grad for p in encoder.parameters())

    def test_random_init_is_deterministic_per_seed(self) -> None:
        a, b, c = self.build(seed=0), self.build(seed=0), self.build(seed=1)
        images = self.images(a)
        first = next(iter(a.feature_specs))
        assert torch.equal(a(images)[first], b(images)[first])
        assert a.identity() == b.identity() != c.identity()
        assert not torch.equal(a(images)[first], c(images)[first])

    def test_identity_rebuilds_an_identical_encoder(self) -> None:
        encoder = self.build()
        identity = encoder.identity()
        assert json.loads(json.dumps(identity)) == identity and identity["kind"] == self.name
        rebuilt = encoder_from_identity(identity)
        assert rebuilt.identity() == identity and rebuilt.feature_specs == encoder.feature_specs
        images = self.images(encoder)
        for name, value in encoder(images).items():
            assert torch.equal(value, rebuilt(images)[name]), name


class SourceContract:
    """Subclass and set ``name`` (registered data source); implement :meth:`make_dataset` (write a small dataset
    under a folder, return the source's options, ``root`` included) and set ``counts`` (``{(subset, split): n}``)
    and ``polarity`` (how its masks are drawn)."""

    name: ClassVar[str]
    counts: ClassVar[dict[tuple[str, str], int]]
    polarity: ClassVar[str] = "white_is_manipulated"

    def make_dataset(self, folder: Path) -> dict[str, Any]:
        raise NotImplementedError

    def test_counts_per_subset_and_split(self, tmp_path: Path) -> None:
        source = build_source(self.name, **self.make_dataset(tmp_path))
        source.prepare()
        subsets = sorted({subset for subset, _ in self.counts})
        assert sorted(source.available_subsets()) == subsets
        found: dict[tuple[str, str], int] = {}
        for sample in source.samples(subsets):
            found[(sample.subset, sample.split)] = found.get((sample.subset, sample.split), 0) + 1
            assert sample.image.is_file() and sample.mask is not None and sample.mask.is_file(), sample
        assert found == {k: v for k, v in self.counts.items() if v}

    def test_every_sample_carries_the_mask_polarity(self, tmp_path: Path) -> None:
        source = build_source(self.name, **self.make_dataset(tmp_path))
        source.prepare()
        assert source.mask_polarity == self.polarity
        samples = source.samples(sorted({subset for subset, _ in self.counts}))
        assert samples and {s.mask_polarity for s in samples} == {self.polarity}
        assert json.loads(json.dumps(source.describe())) == source.describe()

    def test_bad_input_is_refused_by_name(self, tmp_path: Path) -> None:
        options = self.make_dataset(tmp_path)
        with pytest.raises(DatasetError):
            build_source(self.name, **options).samples(["no_such_subset"])
        with pytest.raises(DatasetError):
            build_source(self.name, **options, no_such_option=1)
        with pytest.raises(DatasetError, match="does-not-exist"):
            missing = build_source(self.name, **{**options, "root": tmp_path / "does-not-exist"})
            missing.prepare()
            missing.samples(sorted({subset for subset, _ in self.counts}))


class MetricContract:
    """Subclass and set ``name`` (registered metric); its module must be imported first."""

    name: ClassVar[str]

    def test_registered_and_optimizable(self) -> None:
        assert self.name in metric_names()
        spec = dict(METRICS.items())[self.name]
        assert spec.direction in ("max", "min") and spec.label
        assert optimized_metrics()[f"val/{self.name}"] == spec.direction

    def test_percentages_that_rank_a_perfect_prediction_first(self) -> None:
        generator = torch.Generator().manual_seed(0)
        mask = torch.zeros(32, 32)
        mask[8:20, 4:24] = 1
        noisy = torch.rand(32, 32, generator=generator)
        perfect, inverse = (image_scores(p, mask)[self.name] for p in (mask, 1 - mask))
        for value in (perfect, inverse, image_scores(noisy, mask)[self.name]):
            assert value != value or 0.0 <= value <= 100.0, value  # NaN (undefined) or a percentage
        direction = dict(METRICS.items())[self.name].direction
        assert perfect > inverse if direction == "max" else perfect < inverse
