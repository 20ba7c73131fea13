"""deeploc.report.stats: bootstrap intervals cover a known mean, paired tests find planted differences and not
absent ones, Holm's correction matches a hand computation (synthetic per-image scores, seeded, fast)."""

from __future__ import annotations

import numpy as np
import pytest

from deeploc.report.stats import TOO_SMALL, Block, bootstrap, holm, paired_test


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(0)
    true_mean, hits, trials = 40.0, 0, 300
    for trial in range(trials):
        scores = rng.normal(true_mean, 15.0, size=(1, 120))  # one seed, 120 images
        ci = bootstrap([Block("lama", scores)], n_boot=400, seed=trial)
        hits += ci.low <= true_mean <= ci.high
    assert 0.91 <= hits / trials <= 0.98  # binomial sd at 95 %: 1.3 points


def test_two_level_interval_covers_seed_and_image_noise() -> None:
    rng = np.random.default_rng(1)
    hits, trials = 0, 200
    for trial in range(trials):
        seed_effects = rng.normal(0.0, 3.0, size=(5, 1))  # five seeds of one configuration
        images = rng.normal(0.0, 10.0, size=(1, 80))  # the same 80 test images in every seed
        scores = 50.0 + seed_effects + images + rng.normal(0.0, 2.0, size=(5, 80))
        ci = bootstrap([Block("lama", scores)], n_boot=300, seed=trial)
        hits += ci.low <= 50.0 <= ci.high
    assert hits / trials >= 0.85  # percentile intervals with 5 seeds run a little narrow; images-only would be ~0.6


def test_bootstrap_is_deterministic_for_a_seed_and_refuses_tiny_n() -> None:
    scores = np.random.default_rng(2).uniform(0, 100, size=(3, 50))
    blocks = [Block("lama", scores), Block("ldm", scores[:, :40])]
    assert bootstrap(blocks, 200, seed=7) == bootstrap(blocks, 200, seed=7)
    assert bootstrap(blocks, 200, seed=7) != bootstrap(blocks, 200, seed=8)
    assert bootstrap(blocks).value == pytest.approx(np.mean([scores.mean(), scores[:, :40].mean()]))
    tiny = bootstrap([Block("lama", scores[:, :1])])
    assert not tiny.ok and tiny.reason == TOO_SMALL and tiny.value == pytest.approx(scores[:, 0].mean())
    assert bootstrap([]).reason == "no per-image scores"


def test_nan_scores_are_left_out_as_the_metric_mean_does() -> None:
    scores = np.array([[10.0, np.nan, 30.0, 50.0]])
    ci = bootstrap([Block("lama", scores)], 300, seed=0)
    assert ci.value == pytest.approx(30.0) and 10.0 <= ci.low <= ci.high <= 50.0


def test_paired_test_on_identical_runs_finds_no_difference() -> None:
    scores = np.random.default_rng(3).uniform(0, 100, size=(2, 200))
    result = paired_test([Block("lama", scores)], [Block("lama", scores.copy())], n_boot=500, seed=0)
    assert result.difference == 0.0 and result.p == 1.0 and result.low <= 0.0 <= result.high


def test_paired_test_finds_a_planted_difference_that_an_unpaired_look_would_miss() -> None:
    rng = np.random.default_rng(4)
    images = rng.uniform(0, 100, size=(1, 300))  # large image-to-image spread
    a, b = images + 1.5 + rng.normal(0, 0.5, (1, 300)), images + rng.normal(0, 0.5, (1, 300))
    result = paired_test([Block("lama", a)], [Block("lama", b)], n_boot=1000, seed=0)
    assert result.difference == pytest.approx(1.5, abs=0.15)
    assert result.p < 0.01 and 1.0 < result.low < result.high < 2.0
    unpaired_a, unpaired_b = bootstrap([Block("lama", a)], 500), bootstrap([Block("lama", b)], 500)
    assert unpaired_a.low < unpaired_b.high  # each interval alone overlaps the other: pairing is what detects it


def test_holm_matches_a_hand_computation() -> None:
    # m = 4, sorted p: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> monotone 0.06)
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []
