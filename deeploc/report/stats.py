"""Uncertainty of the report's numbers: bootstrap confidence intervals, paired tests and Holm's correction (numpy;
threadpoolctl keeps its small matrix products on one BLAS thread).

The data of one value (a matrix cell, or ID / OOD = the mean of several cells) is a list of :class:`Block`: one
per cell, a seeds x images array of per-image scores (NaN = undefined for that image, left out of its mean, as the
metric's own mean does) and the name of the test set its images come from. The value is the mean over blocks of the
mean over seeds of the mean over images, exactly as the tables compute it.

Two-level bootstrap (:func:`bootstrap`)
    Each of ``n_boot`` draws resamples, with replacement, the images of every test set (one draw per test set,
    shared by every block tested on it: the same images are scored in every cell of that column) and the seeds
    (one draw shared by every block when all have the same number of seeds: the seed std of the tables pairs them
    the same way; else one draw per block). With one seed only images are resampled. The interval is the
    percentile interval of the drawn values (2.5 % and 97.5 % for 95 %). Image draws come from
    ``numpy.random.default_rng([seed, crc32(test set)])``, seed draws from ``default_rng([seed, 1])``: a fixed seed
    gives the same interval. A resample's image mean is a weighted sum (resample counts x scores, one matrix
    product), which makes thousands of draws over thousands of images cheap.

Paired test (:func:`paired_test`)
    Two configurations tested on the SAME images (per test set), each with its own seeds: every draw resamples the
    images once for both (pairing) and each one's seeds independently, and takes the difference A - B. The interval
    is the percentile interval of the drawn differences; the two-sided p-value is that of the bootstrap test of
    "no difference" by shifting the draws to the null, ``(1 + #{|d* - d| >= |d|}) / (n_boot + 1)``.

Fewer than 2 images in a test set, or no seed, give no interval ("n too small").
"""

from __future__ import annotations

import functools
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

LEVEL = 0.95
TOO_SMALL = "n too small"


@dataclass(frozen=True)
class Block:
    """Per-image scores of one cell: ``values`` is seeds x images; ``test`` names the test set of its columns
    (blocks with the same ``test`` have the same images in the same order)."""

    test: str
    values: np.ndarray


@dataclass(frozen=True)
class Interval:
    """A value, its confidence interval (None with ``reason`` when there is none), and what it rests on."""

    value: float | None
    low: float | None = None
    high: float | None = None
    reason: str = ""  # why there is no interval ("n too small", "no per-image scores", ...)
    n_images: int = 0  # per test set, the smallest
    n_seeds: int = 0  # per block, the smallest

    @property
    def ok(self) -> bool:
        return self.low is not None and self.high is not None


@dataclass(frozen=True)
class PairedResult:
    """A - B, its confidence interval and two-sided p-value (``p_holm``: after Holm's correction, when applied)."""

    difference: float
    low: float
    high: float
    p: float
    p_holm: float | None = None


def estimate(blocks: Sequence[Block]) -> float:
    """The value the tables show: mean over blocks of the mean over seeds of the (NaN-ignoring) image mean."""
    return float(np.mean([np.mean(_nanmean(b.values, axis=1)) for b in blocks]))


def check_blocks(blocks: Sequence[Block]) -> str:
    """Why `blocks` cannot give an interval ("" when they can)."""
    if not blocks:
        return "no per-image scores"
    sizes = {b.test: b.values.shape[1] for b in blocks}
    if any(b.values.shape[1] != sizes[b.test] for b in blocks):
        return "cells of one test set scored different images"
    if min(sizes.values()) < 2 or min(b.values.shape[0] for b in blocks) < 1:
        return TOO_SMALL
    return ""


def bootstrap(blocks: Sequence[Block], n_boot: int = 1000, seed: int = 0, level: float = LEVEL) -> Interval:
    """The value of `blocks` and its two-level bootstrap percentile interval (module docstring)."""
    reason = check_blocks(blocks)
    n_images = min((b.values.shape[1] for b in blocks), default=0)
    n_seeds = min((b.values.shape[0] for b in blocks), default=0)
    if reason:
        return Interval(estimate(blocks) if blocks else None, reason=reason, n_images=n_images, n_seeds=n_seeds)
    with threadpool_limits(1, user_api="blas"):  # small products: BLAS threads only contend (40x slower on 2 cores)
        draws = _draws(blocks, n_boot, seed, np.random.default_rng([seed, 1]))
    low, high = np.nanpercentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return Interval(estimate(blocks), float(low), float(high), n_images=n_images, n_seeds=n_seeds)


def paired_test(
    a: Sequence[Block], b: Sequence[Block], n_boot: int = 1000, seed: int = 0, level: float = LEVEL
) -> PairedResult:
    """A - B with its bootstrap interval and p-value; `a` and `b` list their blocks in the same order of test sets,
    each pair scored on the same images (the caller checks it). Raises ValueError when n is too small."""
    if check_blocks(a) or check_blocks(b) or [x.test for x in a] != [x.test for x in b]:
        raise ValueError(TOO_SMALL)
    seeds = np.random.default_rng([seed, 1])  # image draws are shared (the pairing); seed draws are each one's own
    with threadpool_limits(1, user_api="blas"):
        out = _draws(a, n_boot, seed, seeds) - _draws(b, n_boot, seed, seeds)
    d = estimate(a) - estimate(b)
    low, high = np.nanpercentile(out, [50 * (1 - level), 50 * (1 + level)])
    extreme = int(np.sum(np.abs(out - d) >= abs(d) - 1e-12 * max(1.0, abs(d))))
    return PairedResult(d, float(low), float(high), (1 + extreme) / (n_boot + 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: the i-th smallest p times (m - i + 1), made
    non-decreasing along that order and capped at 1. Rejecting where the adjusted p < alpha controls the family-wise
    error rate at alpha."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: p_values[k])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@functools.lru_cache(maxsize=8)
def _image_weights(test: str, n: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each of the `n` images of test set `test` is drawn in each of `n_boot` resamples (n_boot x n).

    Drawn from a generator seeded by (seed, test set), so every value that uses test set `test` (its cells, ID,
    OOD, both sides of a paired test) sees the same resamples of its images."""
    rng = np.random.default_rng([seed, zlib.crc32(test.encode("utf-8"))])
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def _draws(blocks: Sequence[Block], n_boot: int, seed: int, seeds: np.random.Generator) -> np.ndarray:
    """`n_boot` bootstrap values of `blocks`: image means as weighted sums (a matrix product with the resample
    counts, NaN images left out), seeds drawn from `seeds`."""
    counts = {b.values.shape[0] for b in blocks}
    k_all = counts.pop() if len(counts) == 1 else 0
    shared = seeds.integers(0, k_all, (n_boot, k_all)) if k_all > 1 else None
    cells = []
    for block in blocks:
        weights = _image_weights(block.test, block.values.shape[1], n_boot, seed)
        defined = np.isfinite(block.values)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (np.where(defined, block.values, 0.0) @ weights.T) / (defined @ weights.T)  # seeds x draws
        k = block.values.shape[0]
        if k == 1:
            cells.append(means[0])
            continue
        pick = shared if shared is not None else seeds.integers(0, k, (n_boot, k))
        cells.append(np.mean(np.take_along_axis(means.T, pick, axis=1), axis=1))
    return np.mean(cells, axis=0)


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean ignoring NaN; NaN (without a warning) where every value is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)
