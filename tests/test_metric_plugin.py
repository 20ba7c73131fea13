"""A metric is one registered function: it then appears in LocalizationMetrics, deeploc-eval's files, the
report's tables and the console lines, with no list to edit anywhere else (docs/extending.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from deeploc.evaluation.scoring import score_keys, write_results
from deeploc.metrics import (
    METRICS,
    LocalizationMetrics,
    ScoreInputs,
    image_scores,
    metric_names,
    optimized_metrics,
    register_metric,
)
from deeploc.report.write import write_report
from deeploc.testing import MetricContract
from tests.test_report import write_run


@pytest.fixture
def precision_metric() -> Iterator[str]:
    """Precision at the threshold, registered for one test only."""

    @register_metric("precision", "Precision", "share of predicted pixels that are manipulated")
    def precision(x: ScoreInputs) -> torch.Tensor:
        pred = x.probs > x.threshold
        predicted = pred.sum(1).to(x.dtype)
        return torch.where(predicted > 0, 100.0 * (pred & x.gt).sum(1).to(x.dtype) / predicted, torch.nan)

    yield "precision"
    METRICS._classes.pop("precision")


def test_a_registered_metric_is_reported_everywhere(precision_metric: str, tmp_path: Path) -> None:
    assert metric_names()[-1] == precision_metric and metric_names()[:4] == ("iou", "f1_fixed", "f1_best", "ap")
    prob = torch.zeros(8, 8)
    prob[:4] = 0.9  # rows 0-3 predicted; rows 2-5 manipulated
    mask = torch.zeros(8, 8)
    mask[2:6] = 1
    assert image_scores(prob, mask)["precision"] == pytest.approx(50.0)
    metric = LocalizationMetrics()
    metric.update(torch.logit(torch.stack([prob, torch.zeros(8, 8)])[:, None]), torch.stack([mask, mask]))
    scores = metric.compute()
    assert float(scores["precision"]) == pytest.approx(50.0)  # the empty prediction is undefined: left out

    results = {"lama": {k: float(v) for k, v in scores.items()}}
    _, csv_path = write_results(tmp_path / "eval", results, {"split": "test", "convention": "study"})
    assert "precision" in score_keys() and "precision" in csv_path.read_text().splitlines()[0]
    write_run(tmp_path / "sweep" / "a", "conv4", "image_embed", "in_domain", "lama", {"lama": 60.0})
    report = write_report(tmp_path / "sweep", tmp_path / "out").report_md.read_text()
    assert "ID Precision" in report


# The shipped contract, on every built-in metric and on a metric registered like an outside one.
class TestIoUContract(MetricContract):
    name = "iou"


class TestF1FixedContract(MetricContract):
    name = "f1_fixed"


class TestF1BestContract(MetricContract):
    name = "f1_best"


class TestAPContract(MetricContract):
    name = "ap"


def test_a_registered_metric_passes_the_contract_and_is_optimizable(precision_metric: str) -> None:
    contract = MetricContract()
    contract.name = precision_metric
    contract.test_registered_and_optimizable()
    contract.test_percentages_that_rank_a_perfect_prediction_first()
    assert optimized_metrics()["val/precision"] == "max" and optimized_metrics()["val/loss"] == "min"


def test_a_metric_direction_is_max_or_min() -> None:
    with pytest.raises(ValueError, match="direction='up' must be 'max' or 'min'"):
        register_metric("bad", "Bad", "a metric with a wrong direction", direction="up")
