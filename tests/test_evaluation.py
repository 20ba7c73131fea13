"""Evaluation building blocks on real files: perturbations (deterministic, really change the image, JPEG 100 ~
nothing), their command-line forms, detection metrics against sklearn, size-grouped evaluation batches."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, balanced_accuracy_score, roc_auc_score

from deeploc.data.images import read_rgb
from deeploc.data.layout import index_subsets
from deeploc.errors import ConfigError
from deeploc.evaluation.detection import average_precision, balanced_accuracy, choose_threshold, roc_auc
from deeploc.evaluation.perturbations import PERTURBATIONS, Perturbation, apply, parse_perturbations
from deeploc.evaluation.robustness import ordered, write_perturbed
from deeploc.evaluation.scoring import size_batches

TYPICAL = {"jpeg": 70, "jpeg420": 90, "resize": 0.5, "blur": 1.0, "noise": 0.02}


@pytest.fixture(scope="module")
def image(synthetic_data: Path) -> np.ndarray:
    return read_rgb(next((synthetic_data / "data/celebahq/fake/copy-move/images/test").iterdir()))


# ------------------------------------------------------------------------------------------------ perturbations


def test_every_builtin_perturbation_is_deterministic_and_changes_the_image(image: np.ndarray) -> None:
    assert set(TYPICAL) <= set(PERTURBATIONS.names())
    for name, strength in TYPICAL.items():
        p = Perturbation(name, strength)
        out = apply(image, p)
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
        assert np.array_equal(out, apply(image.copy(), p)), name  # same pixels -> same bytes
        assert out.shape != image.shape or np.abs(out.astype(int) - image).mean() > 0.5, name
    assert apply(image, Perturbation("resize", 0.5)).shape == (image.shape[0] // 2, image.shape[1] // 2, 3)


def test_noise_is_seeded_by_the_image_content_and_the_strength(image: np.ndarray) -> None:
    noise = Perturbation("noise", 0.02)
    other = np.ascontiguousarray(image[::-1])
    first, second = apply(image, noise) - image.astype(np.int16), apply(other, noise) - other.astype(np.int16)
    assert not np.array_equal(first, second[::-1])  # another image draws other noise
    drawn = (apply(image, noise).astype(float) - image).std()
    assert 0.6 * 0.02 * 255 < drawn < 1.2 * 0.02 * 255  # the strength is the standard deviation (some clipping)
    assert not np.array_equal(apply(image, Perturbation("noise", 0.03)), apply(image, noise))


def test_jpeg_quality_100_leaves_the_image_almost_unchanged(image: np.ndarray) -> None:
    diff = np.abs(apply(image, Perturbation("jpeg", 100)).astype(int) - image)
    assert diff.mean() < 1.0 and np.abs(apply(image, Perturbation("jpeg", 50)).astype(int) - image).mean() > diff.mean()
    # 4:2:0 chroma subsampling loses colour detail even at quality 100 (these images are colourful at 64 px).
    assert np.abs(apply(image, Perturbation("jpeg420", 100)).astype(int) - image).mean() > diff.mean()


def test_perturbed_files_are_written_losslessly_and_byte_identically(synthetic_data: Path, tmp_path: Path) -> None:
    samples = index_subsets(synthetic_data, ["copy-move"], splits=("test",))
    p = Perturbation("noise", 0.03)
    first = write_perturbed(samples, p, tmp_path / "a")
    second = write_perturbed(samples, p, tmp_path / "b")
    for a, b, s in zip(first, second, samples):
        assert a.image.read_bytes() == b.image.read_bytes()
        assert np.array_equal(read_rgb(a.image), apply(read_rgb(s.image), p))
        assert (a.mask, a.name, a.subset) == (s.mask, s.name, s.subset)


def test_perturbation_items_in_every_form(tmp_path: Path) -> None:
    parsed = parse_perturbations(["jpeg=90,70,50", "blur=1,2", "jpeg=90"])
    assert [p.text for p in parsed] == ["jpeg=90", "jpeg=70", "jpeg=50", "blur=1", "blur=2"]
    default = parse_perturbations(["default"])  # conf/perturb/default.yaml
    assert {p.name for p in default} == {"jpeg", "resize", "blur", "noise"}
    spec = tmp_path / "grid.yaml"
    spec.write_text("resize: [0.75, 0.5]\nnoise: 0.01\n")
    assert [p.text for p in parse_perturbations([str(spec)])] == ["resize=0.75", "resize=0.5", "noise=0.01"]
    groups = ordered(parse_perturbations(["resize=0.5,0.75", "blur=2,1"]))
    assert {k: [p.strength for p in v] for k, v in groups.items()} == {"resize": [0.75, 0.5], "blur": [1.0, 2.0]}


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("jpeg=0", "jpeg strength 0 is invalid: a JPEG quality is an integer from 1 to 100"),
        ("jpeg=75.5", "a JPEG quality is an integer"),
        ("resize=1", "a scale factor is in (0, 4] and not 1"),
        ("blur=-1", "a blur sigma is in (0, 50]"),
        ("noise=x", "noise strength 'x' is not a number"),
        ("sharpen=1", "unknown perturbation 'sharpen'; known: blur, jpeg, jpeg420, noise, resize"),
        ("heavy", "expected name=strength,... (e.g. jpeg=90,70), a YAML file, or one of conf/perturb: default"),
        ("jpeg=", "jpeg has no strengths"),
        ("missing.yaml", "missing.yaml does not exist"),
    ],
)
def test_bad_perturbation_items_are_refused_by_name(item: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_perturbations([item])
    assert message in str(err.value)


# ---------------------------------------------------------------------------------------------------- detection


def test_detection_metrics_equal_sklearn() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        n_real, n_fake = rng.integers(1, 40, size=2)
        # Rounded scores: many ties, as saturated maps give.
        real = torch.from_numpy(np.round(rng.beta(2, 3, n_real), int(rng.integers(1, 4))))
        fake = torch.from_numpy(np.round(rng.beta(3, 2, n_fake), int(rng.integers(1, 4))))
        labels = np.r_[np.zeros(n_real), np.ones(n_fake)]
        scores = np.r_[real.numpy(), fake.numpy()]
        assert roc_auc(real, fake) == pytest.approx(100 * roc_auc_score(labels, scores), abs=1e-9), trial
        assert average_precision(real, fake) == pytest.approx(100 * average_precision_score(labels, scores), abs=1e-9)
        t = float(rng.uniform(0, 1))
        expected = balanced_accuracy_score(labels, scores > t)
        assert balanced_accuracy(real, fake, t) == pytest.approx(100 * expected, abs=1e-9)


def test_chosen_threshold_maximises_balanced_accuracy_on_its_scores() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        real = torch.from_numpy(np.round(rng.beta(2, 3, int(rng.integers(1, 30))), 2))
        fake = torch.from_numpy(np.round(rng.beta(3, 2, int(rng.integers(1, 30))), 2))
        labels = np.r_[np.zeros(len(real)), np.ones(len(fake))]
        scores = np.r_[real.numpy(), fake.numpy()]
        # Brute force over every threshold that separates the scores differently (and the extremes).
        candidates = np.r_[-1.0, np.unique(scores)]
        best = max(balanced_accuracy_score(labels, scores > c) for c in candidates)
        t = choose_threshold(real, fake)
        assert balanced_accuracy_score(labels, scores > t) == pytest.approx(best)
        assert t not in set(scores.tolist()) or len(np.unique(scores)) == 1  # a midpoint, never a score itself


def test_detection_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="needs real and fake images, got 0 real and 2 fake"):
        roc_auc(torch.zeros(0), torch.ones(2))


# ----------------------------------------------------------------------------------------------------- batching


def test_evaluation_batches_hold_one_image_size(synthetic_copy: Path) -> None:
    samples = index_subsets(synthetic_copy, ["copy-move"], splits=("test",))
    for s in samples[:2]:  # two images (and masks) at another size
        for path in (s.image, s.mask):
            cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (48, 40), interpolation=cv2.INTER_NEAREST))
    batches = size_batches(samples, 3)
    assert sorted(i for b in batches for i in b) == list(range(len(samples)))
    assert batches == [[0, 1], [2, 3]]  # sizes grouped, dataset order within a size, at most 3 per batch
    assert size_batches(samples[2:], 1) == [[0], [1]]
