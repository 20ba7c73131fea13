"""deeploc.report and deeploc-report on sweep directories written here in the documented metrics.json format."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.patches import Rectangle

from deeploc import __version__
from deeploc.cli.report import main
from deeploc.report import figures as report_figures
from deeploc.report.collect import MissingRun, collect_runs
from deeploc.report.provenance import LABELS, study_gaps
from deeploc.report.study import study_bars, study_comparison
from deeploc.report.tables import build_matrices, summary_table
from deeploc.report.write import write_report

RP, LDM, LAMA, PLUR = "repaint-p2-9k", "ldm", "lama", "pluralistic"
# iou[train][test]; ID = (60 + 40 + 80 + 70) / 4 = 62.5; OOD = sum(off-diagonal) / 12 = 151 / 12
IOU = {
    RP: {RP: 60.0, LDM: 20.0, LAMA: 10.0, PLUR: 30.0},
    LDM: {RP: 25.0, LDM: 40.0, LAMA: 15.0, PLUR: 5.0},
    LAMA: {RP: 8.0, LDM: 4.0, LAMA: 80.0, PLUR: 12.0},
    PLUR: {RP: 2.0, LDM: 6.0, LAMA: 14.0, PLUR: 70.0},
}
OOD = 151 / 12
DIGEST = "ab" * 32
# The study's setup, as deeploc.train.summarise_config records it (metrics.json "config").
STUDY_SETUP = {
    "depth": None,
    "decoder_name": "conv",
    "decoder_options": {},
    "parameters": None,
    "encoder_kind": "sam2",
    "encoder": "sam2.1_hiera_s",
    "encoder_overrides": {},
    "encoder_weights": "/ckpt/sam2.1_hiera_small.pt",
    "weights": f"sha256:{DIGEST}",
    "image_size": 1024,
    "max_epochs": 20,
    "schedule": "fixed",
    "plateau": None,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "batch_size": 64,
    "precision": "32-true",
    "augment": None,
    "split_n_train": None,
    "split_n_valid": None,
    "split_seed": 42,
    "data": "/data/wacv_data/data",
    "data_source": "dolos",
    "data_source_options": {},
    "n_train": 0,
    "n_valid": 0,
    "mask_polarity": "black_is_manipulated",
    "mask_threshold": None,
    "features": "cache",
    "generated_data": False,
    "data_params": None,
    "seed": 42,
    "subsets": [RP, LDM, LAMA, PLUR],
    "deeploc_version": __version__,
}
LOO_SETUP = {"split_n_train": 3000, "split_n_valid": 300, "batch_size": 32}
# What the README's demo (random tiny encoder on generated data, 2 epochs, TruFor metrics) records.
DEMO_SETUP = {
    "encoder": "sam2.1_hiera_t",
    "encoder_weights": "random",
    "weights": "random:seed=0",
    "image_size": 256,
    "max_epochs": 2,
    "generated_data": True,
    "data_params": {"n_train": 160, "n_valid": 32, "n_test": 48, "size": 256, "seed": 0},
    "data": "/tmp/outputs/data/synthetic/wacv_data/data",
}


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
    convention: str | None = "study",
    **setup: object,
) -> Path:
    """A Hydra job folder with the study's setup changed by `setup`; `test=None` leaves metrics.json out (a run
    that died); `convention=None` leaves the key out."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(f"decoder: {decoder}\n")
    if test is not None:
        config = {"decoder": decoder, "feature": feature, "split": split, "subset": subset}
        config.update({**STUDY_SETUP, **(LOO_SETUP if split == "leave_one_out" else {}), **setup})
        metrics = {
            "config": config,
            "test": {name: scores(v) for name, v in test.items()},
            "best_checkpoint": "checkpoints/best.ckpt",
            "best_val_iou": 50.0,
            "epochs": config["max_epochs"],
            "status": status,
        }
        if convention is not None:
            metrics["convention"] = convention
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


def by_name(table: dict) -> dict:
    """Matrices (or their files) keyed by (decoder, feature), when each pair has one configuration."""
    named = {(k.decoder, k.feature): v for k, v in table.items()}
    assert len(named) == len(table), "several configurations share a decoder and feature"
    return named


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
    matrices = by_name(build_matrices(collect_runs(sweep)[0]))
    assert list(matrices) == [("conv4", "image_embed"), ("conv20", "image_embed"), ("conv20", "high_res_feats_1")]
    full = matrices[("conv20", "image_embed")]
    assert full.subsets == [RP, LDM, LAMA, PLUR]
    assert all(full.value(a, b) == IOU[a][b] for a in IOU for b in IOU)
    assert full.id_mean() == pytest.approx(62.5)
    assert full.ood_mean() == pytest.approx(OOD)

    rows = {(r.decoder, r.feature): r for r in summary_table(matrices)}
    row = rows[("conv20", "image_embed")]
    assert row.complete and row.n_runs == 4
    assert row.id["f1_fixed"].mean == pytest.approx(31.25)
    assert row.ood["f1_best"].mean == pytest.approx(OOD / 2 + 1)
    assert row.id["ap"].mean == pytest.approx(62.5 / 4)
    assert row.id["iou"].std is None and row.matrix.seeds().seeds == "1"  # one seed: no spread to report

    in_domain = rows[("conv4", "image_embed")]
    assert in_domain.complete and in_domain.id["iou"].mean == pytest.approx(62.5) and in_domain.ood["iou"].mean is None

    partial = rows[("conv20", "high_res_feats_1")]
    assert not partial.complete
    assert partial.missing["iou"] == [(LAMA, b) for b in IOU] + [(PLUR, b) for b in IOU]
    assert partial.id["iou"].mean == pytest.approx((60 + 40) / 2)  # computed from the available cells, not dropped
    assert partial.ood["iou"].mean == pytest.approx((20 + 10 + 30 + 25 + 15 + 5) / 6)


def test_runs_repeating_a_seed_count_as_one_seed(tmp_path: Path) -> None:
    # in_domain and cross runs of one setting train identically: the same seed twice is one measurement, not n=2.
    write_run(tmp_path / "a", "conv20", "image_embed", "in_domain", LAMA, {LAMA: 70.0}, subsets=[LAMA, LDM])
    write_run(tmp_path / "b", "conv20", "image_embed", "cross", LAMA, {LAMA: 80.0, LDM: 4.0}, subsets=[LAMA, LDM])
    matrix = by_name(build_matrices(collect_runs(tmp_path)[0]))[("conv20", "image_embed")]
    assert matrix.value(LAMA, LAMA) == pytest.approx(75.0)
    assert matrix.cell(LAMA, LAMA).seeds == "1" and matrix.cell(LAMA, LAMA).std is None
    assert matrix.missing() == [(LDM, LAMA), (LDM, LDM)]  # a cross run makes the off-diagonal expected
    report = write_report(tmp_path, tmp_path / "out").report_md.read_text(encoding="utf-8")
    assert "lama→lama seed 42 (2 runs)" in report


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

    matrix_rows = read_csv(by_name(paths.matrix_csvs)[("conv20", "image_embed")])
    assert [r["train\\test"] for r in matrix_rows] == [RP, LDM, LAMA, PLUR]
    assert all(float(r[b]) == IOU[r["train\\test"]][b] for r in matrix_rows for b in IOU)
    hrf1_rows = read_csv(by_name(paths.matrix_csvs)[("conv20", "high_res_feats_1")])
    assert hrf1_rows[2][LAMA] == "" and float(hrf1_rows[0][RP]) == 60.0

    missing = read_csv(paths.missing_csv)
    assert {r["path"] for r in missing} == {"broken", "hrf1,subset=lama", "hrf1,subset=pluralistic"}

    report = paths.report_md.read_text(encoding="utf-8")
    assert "| conv20 | image_embed | ? | 62.50 | 12.58 |" in report
    assert "| conv20 | high_res_feats_1 | ? | 50.00* | 17.50* |" in report
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
    assert "| conv20 | image_embed | 63.62 | 63.62 | +0.00 | 14.59 | 14.59 | +0.00 | yes |" in report
    assert row["comparable"] == "True" and row["differences_from_study"] == ""
    assert "NOT comparable" not in report


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
    loo = by_name(build_matrices(collect_runs(sweep)[0], "leave_one_out"))[("conv20", "image_embed")]
    assert loo.value(LDM, LDM) == 22.98  # the held-out subset's own test split
    assert loo.id_mean() == pytest.approx((22.98 + 18.14 + 9.73 + 31.24) / 4)  # 20.52, the study's held-out mean
    assert loo.missing() == []

    paths = write_report(sweep, tmp_path / "out", compare_study=True)
    rows = read_csv(by_name(paths.loo_csvs)[("conv20", "image_embed")])
    assert [r["held_out\\test"] for r in rows] == [RP, LDM, LAMA, PLUR]
    assert float(rows[1][LAMA]) == 55.65
    report = paths.report_md.read_text(encoding="utf-8")
    assert "Held-out mean IoU: 20.52" in report
    assert "| conv20 | image_embed | 20.52 | 20.52 | +0.00 |" in report
    assert "heatmap_loo_conv20_image_embed.png" in {p.name for p in paths.figures}
    # the cross run is its own (incomplete) configuration and never mixes into the leave-one-out matrix
    assert "| conv20 | image_embed | ? | 80.00* | 8.00* |" in report


def test_cli_exit_codes_and_stdout(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(sweep), "--out", str(tmp_path / "out"), "--compare-study"]) == 0
    stdout = capsys.readouterr().out
    assert "| decoder | feature | params | ID IoU | OOD IoU | ID F1_fixed |" in stdout
    assert "| conv20 | image_embed | ? | 62.50 | 12.58 | 31.25 |" in stdout
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


# ------------------------------------------------------------------------------ settings, seeds and provenance

# One changed setting each (metrics.json config keys, or the top-level convention); the label the tables use.
DIFFERENT_SETTINGS = {
    "encoder": ({"encoder": "sam2.1_hiera_t"}, "encoder"),
    "encoder_overrides": ({"encoder_overrides": {"image_encoder.trunk.drop_path_rate": 0.1}}, "encoder overrides"),
    "weights": ({"weights": "sha256:" + "cd" * 32}, "weights"),
    "random_seed": ({"weights": "random:seed=1", "encoder_weights": "random"}, "weights"),
    "image_size": ({"image_size": 512}, "input size"),
    "max_epochs": ({"max_epochs": 2}, "max epochs"),
    "schedule": ({"schedule": "plateau", "plateau": {"patience": 5, "factor": 0.1, "min_lr": 1e-6}}, "schedule"),
    "lr": ({"lr": 1e-4}, "lr"),
    "weight_decay": ({"weight_decay": 0.01}, "weight decay"),
    "batch_size": ({"batch_size": 32}, "batch size"),
    "precision": ({"precision": "bf16-mixed"}, "precision"),
    "augment": ({"augment": {"jpeg": {"p": 1.0}}}, "augmentation"),
    "data_root": ({"data": "/other/copy/wacv_data/data"}, "data"),
    "generated": ({"generated_data": True, "data_params": DEMO_SETUP["data_params"]}, "data"),
    "mask_polarity": ({"mask_polarity": "white_is_manipulated"}, "mask polarity"),
    "convention": ({"convention": "trufor"}, "metric convention"),
    # A plug-in's options (issue: a depth-4 and a depth-6 outside ViT were averaged as two seeds).
    "encoder_architecture": ({"encoder_architecture": {"depth": 6}}, "encoder architecture"),
    "decoder_options": ({"decoder_options": {"inputs": "image_embed", "width": 16}}, "decoder options"),
}


@pytest.mark.parametrize("name", DIFFERENT_SETTINGS)
def test_runs_differing_in_any_setting_are_never_averaged(name: str, tmp_path: Path) -> None:
    setup, label = DIFFERENT_SETTINGS[name]
    convention = setup.get("convention", "study")
    changed = {k: v for k, v in setup.items() if k != "convention"}
    write_run(tmp_path / "a", "conv20", "image_embed", "cross", LAMA, {LAMA: 60.0, LDM: 10.0})
    write_run(
        tmp_path / "b",
        "conv20",
        "image_embed",
        "cross",
        LAMA,
        {LAMA: 80.0, LDM: 30.0},
        convention=convention,
        **changed,
    )
    matrices = list(build_matrices(collect_runs(tmp_path)[0]).values())
    assert len(matrices) == 2
    assert sorted(m.value(LAMA, LAMA) for m in matrices) == [60.0, 80.0]  # never 70
    assert all(m.label_keys == (next(k for k, v in LABELS.items() if v == label),) for m in matrices)
    assert all(f"({label} " in m.label for m in matrices)
    assert len({m.label for m in matrices}) == 2

    paths = write_report(tmp_path, tmp_path / "out")
    report = paths.report_md.read_text(encoding="utf-8")
    assert f"| decoder | feature | params | {label} | ID IoU |" in report  # the differing setting names the rows
    assert f"| {label} | varies: " in report  # and the provenance header says it varies
    assert len(paths.matrix_csvs) == 2 and len({p.name for p in paths.matrix_csvs.values()}) == 2
    assert len(read_csv(paths.summary_csv)) == 2


def test_leave_one_out_runs_of_other_split_sizes_are_never_averaged(tmp_path: Path) -> None:
    write_run(tmp_path / "a", "conv20", "image_embed", "leave_one_out", LAMA, {LAMA: 20.0})
    write_run(tmp_path / "b", "conv20", "image_embed", "leave_one_out", LAMA, {LAMA: 30.0}, split_n_train=12)
    matrices = list(build_matrices(collect_runs(tmp_path)[0], "leave_one_out").values())
    assert sorted(m.value(LAMA, LAMA) for m in matrices) == [20.0, 30.0]
    assert {m.settings.split_sizes for m in matrices} == {
        "3000 train + 300 valid per seen subset, seed 42",
        "12 train + 300 valid per seen subset, seed 42",
    }


def test_generated_data_are_identified_by_their_parameters(tmp_path: Path) -> None:
    params = DEMO_SETUP["data_params"]
    generated = {"generated_data": True, "data_params": params}
    write_run(tmp_path / "a", "conv4", "image_embed", "in_domain", LAMA, {LAMA: 50.0}, seed=0, data="/a", **generated)
    write_run(tmp_path / "b", "conv4", "image_embed", "in_domain", LAMA, {LAMA: 52.0}, seed=1, data="/b", **generated)
    [matrix] = build_matrices(collect_runs(tmp_path)[0]).values()  # another folder, same parameters: same data
    assert matrix.cell(LAMA, LAMA).seeds == "2"
    assert matrix.settings.show("data") == "generated: n_test=48, n_train=160, n_valid=32, seed=0, size=256"
    other = {"generated_data": True, "data_params": {**params, "size": 64}}
    write_run(tmp_path / "c", "conv4", "image_embed", "in_domain", LAMA, {LAMA: 9.0}, seed=2, data="/a", **other)
    assert len(build_matrices(collect_runs(tmp_path)[0])) == 2


def test_seeds_give_mean_std_and_n(tmp_path: Path) -> None:
    # Three seeds of one setting, two subsets (cross): iou[seed][train][test].
    iou = {
        0: {LAMA: {LAMA: 70.0, LDM: 10.0}, LDM: {LAMA: 20.0, LDM: 40.0}},
        1: {LAMA: {LAMA: 74.0, LDM: 12.0}, LDM: {LAMA: 16.0, LDM: 44.0}},
        2: {LAMA: {LAMA: 81.0, LDM: 17.0}, LDM: {LAMA: 27.0, LDM: 39.0}},
    }
    for seed, rows in iou.items():
        for train, test in rows.items():
            write_run(tmp_path / f"s{seed}-{train}", "conv20", "image_embed", "cross", train, test, seed=seed)
    [matrix] = build_matrices(collect_runs(tmp_path)[0]).values()
    assert matrix.label_keys == ()  # seeds never split a configuration
    cell = matrix.cell(LAMA, LAMA)
    assert (cell.mean, cell.std, cell.seeds) == pytest.approx((75.0, np.std([70, 74, 81], ddof=1), "3"))
    per_seed_id = [np.mean([rows[LAMA][LAMA], rows[LDM][LDM]]) for rows in iou.values()]
    per_seed_ood = [np.mean([rows[LAMA][LDM], rows[LDM][LAMA]]) for rows in iou.values()]
    [row] = summary_table({matrix.settings: matrix})
    assert row.id["iou"].mean == pytest.approx(np.mean(per_seed_id))
    assert row.id["iou"].std == pytest.approx(np.std(per_seed_id, ddof=1))
    assert row.ood["iou"].std == pytest.approx(np.std(per_seed_ood, ddof=1))
    assert row.n_runs == 6

    paths = write_report(tmp_path, tmp_path / "out")
    [summary] = read_csv(paths.summary_csv)
    assert float(summary["id_iou_std"]) == pytest.approx(np.std(per_seed_id, ddof=1), abs=1e-4)
    assert summary["seeds"] == "3" and summary["n_runs"] == "6"
    report = paths.report_md.read_text(encoding="utf-8")
    id_text = f"{np.mean(per_seed_id):.2f} ± {np.std(per_seed_id, ddof=1):.2f}"
    ood_text = f"{np.mean(per_seed_ood):.2f} ± {np.std(per_seed_ood, ddof=1):.2f}"
    assert f"| conv20 | image_embed | ? | {id_text} | {ood_text} |" in report
    assert report.count("| 3 |") == 1 and "sample standard deviation over seeds" in report
    assert f"**75.00 ± {np.std([70, 74, 81], ddof=1):.2f} (n=3)**" in report  # the matrix cell
    assert "| seeds | 0, 1, 2 |" in report
    cells = {(r["row_subset"], r["test_subset"]): r for r in read_csv(paths.cells_csv)}
    assert cells[(LDM, LAMA)]["seeds"] == "3" and float(cells[(LDM, LAMA)]["iou"]) == pytest.approx(21.0)


def test_unequal_seeds_give_no_std(tmp_path: Path) -> None:
    for seed in (0, 1):
        write_run(tmp_path / f"lama{seed}", "conv4", "image_embed", "in_domain", LAMA, {LAMA: 50.0 + seed}, seed=seed)
    write_run(tmp_path / "ldm0", "conv4", "image_embed", "in_domain", LDM, {LDM: 30.0}, seed=0)
    [row] = summary_table(build_matrices(collect_runs(tmp_path)[0]))
    assert row.id["iou"].mean == pytest.approx((50.5 + 30) / 2)
    assert row.id["iou"].std is None and row.matrix.seeds().seeds == "1–2"


def test_subsets_follow_data_subsets_order(tmp_path: Path) -> None:
    order = ["splice-jpeg", "blur-noise", "copy-move"]  # neither alphabetical nor Dolos's
    for train in order:
        write_run(tmp_path / train, "conv4", "image_embed", "cross", train, {t: 10.0 for t in order}, subsets=order)
    paths = write_report(tmp_path, tmp_path / "out")
    [matrix] = build_matrices(collect_runs(tmp_path)[0]).values()
    assert matrix.subsets == order
    [csv_path] = paths.matrix_csvs.values()
    assert [r["train\\test"] for r in read_csv(csv_path)] == order
    assert list(read_csv(csv_path)[0])[1:] == order
    assert "| train \\ test | splice-jpeg | blur-noise | copy-move |" in paths.report_md.read_text(encoding="utf-8")


def test_report_starts_with_provenance(sweep: Path, tmp_path: Path) -> None:
    report = write_report(sweep, tmp_path / "out").report_md.read_text(encoding="utf-8")
    header = report.split("## Results")[0]
    for line in (
        "| setting | matrix runs (cross, in_domain) |",
        "| encoder | sam2.1_hiera_s |",
        f"| weights | sha256:{DIGEST[:12]} |",
        "| input size | 1024 |",
        "| max epochs | 20 |",
        "| epochs trained | 20 |",
        "| data | /data/wacv_data/data |",
        "| metric convention | study |",
        f"| deeploc (runs) | {__version__} |",
        f"Report written by deeploc {__version__}",
    ):
        assert line in header, line


def test_a_metrics_json_of_deeploc_0_1_is_listed_as_missing_with_the_fix(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    config = {"decoder": "conv4", "depth": 4, "feature": "image_embed", "split": "cross", "subset": LAMA}
    config.update(subsets=[LAMA], encoder="sam2.1_hiera_t", encoder_weights="random", image_size=256)
    test = {LAMA: scores(50.0)}
    (old / "metrics.json").write_text(json.dumps({"config": config, "test": test, "status": "finished", "epochs": 3}))
    runs, [missing] = collect_runs(old)
    assert runs == [] and missing.path == old
    assert "metrics.json: its config lacks" in missing.reason and "if_finished=retrain" in missing.reason
    write_run(tmp_path / "noconv", "conv4", "image_embed", "cross", LAMA, {LAMA: 50.0}, convention=None)
    runs, [missing] = collect_runs(tmp_path / "noconv")
    assert runs == [] and "records no metric convention" in missing.reason


def test_hand_edited_settings_of_odd_types_are_reported_not_crashed_on(tmp_path: Path) -> None:
    write_run(tmp_path / "a", "conv4", "image_embed", "in_domain", LAMA, {LAMA: 50.0})
    odd = {"batch_size": [64], "weights": 5, "lr": "fast", "schedule": "plateau", "plateau": "x", "max_epochs": "20"}
    write_run(tmp_path / "b", "conv4", "image_embed", "in_domain", LAMA, {LAMA: 40.0}, **odd)
    matrices = build_matrices(collect_runs(tmp_path)[0])
    assert sorted(m.value(LAMA, LAMA) for m in matrices.values()) == [40.0, 50.0]
    [edited] = [m.settings for m in matrices.values() if m.value(LAMA, LAMA) == 40.0]
    assert (edited.batch_size, edited.lr, edited.weights) == ("[64]", "fast", "5")
    assert "20 epochs (study: 20)" in study_gaps(edited, "cross")  # a string is not a known epoch count
    report = write_report(tmp_path, tmp_path / "out", compare_study=True).report_md.read_text(encoding="utf-8")
    assert "| batch size | varies: 64; [64] |" in report


def test_compare_study_says_in_the_table_when_not_comparable(tmp_path: Path) -> None:
    study_sweep(tmp_path / "sweep" / "study", "cross", "conv20/image_embed")
    for row in IOU:
        write_run(
            tmp_path / "sweep" / f"demo-{row}",
            "conv20",
            "image_embed",
            "cross",
            row,
            IOU[row],
            convention="trufor",
            **DEMO_SETUP,
        )
    paths = write_report(tmp_path / "sweep", tmp_path / "out", compare_study=True)
    report = paths.report_md.read_text(encoding="utf-8")
    assert "NOT comparable with the study" in report
    [demo] = [line for line in report.splitlines() if "**NO**" in line]
    assert "| random (seed 0) |" in demo and "| 62.50 | 63.62 | -1.12 |" in demo
    assert "**NO**: RANDOM encoder weights" in demo
    for gap in ("encoder sam2.1_hiera_t (study: sam2.1_hiera_s)", "input 256 (study: 1024)", "2 epochs (study: 20)"):
        assert gap in demo
    assert "GENERATED data (study: Dolos)" in demo and "trufor metric convention" in demo
    [study] = [line for line in report.splitlines() if line.endswith("| yes |")]
    assert f"| sha256:{DIGEST[:12]} |" in study and "| 63.62 | 63.62 | +0.00 |" in study
    rows = {r["weights"]: r for r in read_csv(paths.comparison_csv)}
    assert rows["random (seed 0)"]["comparable"] == "False" and rows[f"sha256:{DIGEST[:12]}"]["comparable"] == "True"


def test_leave_one_out_comparison_checks_the_split_sizes(tmp_path: Path) -> None:
    sweep = study_sweep(tmp_path / "sweep", "leave_one_out", "conv20/image_embed")
    comparison = study_comparison(build_matrices(collect_runs(sweep)[0], "leave_one_out"), "leave_one_out")
    assert [r.gaps for r in comparison.rows] == [[]]
    small = study_sweep(tmp_path / "small", "leave_one_out", "conv20/image_embed")
    for metrics_file in small.glob("*/metrics.json"):
        metrics = json.loads(metrics_file.read_text())
        metrics["config"].update(split_n_train=12, split_n_valid=4)
        metrics_file.write_text(json.dumps(metrics))
    comparison = study_comparison(build_matrices(collect_runs(small)[0], "leave_one_out"), "leave_one_out")
    assert comparison.rows[0].gaps == [
        "split sizes 12 train + 4 valid per seen subset, seed 42 (study: 3000 train + 300 valid per seen subset, seed 42)"
    ]


def _legend(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_id_ood_chart_draws_the_study_beside_comparable_rows_only(tmp_path: Path) -> None:
    sweep = study_sweep(tmp_path / "sweep", "cross", "conv20/image_embed")
    matrices = build_matrices(collect_runs(sweep)[0])
    bars, note = study_bars(study_comparison(matrices))
    figure = report_figures.id_ood_figure(summary_table(matrices), bars, note, "caption")
    assert _legend(figure) == ["ID", "ID (study)", "OOD", "OOD (study)"]
    heights = [p.get_height() for p in figure.axes[0].patches]
    assert heights[1] == pytest.approx(63.62) and heights[3] == pytest.approx(14.59, abs=0.005)

    demo = tmp_path / "demo"
    for row in IOU:
        write_run(demo / row, "conv20", "image_embed", "cross", row, IOU[row], **DEMO_SETUP)
    matrices = build_matrices(collect_runs(demo)[0])
    bars, note = study_bars(study_comparison(matrices))
    figure = report_figures.id_ood_figure(summary_table(matrices), bars, note, "caption")
    assert _legend(figure) == ["ID", "OOD"]
    texts = " ".join(t.get_text() for t in figure.texts).replace("\n", " ")
    assert "Study values not drawn (not comparable): RANDOM encoder weights" in texts

    foreign = tmp_path / "foreign"
    write_run(foreign / "a", "conv4", "image_embed", "cross", "faces-a", {"faces-a": 50.0}, subsets=["faces-a"])
    bars, note = study_bars(study_comparison(build_matrices(collect_runs(foreign)[0])))
    assert bars == [] and "does not apply" in note


def test_heatmap_outlines_the_diagonal_and_explains_its_marks(sweep: Path, tmp_path: Path) -> None:
    paths = write_report(sweep, tmp_path / "out")
    matrix = by_name(build_matrices(collect_runs(sweep)[0]))[("conv20", "high_res_feats_1")]
    figure = report_figures.heatmap_figure(matrix, report_figures.heatmap_caption(matrix))
    outlines = [p for p in figure.axes[0].patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert sorted(p.get_xy() for p in outlines) == [(i - 0.5, i - 0.5) for i in range(4)]
    assert figure.axes[0].get_title().startswith("conv20/high_res_feats_1*")
    texts = " ".join(t.get_text() for t in figure.texts).replace("\n", " ")
    assert "Outlined: in-domain cells" in texts and "* = incomplete matrix" in texts
    assert (
        "encoder sam2.1_hiera_s" in texts and "metric convention study" in texts and f"deeploc {__version__}" in texts
    )
    assert (paths.out_dir / "heatmap_conv20_high_res_feats_1.png").is_file()


def test_runs_with_another_optimizer_or_loss_are_two_configurations_never_seeds_of_one(tmp_path: Path) -> None:
    adam = {"optimizer": {"_target_": "torch.optim.adam.Adam"}, "loss": None, "lr_scheduler": None}
    sgd = {"optimizer": {"_target_": "torch.optim.sgd.SGD", "momentum": 0.9}, "loss": None, "lr_scheduler": None}
    for seed, optimization in ((0, adam), (1, sgd)):
        write_run(tmp_path / f"s{seed}", "conv20", "image_embed", "in_domain", LAMA, {LAMA: 40.0 + seed}, seed=seed,
                  optimization=optimization)  # fmt: skip
    matrices = build_matrices(collect_runs(tmp_path)[0])
    labels = sorted(m.label for m in matrices.values())
    assert len(labels) == 2 and all(len(m.seed_values()) == 1 for m in matrices.values()), labels
    assert "optimizer / loss / LR scheduler" in labels[0] and "torch.optim.adam.Adam" in labels[0], labels
    assert "torch.optim.sgd.SGD" in labels[1] and '"momentum":0.9' in labels[1], labels
