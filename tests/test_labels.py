"""Seen vs held-out labels in every printout: deeploc-train's results table, deeploc-eval's lines, model summaries."""

from __future__ import annotations

import re
from pathlib import Path

from deeploc.cli.evaluate import format_scores
from deeploc.data.roles import subset_role, training_phrase
from deeploc.inference.loading import describe_model
from deeploc.runs.rundir import RunDir
from deeploc.training.results import format_results

SUBSETS = ["inpaint-telea", "copy-move", "blur-noise", "splice-jpeg"]


def _scores(iou: float) -> dict[str, float]:
    return {"iou": iou, "f1_fixed": iou, "f1_best": iou, "ap": iou, "n_images": 8}


def _metrics(split: str, subset: str) -> dict:
    config = {"decoder": "conv4", "depth": 4, "feature": "image_embed", "split": split, "subset": subset}
    config.update(subsets=SUBSETS, encoder="sam2.1_hiera_micro", encoder_weights="random", generated_data=True)
    # The held-out subset first, as a leave-one-out run tests it; a tiny value that :g would print as 7.465e-11.
    test = {subset: _scores(7.465e-11), **{s: _scores(50.0) for s in SUBSETS if s != subset}}
    return {"config": config, "test": test, "convention": "study"}


def _rows(table: str) -> dict[str, str]:
    """Console table rows keyed by their subset name."""
    return {line.split()[0]: line for line in table.splitlines() if line.split() and line.split()[0] in SUBSETS}


def test_leave_one_out_results_label_the_held_out_subset(tmp_path: Path) -> None:
    table = format_results(_metrics("leave_one_out", "blur-noise"), RunDir(tmp_path))
    assert "trained on inpaint-telea, copy-move, splice-jpeg (held out: blur-noise)" in table
    assert "in-domain" not in table
    rows = _rows(table)
    assert "blur-noise (held out)" in rows["blur-noise"]
    assert all("(seen)" in rows[s] for s in SUBSETS if s != "blur-noise")
    assert "0.00" in rows["blur-noise"] and not re.search(r"\de-\d", table)  # never in scientific notation
    assert "metric convention study" in table


def test_cross_results_label_in_and_out_of_domain(tmp_path: Path) -> None:
    table = format_results(_metrics("cross", "copy-move"), RunDir(tmp_path))
    assert "cross split, trained on copy-move;" in table
    rows = _rows(table)
    assert "copy-move (in-domain)" in rows["copy-move"]
    assert all("(out-of-domain)" in rows[s] for s in SUBSETS if s != "copy-move")


def test_eval_lines_label_subsets_by_their_role_in_training() -> None:
    results = _metrics("leave_one_out", "blur-noise")["test"]
    trained = _metrics("leave_one_out", "blur-noise")["config"]
    rows = _rows("\n".join(format_scores(results, trained)))
    assert "blur-noise (held out)" in rows["blur-noise"] and "copy-move (seen)" in rows["copy-move"]
    assert "IoU@0.5[study]   0.00" in rows["blur-noise"]  # every value names its convention
    unknown = format_scores(results, {})  # an export without training records: no role claimed
    assert not any("(" in line.split("IoU")[0] for line in unknown)


def test_model_summary_names_the_held_out_subset() -> None:
    metadata = {
        "decoder": {"depth": 20, "feature": "image_embed"},
        "encoder": {"config": "sam2.1_hiera_s", "image_size": 1024, "weights": "random:seed=0"},
        "training": {"config": _metrics("leave_one_out", "ldm")["config"]},
    }
    text = describe_model(metadata)
    assert "leave_one_out split, trained on inpaint-telea, copy-move, blur-noise, splice-jpeg (held out: ldm)" in text
    metadata["training"]["config"] = _metrics("cross", "ldm")["config"]
    assert describe_model(metadata).endswith("cross split, trained on ldm")


def test_roles() -> None:
    assert [subset_role("cross", "a", t) for t in "ab"] == ["in-domain", "out-of-domain"]
    assert [subset_role("in_domain", "a", t) for t in "a"] == ["in-domain"]
    assert [subset_role("leave_one_out", "a", t) for t in "ab"] == ["held out", "seen"]
    assert training_phrase("leave_one_out", "a") == "trained on the other subsets (held out: a)"
