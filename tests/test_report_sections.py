"""deeploc-report's detection, robustness and hyper-parameter search rows, the ID-vs-OOD chart's error bars and the
figures' captions (issue 21 items 5, 6, 7, 16, 17), on sweeps written here in the documented file formats."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import yaml

from deeploc.evaluation.figures import Line, strength_panels
from deeploc.evaluation.perturbations import Perturbation
from deeploc.evaluation.robustness import ordered, robustness_caption, robustness_figures, robustness_lines
from deeploc.report import figures as report_figures
from deeploc.report.collect import collect_runs
from deeploc.report.tables import build_matrices, summary_table
from deeploc.report.write import write_report
from deeploc.training.hparams import BEST_FILE
from tests.test_report import LAMA, LDM, study_sweep, write_run

DATA = "/home/someone/private/wacv_data/data"  # a machine path that no caption may print
METRICS = ("iou", "f1_fixed", "f1_best", "ap")


def add_eval(run: Path, values: dict[str, float], data: str = DATA) -> None:
    """deeploc-eval --real and --perturb results of `run` on its own test data (detection.json, robustness.json in
    the format deeploc.evaluation writes), one value per test subset."""
    folder = run / "eval" / "data-test"
    folder.mkdir(parents=True)
    kinds = ("top", "max")
    detection = {
        "split": "test",
        "data": data,
        "real": {"false_alarm_pixels": 1.0, "false_alarm_images": 10.0},
        "test": {
            s: {k: dict.fromkeys(("auc", "ap", "balanced_accuracy"), v) for k in kinds} for s, v in values.items()
        },
    }
    (folder / "detection.json").write_text(json.dumps(detection))
    scores = {s: {m: v for m in METRICS} for s, v in values.items()}
    robustness = {
        "split": "test",
        "data": data,
        "convention": "study",
        "perturbations": [{"name": "jpeg", "strength": 70.0}],
        "clean": scores,
        "perturbed": {"jpeg=70": {s: {m: v / 2 for m in METRICS} for s, v in values.items()}},
    }
    (folder / "robustness.json").write_text(json.dumps(robustness))


@pytest.fixture
def three_seeds(tmp_path: Path) -> Path:
    """conv4 (lr 0.001): three seeds on lama, only seed 0 evaluated; conv4 (lr 0.0001): one seed, not evaluated."""
    sweep = tmp_path / "sweep"
    for seed, iou in ((0, 10.0), (1, 20.0), (2, 30.0)):
        run = write_run(
            sweep / f"s{seed}", "conv4", "image_embed", "in_domain", LAMA, {LAMA: iou}, seed=seed, data=DATA
        )
        if seed == 0:
            add_eval(run, {LAMA: 80.0})
    write_run(sweep / "lr", "conv4", "image_embed", "in_domain", LAMA, {LAMA: 5.0}, lr=1e-4, data=DATA)
    return sweep


def section(report: str, title: str) -> str:
    return report.split(title)[1].split("\n## ")[0]


def test_detection_and_robustness_rows_are_the_results_tables(three_seeds: Path, tmp_path: Path) -> None:
    report = write_report(three_seeds, tmp_path / "out", robustness=True).report_md.read_text(encoding="utf-8")
    results = section(report, "## Results")
    assert "| conv4 | image_embed | ? | 0.001 | 20.00 ± 10.00 |" in results  # three seeds in the results table
    detection = section(report, "## Detection on real images")
    assert "| decoder | feature | lr | ID AUC |" in detection  # grouped as the results table: lr names the rows
    [evaluated] = [line for line in detection.splitlines() if line.startswith("| conv4 | image_embed | 0.001 |")]
    assert "| 80.00* | — |" in evaluated and evaluated.endswith("| 1 |")  # one seed of three: marked, n says 1
    [not_evaluated] = [line for line in detection.splitlines() if line.startswith("| conv4 | image_embed | 0.0001 |")]
    assert "| — |" in not_evaluated and not_evaluated.endswith("| 0 |")
    assert "- conv4/image_embed (lr 0.001): s1, s2" in detection  # the runs without an evaluation are named

    robustness = section(report, "## Robustness")
    assert "| conv4/image_embed (lr 0.001) ID | 80.00* | 40.00* | 1 |" in robustness  # columns: clean, jpeg=70, seeds
    assert "| conv4/image_embed (lr 0.0001) ID | — | — | 0 |" in robustness
    assert "- conv4/image_embed (lr 0.001): s1, s2" in robustness


def test_each_row_lists_its_seeds_and_runs(three_seeds: Path, tmp_path: Path) -> None:
    report = write_report(three_seeds, tmp_path / "out").report_md.read_text(encoding="utf-8")
    assert "- conv4/image_embed (lr 0.001): seeds 0, 1, 2; runs: s0, s1, s2" in report
    assert "- conv4/image_embed (lr 0.0001): seeds 42; runs: lr" in report


def test_one_seed_rows_draw_no_error_bar_and_say_n_1(three_seeds: Path) -> None:
    rows = summary_table(build_matrices(collect_runs(three_seeds)[0]))
    figure = report_figures.id_ood_figure(rows, [], "", "caption")
    ax = figure.axes[0]
    # Error bars are LineCollections: one segment per bar that has one (ID of the three-seed row), none of length 0.
    segments = [seg for c in ax.collections for seg in c.get_segments()]
    assert len(segments) == 1 and segments[0][1][1] - segments[0][0][1] == pytest.approx(20.0)  # mean ± std
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert [label.splitlines()[-1] for label in labels] == ["n=1", "n=3"]  # lr 0.0001 first: settings order
    plt.close(figure)


def test_a_search_report_shows_the_optimized_validation_value_and_the_chosen_trial(tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    for name, lr, val, test in (("t0", 1e-3, 40.0, 30.0), ("t1", 1e-4, 45.0, 20.0)):
        run = write_run(sweep / name, "conv4", "image_embed", "in_domain", LAMA, {LAMA: test}, lr=lr)
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["best_val"] = {"val/iou": val, "val/loss": 0.5}
        (run / "metrics.json").write_text(json.dumps(metrics))
    best = {"optimized_metric": "val/iou", "direction": "maximize", "best_value": 45.0, "run_dir": str(sweep / "t1")}
    (sweep / BEST_FILE).write_text(yaml.safe_dump(best))
    report = write_report(sweep, tmp_path / "out").report_md.read_text(encoding="utf-8")
    assert "| best validation (optimized) | chosen trial |" in report
    assert "| conv4 | image_embed | ? | 0.0001 | val/iou 45.00 | **chosen** | 20.00 |" in report
    assert "| conv4 | image_embed | ? | 0.001 | val/iou 40.00 |  | 30.00 |" in report  # best test, not chosen
    assert "played no part in the choice" in report


def test_a_leave_one_out_report_opens_with_its_results(tmp_path: Path) -> None:
    sweep = study_sweep(tmp_path / "sweep", "leave_one_out", "conv20/image_embed")
    paths = write_report(sweep, tmp_path / "out")
    report = paths.report_md.read_text(encoding="utf-8")
    assert "No results." not in report
    assert report.index("## Leave-one-out") < report.index("Held-out mean IoU: 20.52")
    assert "No results." not in (paths.out_dir / "summary.md").read_text(encoding="utf-8")


def _texts(figure) -> str:
    return " ".join(t.get_text() for t in figure.texts).replace("\n", " ")


def test_report_captions_name_the_data_folder_not_its_path(three_seeds: Path, tmp_path: Path) -> None:
    matrices = build_matrices(collect_runs(three_seeds)[0])
    for m in matrices.values():
        figure = report_figures.heatmap_figure(m, report_figures.heatmap_caption(m))
        assert "data wacv_data/data" in _texts(figure) and "/home/someone" not in _texts(figure)
        [colorbar] = [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
        assert colorbar.get_ylabel() == "IoU (%)"  # the one colour bar of the report's figures is labelled
        plt.close(figure)


def test_evaluation_robustness_figure_marks_the_in_domain_subset_and_hides_paths(tmp_path: Path) -> None:
    clean = {LAMA: dict.fromkeys(METRICS, 50.0), LDM: dict.fromkeys(METRICS, 10.0)}
    perturbed = {"jpeg=70": {LAMA: dict.fromkeys(METRICS, 40.0), LDM: dict.fromkeys(METRICS, 5.0)}}
    groups = ordered([Perturbation("jpeg", 70.0)])
    trained = {"split": "cross", "subset": LAMA}
    lines = robustness_lines(clean, perturbed, groups, "iou", trained)
    assert [(line.label, line.width) for line in lines] == [
        (f"{LAMA} (in-domain)", 3.0),
        (f"{LDM} (out-of-domain)", 1.5),
    ]
    figure = strength_panels(groups, lines, "iou", "caption")
    assert [line.get_linewidth() for line in figure.axes[0].get_lines()] == [3.0, 1.5]
    plt.close(figure)
    long = [Line("conv20/image_embed (encoder sam2.1_hiera_t, weights random (seed 0), input size 256) ID", "a", "-",
                 {"jpeg": [50.0, 40.0]})]  # fmt: skip
    figure = strength_panels(groups, long, "iou", "caption")  # a report label wraps instead of squeezing the panels
    assert all(len(x) <= 40 for t in figure.axes[-1].get_legend().get_texts() for x in t.get_text().splitlines())
    plt.close(figure)
    context = {"described": "conv4 on image_embed", "split": "test", "data": DATA, "convention": "study"}
    assert "test split of wacv_data/data;" in robustness_caption(context) and "/home" not in robustness_caption(context)
    paths = robustness_figures(tmp_path, clean, perturbed, groups, context, trained)
    assert [p.name for p in paths] == [f"robustness_{m}.png" for m in METRICS]


def test_latex_robustness_tables_carry_the_markdown_numbers(three_seeds: Path, tmp_path: Path) -> None:
    paths = write_report(three_seeds, tmp_path / "out", robustness=True, latex=True)
    tex = paths.latex.read_text(encoding="utf-8")
    robustness = tex.split("tab:deeploc-robustness-iou")[1].split(r"\end{table}")[0]
    assert r"conv4/image\_embed (lr 0.001) ID & 80.00* & 40.00* & 1 \\" in robustness
    assert r"conv4/image\_embed (lr 0.0001) ID & --- & --- & 0 \\" in robustness
    md = section(paths.report_md.read_text(encoding="utf-8"), "## Robustness")
    assert "| conv4/image_embed (lr 0.001) ID | 80.00* | 40.00* | 1 |" in md
