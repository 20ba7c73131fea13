"""deeploc-report's confidence intervals, paired comparisons (--compare) and LaTeX tables (--latex), on sweeps
whose runs saved per-image scores (scores/<subset>.csv, the format deeploc.metrics writes: index, name, then
<metric>[<convention>] columns)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from deeploc.cli.report import main
from deeploc.report.write import write_report
from tests.test_report import LAMA, LDM, read_csv, write_run

METRICS = ("iou", "f1_fixed", "f1_best", "ap")
N_IMAGES = 60


def scored_run(root: Path, name: str, decoder: str, subset: str, shift: float, seed: int, images: int = N_IMAGES):
    """An in_domain run on `subset` with per-image scores: a shared image difficulty plus `shift` plus seed noise;
    metrics.json's means are the per-image means, as a real run's."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(99).uniform(10, 90, images)  # the same images for every run
    iou = np.clip(base + shift + rng.normal(0, 2.0, images), 0, 100)
    per_image = {m: iou * (1 if m == "iou" else 0.5) for m in METRICS}
    run = write_run(root / name, decoder, "image_embed", "in_domain", subset, {subset: 0.0}, seed=seed)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["test"][subset] = {m: float(np.mean(v)) for m, v in per_image.items()} | {"n_images": images}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "scores").mkdir()
    with (run / "scores" / f"{subset}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "name", *(f"{m}[study]" for m in METRICS)])
        for i in range(images):
            writer.writerow([i, f"img{i:03d}.png", *(repr(float(per_image[m][i])) for m in METRICS)])
    return run


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """conv20 (two seeds) beats conv4 (two seeds) by 3 IoU points on the same images of lama and ldm."""
    root = tmp_path / "sweep"
    for seed in (0, 1):
        for subset in (LAMA, LDM):
            scored_run(root, f"conv20-{subset}-{seed}", "conv20", subset, 3.0, seed)
            scored_run(root, f"conv4-{subset}-{seed}", "conv4", subset, 0.0, 10 + seed)
    return root


def summary_line(report: str, decoder: str) -> list[str]:
    [line] = [x for x in report.split("## Results")[1].splitlines() if x.startswith(f"| {decoder} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_every_id_ood_and_cell_gets_a_deterministic_interval(sweep: Path, tmp_path: Path) -> None:
    paths = write_report(sweep, tmp_path / "a")
    report = paths.report_md.read_text(encoding="utf-8")
    assert "## Confidence intervals (95%, %)" in report and "two-level" in report
    rows = read_csv(paths.ci_csv)
    iou = {(r["decoder"], r["value_of"]): r for r in rows if r["metric"] == "iou"}
    for decoder in ("conv20", "conv4"):
        for what in ("ID", f"{LAMA}→{LAMA}", f"{LDM}→{LDM}"):
            r = iou[decoder, what]
            assert float(r["low"]) < float(r["value"]) < float(r["high"]), (decoder, what)
            assert r["n_seeds"] == "2" and r["n_images"] == str(N_IMAGES)
        assert iou[decoder, "OOD"]["no_interval_because"] == "no run"
    # The interval's value is the table's: ID IoU of conv20.
    assert float(iou["conv20", "ID"]["value"]) == pytest.approx(
        float(summary_line(report, "conv20")[3].split()[0]), abs=0.005
    )
    again = write_report(sweep, tmp_path / "b")
    assert again.ci_csv.read_text() == paths.ci_csv.read_text()  # the same seed: the same intervals
    other = main([str(sweep), "--out", str(tmp_path / "c"), "--ci-seed", "1", "--bootstrap", "300"])
    assert other == 0 and (tmp_path / "c" / "ci.csv").read_text() != paths.ci_csv.read_text()


def test_the_id_ood_chart_draws_the_intervals(sweep: Path, tmp_path: Path) -> None:
    import matplotlib.image

    paths = write_report(sweep, tmp_path / "out")
    rows = {(r["decoder"], r["value_of"]): r for r in read_csv(paths.ci_csv) if r["metric"] == "iou"}
    from deeploc.report import figures as report_figures
    from deeploc.report.collect import collect_runs
    from deeploc.report.tables import build_matrices, summary_table

    matrices = build_matrices(collect_runs(sweep)[0])
    order = [m.decoder for m in matrices.values()]
    intervals = {w: [(float(rows[d, w]["low"]), float(rows[d, w]["high"])) for d in order] for w in ("ID",)}
    figure = report_figures.id_ood_figure(summary_table(matrices), [], "", "caption", intervals)
    segments = [seg for c in figure.axes[0].collections for seg in c.get_segments()]
    assert sorted(round(s[1][1] - s[0][1], 6) for s in segments) == sorted(
        round(float(rows[d, "ID"]["high"]) - float(rows[d, "ID"]["low"]), 6) for d in order
    )
    assert matplotlib.image.imread(paths.out_dir / "id_ood.png").shape[0] > 300


def test_a_run_without_per_image_scores_says_so_and_one_image_is_too_few(sweep: Path, tmp_path: Path) -> None:
    write_run(sweep / "old", "conv12", "image_embed", "in_domain", LAMA, {LAMA: 40.0})
    scored_run(sweep, "tiny", "conv8", LAMA, 0.0, 0, images=1)
    rows = {(r["decoder"], r["value_of"]): r for r in read_csv(write_report(sweep, tmp_path / "o").ci_csv)}
    assert rows["conv12", "ID"]["no_interval_because"] == "no per-image scores" and rows["conv12", "ID"]["low"] == ""
    assert rows["conv8", "ID"]["no_interval_because"] == "n too small" and rows["conv8", "ID"]["low"] == ""
    assert rows["conv20", "ID"]["low"] != ""


def test_compare_finds_the_planted_difference_with_holm(sweep: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = [str(sweep), "--out", str(out), "--compare", "conv20/image_embed", "conv4/image_embed"]
    assert main([*argv, "--compare", "conv4/image_embed", "conv4/image_embed"]) == 0
    text = capsys.readouterr().out
    assert "## Paired comparisons (IoU, %)" in text and "Holm's correction over the 2 tests" in text
    [planted] = [x for x in text.splitlines() if x.startswith("| conv20/image_embed | conv4/image_embed | ID |")]
    diff, ci, p, p_holm = [c.strip() for c in planted.strip("|").split("|")][3:]
    assert float(diff) == pytest.approx(3.0, abs=0.6) and float(p) < 0.01 and float(p_holm) < 0.05
    low, high = map(float, re.findall(r"[-+]\d+\.\d+", ci))
    assert 0 < low < float(diff) < high
    [same] = [x for x in text.splitlines() if x.startswith("| conv4/image_embed | conv4/image_embed | ID |")]
    assert same.split("|")[4].strip() == "+0.00" and float(same.split("|")[6]) == 1.0  # identical: not significant


def test_compare_refuses_runs_tested_on_other_images_and_unknown_names(sweep: Path, tmp_path: Path, capsys) -> None:
    scored_run(sweep, "conv8-lama", "conv8", LAMA, 0.0, 0, images=N_IMAGES - 5)
    scored_run(sweep, "conv8-ldm", "conv8", LDM, 0.0, 0)
    assert main([str(sweep), "--out", str(tmp_path / "o"), "--compare", "conv20/image_embed", "conv8/image_embed"]) == 1
    err = capsys.readouterr().err
    assert "tested on different images of lama (60 vs 55 images" in err and "a paired test needs the same images" in err
    assert len(err.strip().splitlines()) == 1
    assert main([str(sweep), "--out", str(tmp_path / "o"), "--compare", "conv20/image_embed", "nope"]) == 1
    assert "'nope': no such configuration; the report names them: " in capsys.readouterr().err


def test_latex_tables_are_balanced_escaped_and_match_the_markdown(sweep: Path, tmp_path: Path) -> None:
    paths = write_report(sweep, tmp_path / "out", latex=True)
    tex = paths.latex.read_text(encoding="utf-8")
    report = paths.report_md.read_text(encoding="utf-8")
    for env in ("table", "tabular"):
        assert tex.count(rf"\begin{{{env}}}") == tex.count(rf"\end{{{env}}}") >= 3
    assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == tex.count(r"\midrule")
    assert tex.count("{") == tex.count("}")
    assert re.search(r"(?<!\\)_", tex) is None  # every underscore escaped (image\_embed, f1\_fixed)
    assert "image\\_embed" in tex and "metric convention study" in tex and "two-level" in tex
    for decoder in ("conv20", "conv4"):
        markdown = summary_line(report, decoder)
        [row] = [x for x in tex.splitlines() if x.startswith(f"{decoder} & ")]
        cells = [c.strip().removesuffix(r"\\").strip() for c in row.split(" & ")]
        numbers = [re.findall(r"\d+\.\d+", c.replace("$\\pm$", "±")) for c in cells]
        assert numbers[: len(markdown)] == [re.findall(r"\d+\.\d+", c) for c in markdown]
    assert "[" in tex.split("tab:deeploc-summary")[1].split(r"\end{table}")[0]  # the IoU CIs are in the table
