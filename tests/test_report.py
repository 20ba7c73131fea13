"""deeploc.report and deeploc-report on sweep directories written here in the documented metrics.json format."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import pytest

from deeploc.cli.report import main
from deeploc.report import (
    MissingRun,
    build_matrices,
    collect_runs,
    study_comparison,
    summary_table,
    write_report,
)

RP, LDM, LAMA, PLUR = "repaint-p2-9k", "ldm", "lama", "pluralistic"
# iou[train][test]; ID = (60 + 40 + 80 + 70) / 4 = 62.5; OOD = sum(off-diagonal) / 12 = 151 / 12
IOU = {
    RP: {RP: 60.0, LDM: 20.0, LAMA: 10.0, PLUR: 30.0},
    LDM: {RP: 25.0, LDM: 40.0, LAMA: 15.0, PLUR: 5.0},
    LAMA: {RP: 8.0, LDM: 4.0, LAMA: 80.0, PLUR: 12.0},
    PLUR: {RP: 2.0, LDM: 6.0, LAMA: 14.0, PLUR: 70.0},
}
OOD = 151 / 12


def scores(iou: float) -> dict[str, float]:
    """A test entry whose other metrics are simple functions of the IoU."""
    return {"iou": iou, "f1_fixed": iou / 2, "f1_best": iou / 2 + 1, "ap": iou / 4, "n_images": 900}


def write_run(
    run_dir: Path,
    decoder: str,
    feature: str,
    split: str,
    subset: str,
    test: dict[str, float] | None,
    status: str = "finished",
) -> Path:
    """A Hydra job folder; `test=None` leaves metrics.json out (a run that died)."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(f"decoder: {decoder}\n")
    if test is not None:
        config = {"decoder": decoder, "feature": feature, "split": split, "subset": subset, "image_size": 1024}
        metrics = {
            "config": config,
            "test": {name: scores(v) for name, v in test.items()},
            "best_checkpoint": "checkpoints/best.ckpt",
            "best_val_iou": 50.0,
            "status": status,
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """conv20/image_embed: full cross 4x4; conv4/image_embed: in_domain only; conv20/high_res_feats_1: lama
    training run failed and pluralistic's run died before writing metrics.json; one unreadable metrics.json."""
    root = tmp_path / "multirun"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for i, train in enumerate(IOU):
        write_run(root / f"decoder=conv20,subset={train}", "conv20", "image_embed", "cross", train, IOU[train])
        write_run(root / "indomain" / str(i), "conv4", "image_embed", "in_domain", train, {train: IOU[train][train]})
    for train in (RP, LDM):
        write_run(root / f"hrf1,subset={train}", "conv20", "high_res_feats_1", "cross", train, IOU[train])
    write_run(root / "hrf1,subset=lama", "conv20", "high_res_feats_1", "cross", LAMA, IOU[LAMA], status="failed")
    write_run(root / "hrf1,subset=pluralistic", "conv20", "high_res_feats_1", "cross", PLUR, None)
    broken = write_run(root / "broken", "conv20", "image_embed", "cross", RP, None)
    (broken / "metrics.json").write_text('{"config": ')
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_collect_runs_lists_missing_failed_and_invalid(sweep: Path) -> None:
    runs, missing = collect_runs(sweep)
    assert len(runs) == 4 + 4 + 2
    reasons = {m.path.name: m.reason for m in missing}
    assert set(reasons) == {"hrf1,subset=lama", "hrf1,subset=pluralistic", "broken"}
    assert "'failed'" in reasons["hrf1,subset=lama"]
    assert "no metrics.json" in reasons["hrf1,subset=pluralistic"]
    assert "invalid metrics.json" in reasons["broken"]
    assert all(isinstance(m, MissingRun) and m.path.is_dir() for m in missing)


def test_config_must_name_decoder_feature_split_subset(tmp_path: Path) -> None:
    run = write_run(tmp_path / "job", "conv20", "image_embed", "cross", LAMA, {LAMA: 80.0})
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["config"]["split"] = {"mode": "cross"}  # an unflattened Hydra group is not the documented format
    (run / "metrics.json").write_text(json.dumps(metrics))
    runs, [missing] = collect_runs(tmp_path)
    assert runs == [] and "split missing or not a name" in missing.reason


def test_matrices_and_id_ood_by_hand(sweep: Path) -> None:
    matrices = build_matrices(collect_runs(sweep)[0])
    assert list(matrices) == [("conv4", "image_embed"), ("conv20", "image_embed"), ("conv20", "high_res_feats_1")]
    full = matrices[("conv20", "image_embed")]
    assert full.subsets == [RP, LDM, LAMA, PLUR]
    assert all(full.value(a, b) == IOU[a][b] for a in IOU for b in IOU)
    assert full.id_mean() == pytest.approx(62.5)
    assert full.ood_mean() == pytest.approx(OOD)

    rows = {(r.decoder, r.feature): r for r in summary_table(matrices)}
    row = rows[("conv20", "image_embed")]
    assert row.complete and row.n_runs == 4
    assert row.id["f1_fixed"] == pytest.approx(31.25)
    assert row.ood["f1_best"] == pytest.approx(OOD / 2 + 1)
    assert row.id["ap"] == pytest.approx(62.5 / 4)

    in_domain = rows[("conv4", "image_embed")]
    assert in_domain.complete and in_domain.id["iou"] == pytest.approx(62.5) and in_domain.ood["iou"] is None

    partial = rows[("conv20", "high_res_feats_1")]
    assert not partial.complete
    assert partial.missing["iou"] == [(LAMA, b) for b in IOU] + [(PLUR, b) for b in IOU]
    assert partial.id["iou"] == pytest.approx((60 + 40) / 2)  # computed from the available cells, not dropped
    assert partial.ood["iou"] == pytest.approx((20 + 10 + 30 + 25 + 15 + 5) / 6)


def test_duplicate_runs_are_averaged(tmp_path: Path) -> None:
    write_run(tmp_path / "a", "conv20", "image_embed", "in_domain", LAMA, {LAMA: 70.0})
    write_run(tmp_path / "b", "conv20", "image_embed", "cross", LAMA, {LAMA: 80.0, LDM: 4.0})
    matrix = build_matrices(collect_runs(tmp_path)[0])[("conv20", "image_embed")]
    assert matrix.value(LAMA, LAMA) == pytest.approx(75.0)
    assert matrix.missing() == [(LDM, LDM), (LDM, LAMA)]  # a cross run makes the off-diagonal expected


def test_write_report_tables_and_figures(sweep: Path, tmp_path: Path) -> None:
    paths = write_report(sweep, tmp_path / "out")
    assert (paths.n_runs, paths.n_missing) == (10, 3)

    summary = {(r["decoder"], r["feature"]): r for r in read_csv(paths.summary_csv)}
    full = summary[("conv20", "image_embed")]
    assert float(full["id_iou"]) == pytest.approx(62.5)
    assert float(full["ood_iou"]) == pytest.approx(OOD, abs=1e-4)
    assert full["complete"] == "True" and full["missing_cells"] == ""
    assert summary[("conv4", "image_embed")]["ood_iou"] == ""
    partial = summary[("conv20", "high_res_feats_1")]
    assert partial["complete"] == "False" and "lama→ldm" in partial["missing_cells"]

    matrix_rows = read_csv(paths.matrix_csvs[("conv20", "image_embed")])
    assert [r["train\\test"] for r in matrix_rows] == [RP, LDM, LAMA, PLUR]
    assert all(float(r[b]) == IOU[r["train\\test"]][b] for r in matrix_rows for b in IOU)
    hrf1_rows = read_csv(paths.matrix_csvs[("conv20", "high_res_feats_1")])
    assert hrf1_rows[2][LAMA] == "" and float(hrf1_rows[0][RP]) == 60.0

    missing = read_csv(paths.missing_csv)
    assert {r["path"] for r in missing} == {"broken", "hrf1,subset=lama", "hrf1,subset=pluralistic"}

    report = paths.report_md.read_text(encoding="utf-8")
    assert "| conv20 | image_embed | 62.50 | 12.58 |" in report
    assert "| conv20 | high_res_feats_1 | 50.00* | 17.50* |" in report
    assert "- conv20/high_res_feats_1: missing lama→repaint-p2-9k" in report
    assert "hrf1,subset=pluralistic | no metrics.json" in report
    assert (paths.out_dir / "summary.md").is_file() and (paths.out_dir / "matrices.md").is_file()

    names = {p.name for p in paths.figures}
    assert names == {
        "heatmap_conv4_image_embed.png",
        "heatmap_conv20_image_embed.png",
        "heatmap_conv20_high_res_feats_1.png",
        "id_ood.png",
    }
    for figure in paths.figures:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert figure.stat().st_size > 10_000
        height, width, _ = matplotlib.image.imread(figure).shape
        assert height > 300 and width > 300


def study_sweep(root: Path, split: str, key: str) -> Path:
    """One run per row of a published study matrix, as if the study had been rerun exactly."""
    from importlib import resources

    table = json.loads(resources.files("deeploc").joinpath("resources/study_results.json").read_text())[split][key]
    decoder, feature = key.split("/")
    for row, test in table.items():
        write_run(root / f"{split}-{row}", decoder, feature, split, row, test)
    return root


def test_compare_study_reproduces_conv20_image_embed(tmp_path: Path) -> None:
    sweep = study_sweep(tmp_path / "sweep", "cross", "conv20/image_embed")
    paths = write_report(sweep, tmp_path / "out", compare_study=True)
    [row] = read_csv(paths.comparison_csv)
    assert float(row["id_iou"]) == pytest.approx(63.62) and float(row["id_iou_study"]) == pytest.approx(63.62)
    assert float(row["ood_iou_study"]) == pytest.approx(14.59, abs=0.005)  # protocol.md: CONV-20 rows recompute
    report = paths.report_md.read_text(encoding="utf-8")
    assert "| conv20 | image_embed | 63.62 | 63.62 | +0.00 | 14.59 | 14.59 | +0.00 |" in report


def test_compare_study_does_not_apply_to_other_subsets(tmp_path: Path) -> None:
    write_run(tmp_path / "a", "conv20", "image_embed", "cross", "faces-a", {"faces-a": 50.0, "faces-b": 9.0})
    matrices = build_matrices(collect_runs(tmp_path)[0])
    comparison = study_comparison(matrices)
    assert not comparison.applies and comparison.rows == []
    assert "does not apply" in comparison.note and "faces-a" in comparison.note
    paths = write_report(tmp_path, tmp_path / "out", compare_study=True)
    assert paths.comparison_csv is None
    assert "does not apply" in paths.report_md.read_text(encoding="utf-8")


def test_leave_one_out_table(tmp_path: Path) -> None:
    sweep = study_sweep(tmp_path / "sweep", "leave_one_out", "conv20/image_embed")
    write_run(sweep / "cross-lama", "conv20", "image_embed", "cross", LAMA, IOU[LAMA])
    loo = build_matrices(collect_runs(sweep)[0], "leave_one_out")[("conv20", "image_embed")]
    assert loo.value(LDM, LDM) == 22.98  # the held-out subset's own test split
    assert loo.id_mean() == pytest.approx((22.98 + 18.14 + 9.73 + 31.24) / 4)  # 20.52, the study's held-out mean
    assert loo.missing() == []

    paths = write_report(sweep, tmp_path / "out", compare_study=True)
    rows = read_csv(paths.loo_csvs[("conv20", "image_embed")])
    assert [r["held_out\\test"] for r in rows] == [RP, LDM, LAMA, PLUR]
    assert float(rows[1][LAMA]) == 55.65
    report = paths.report_md.read_text(encoding="utf-8")
    assert "Held-out mean IoU: 20.52" in report
    assert "| conv20 | image_embed | 20.52 | 20.52 | +0.00 |" in report
    assert "heatmap_loo_conv20_image_embed.png" in {p.name for p in paths.figures}
    # the cross run is its own (incomplete) configuration and never mixes into the leave-one-out matrix
    assert "| conv20 | image_embed | 80.00* | 8.00* |" in report


def test_cli_exit_codes_and_stdout(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(sweep), "--out", str(tmp_path / "out"), "--compare-study"]) == 0
    stdout = capsys.readouterr().out
    assert "| decoder | feature | ID IoU | OOD IoU | ID F1_fixed |" in stdout
    assert "| conv20 | image_embed | 62.50 | 12.58 | 31.25 |" in stdout
    assert "## Comparison with the study" in stdout and "## Missing or failed runs" in stdout
    assert "| conv20 | high_res_feats_1 | 50.00* | 67.28 |" in stdout  # incomplete stays marked beside the study
    assert (tmp_path / "out" / "summary.csv").is_file()

    assert main([str(tmp_path / "nowhere")]) == 2
    empty = tmp_path / "empty"
    write_run(empty / "job0", "conv20", "image_embed", "cross", LAMA, None)
    assert main([str(empty)]) == 1
    assert "no finished run" in capsys.readouterr().err
    assert (empty / "report" / "missing_runs.csv").is_file()


def test_cli_wandb_offline(sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    assert main([str(sweep), "--out", str(tmp_path / "out"), "--wandb"]) == 0
    [run_dir] = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("*.wandb"))
    [table] = (run_dir / "files" / "media" / "table").glob("summary_*.table.json")
    assert "high_res_feats_1" in table.read_text()
    images = {p.name.split("_0_")[0] for p in (run_dir / "files" / "media" / "images").rglob("*.png")}
    assert {"id_ood", "heatmap_conv20_image_embed"} <= images
