"""deeploc-eval --real / --perturb and the report's detection and robustness sections, on real trained runs (micro
SAM2 at 64 px, generated data; tests/test_predict.py's runs), and any dataset: folders and manifest copies of the
training data score exactly like the data itself."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from deeploc.cli.evaluate import main as eval_main
from deeploc.cli.report import main as report_main
from deeploc.data.images import read_rgb
from deeploc.data.sources import build_source
from deeploc.evaluation.perturbations import Perturbation
from deeploc.evaluation.robustness import run_robustness
from deeploc.evaluation.scoring import evaluate, index_for_eval
from deeploc.inference.loading import load_model
from deeploc.inference.predict import predict_images
from deeploc.metrics import image_score, metric_names
from tests.test_data_sources import folders_copy, manifest_copy
from tests.test_predict import shared_base, train_run

pytestmark = [
    pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights"),
    pytest.mark.filterwarnings("ignore:Found keys that are in the model state dict"),
]

SUBSETS = ["inpaint-telea", "copy-move", "blur-noise", "splice-jpeg"]
PERTURB = ["jpeg=100", "resize=0.5", "noise=0.03"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two trained runs (CONV-4 and CONV-12 on the same data and encoder)."""
    base = shared_base(tmp_path_factory)
    return {
        "conv4": train_run(base, "random-encoder", "trainer.max_epochs=2"),
        "conv12": train_run(base, "conv12", "~arch", "decoder=conv12", "trainer.max_epochs=1"),
    }


@pytest.fixture(scope="module")
def sweep(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of both runs, each evaluated by deeploc-eval --real --perturb into its own eval/ folder."""
    root = tmp_path_factory.mktemp("sweep")
    for name, run in runs.items():
        shutil.copytree(run, root / name, ignore=shutil.ignore_patterns("eval", "wandb"))
        assert (
            eval_main([str(root / name), "--real", "--perturb", *PERTURB, "--device", "cpu", "--batch-size", "4"]) == 0
        )
    return root


def out_of(run: Path) -> Path:
    (folder,) = (run / "eval").iterdir()
    return folder


def data_root(run: Path) -> Path:
    return Path(json.loads((run / "metrics.json").read_text())["config"]["data"])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------------- --real, files


def test_real_images_detection_equals_sklearn_on_the_image_scores(sweep: Path) -> None:
    out = out_of(sweep / "conv4")
    files = ["eval.json", "eval.csv", "detection.json", "detection.csv", "detection.md", "image_scores.csv"]
    assert all((out / f).is_file() for f in files)
    detection = json.loads((out / "detection.json").read_text())
    assert detection["pixel_threshold"] == 0.5 and "valid split" in detection["threshold_note"]
    rows = read_csv(out / "image_scores.csv")
    real = [r for r in rows if r["subset"] == "real"]
    assert len(real) == 8 and {r["subset"] for r in rows} == {"real", *SUBSETS}
    for subset in SUBSETS:
        fake = [r for r in rows if r["subset"] == subset]
        labels = [0] * len(real) + [1] * len(fake)
        for kind in ("top", "max"):
            scores = [float(r[kind]) for r in real + fake]
            cell = detection["test"][subset][kind]
            assert cell["auc"] == pytest.approx(100 * roc_auc_score(labels, scores), abs=1e-3)
            predicted = [s > cell["threshold"] for s in scores]
            assert cell["balanced_accuracy"] == pytest.approx(
                100 * balanced_accuracy_score(labels, predicted), abs=1e-9
            )
    assert "pixel threshold 0.5" in (out / "detection.md").read_text()
    assert {r["threshold"] for r in read_csv(out / "eval.csv")} == {"0.5"}


def test_false_alarms_and_image_scores_are_deeploc_predicts(sweep: Path) -> None:
    """The real images' image scores and flagged pixels, recomputed through deeploc-predict's own path."""
    run = sweep / "conv4"
    model = load_model(run)
    real = build_source("dolos", root=data_root(run)).real_samples("test")
    probs = predict_images(model, [read_rgb(s.image) for s in real], batch_size=1)
    rows = {r["name"]: r for r in read_csv(out_of(run) / "image_scores.csv") if r["subset"] == "real"}
    for sample, prob in zip(real, probs):
        assert float(rows[sample.name]["top"]) == pytest.approx(image_score(prob), abs=1e-5)
        assert float(rows[sample.name]["max"]) == pytest.approx(float(prob.max()), abs=1e-5)
    flagged = [float((p > 0.5).double().mean()) for p in probs]
    alarms = json.loads((out_of(run) / "detection.json").read_text())["real"]
    assert alarms["false_alarm_pixels"] == pytest.approx(100 * np.mean(flagged), abs=1e-3)
    assert alarms["false_alarm_images"] == pytest.approx(100 * np.mean([f > 0 for f in flagged]))


# ---------------------------------------------------------------------------------------------------- --perturb


def test_robustness_files_and_jpeg_100_close_to_clean(sweep: Path) -> None:
    out = out_of(sweep / "conv4")
    data = json.loads((out / "robustness.json").read_text())
    assert data["threshold"] == 0.5 and data["convention"] == "study"
    clean, jpeg = data["clean"], data["perturbed"]["jpeg=100"]
    for subset in SUBSETS:
        for metric in metric_names():
            assert abs(jpeg[subset][metric] - clean[subset][metric]) < 1.0, (subset, metric)
    rows = read_csv(out / "robustness.csv")
    assert len(rows) == len(SUBSETS) * (1 + len(PERTURB))
    assert {(r["perturbation"], r["strength"]) for r in rows} == {
        ("none", ""),
        ("jpeg", "100"),
        ("resize", "0.5"),
        ("noise", "0.03"),
    }
    assert {r["convention"] for r in rows} == {"study"} and {r["threshold"] for r in rows} == {"0.5"}
    assert "metric convention study, pixel threshold 0.5" in (out / "robustness.md").read_text()
    for metric in metric_names():
        assert cv2.imread(str(out / f"robustness_{metric}.png")) is not None


def test_each_perturbation_changes_what_the_encoder_sees(runs: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(runs["conv4"])
    by_subset = index_for_eval(build_source("dolos", root=data_root(runs["conv4"])), ["copy-move"])
    seen: list[torch.Tensor] = []
    hook = model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        clean = evaluate(model, by_subset, batch_size=8)
        inputs = {"clean": seen.pop()}
        perturbations = [
            Perturbation(n, s)
            for n, s in (("jpeg", 100), ("jpeg420", 90), ("resize", 0.5), ("blur", 1), ("noise", 0.03))
        ]
        results = run_robustness(model, by_subset, perturbations, batch_size=8)
        inputs.update({p.text: x for p, x in zip(perturbations, seen)})
    finally:
        hook.remove()
    assert len(seen) == len(perturbations)
    for name, x in inputs.items():
        if name != "clean":
            assert x.shape != inputs["clean"].shape or not torch.equal(x, inputs["clean"]), name
    assert inputs["resize=0.5"].shape[-2:] == (32, 32) and inputs["clean"].shape[-2:] == (64, 64)
    assert set(results) == {p.text for p in perturbations} and results["jpeg=100"].keys() == clean.keys()


# ------------------------------------------------------------------------------------------------- any dataset


def test_folders_copy_of_the_training_data_scores_identically(runs: dict[str, Path], tmp_path: Path) -> None:
    run, subset = runs["conv4"], "copy-move"
    root = folders_copy(data_root(run).parent, tmp_path / "casia", subset)
    dolos, folders = tmp_path / "dolos", tmp_path / "folders"
    common = ["--real", "--threshold-split", "none", "--device", "cpu"]
    assert eval_main([str(run), "--subsets", subset, "--out", str(dolos), *common]) == 0
    options = [
        "--source-option",
        "mask_suffix=_gt",
        "--source-option",
        "real=real",
        "--source-option",
        f"subset={subset}",
    ]
    argv = [str(run), "--source", "folders", "--data-root", str(root), *options, "--out", str(folders), *common]
    assert eval_main(argv) == 0
    for name in ("eval.json", "detection.json"):
        a, b = (json.loads((d / name).read_text()) for d in (dolos, folders))
        assert a["test"] == b["test"] and a.get("real") == b.get("real"), name
    assert json.loads((folders / "eval.json").read_text())["source"]["source"] == "folders"


def test_manifest_copy_of_the_training_data_scores_identically(sweep: Path, tmp_path: Path) -> None:
    run = sweep / "conv4"
    csv_path = manifest_copy(data_root(run).parent, tmp_path / "m", SUBSETS, ("valid", "test"))
    out = tmp_path / "manifest"
    argv = [
        str(run),
        "--source",
        "manifest",
        "--data-root",
        str(csv_path),
        "--real",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert eval_main([*argv, "--batch-size", "4"]) == 0
    for name in ("eval.json", "detection.json"):
        a, b = (json.loads((d / name).read_text()) for d in (out_of(run), out))
        assert a["test"] == b["test"] and a.get("real") == b.get("real") and a.get("thresholds") == b.get("thresholds")


def test_images_of_several_sizes_are_evaluated_size_by_size(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["conv4"]
    root = folders_copy(data_root(run).parent, tmp_path / "mixed", "blur-noise")
    for image in sorted((root / "images").iterdir())[:3]:  # three images (and their masks) at another size
        for path in (image, root / "masks" / f"{image.stem}_gt.png"):
            cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (48, 40), interpolation=cv2.INTER_NEAREST))
    scores = {}
    for batch in ("8", "1"):
        out = tmp_path / f"b{batch}"
        argv = [str(run), "--source", "folders", "--data-root", str(root), "--source-option", "mask_suffix=_gt"]
        assert eval_main([*argv, "--out", str(out), "--batch-size", batch, "--device", "cpu"]) == 0
        scores[batch] = json.loads((out / "eval.json").read_text())["test"]["mixed"]
    assert scores["8"]["n_images"] == 8
    assert scores["8"] == pytest.approx(scores["1"], rel=1e-4)  # batched vs single: float32 rounding only


def test_bad_evaluation_requests_are_refused_with_the_fix(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    run = runs["conv4"]
    root = folders_copy(data_root(run).parent, tmp_path / "d", "copy-move")
    folders = [str(run), "--source", "folders", "--data-root", str(root), "--source-option", "mask_suffix=_gt"]
    cases = [
        ([str(run), "--perturb", "jpeg=0"], "jpeg strength 0 is invalid"),
        ([str(run), "--real", "--split", "valid"], "would choose the detection threshold on the evaluated images"),
        ([*folders, "--real"], "no real-image folder: set data.source_options.real"),
        ([*folders, "--source-option", "real=real", "--real"], "--threshold-split none"),
        ([*folders, "--subsets", "lama"], "one subset, 'd', not lama: pass --subsets d"),
    ]
    for argv, message in cases:
        assert eval_main([*argv, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 1
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------- report


def test_report_puts_detection_beside_the_iou_and_compares_robustness(sweep: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    assert report_main([str(sweep), "--out", str(out), "--robustness"]) == 0
    report = (out / "report.md").read_text()
    assert "Detection AUC (real vs each test subset, %)" in report and "## Detection on real images" in report
    assert "## Robustness" in report and "pixel threshold 0.5" in report
    section = report.split("## Detection on real images")[1].split("##")[0]
    rows_md = [line.split(" | ") for line in section.splitlines() if line.startswith("| conv")]
    assert [(r[0], r[-1]) for r in rows_md] == [("| conv4", "1 |"), ("| conv12", "1 |")]  # one seed each
    for metric in metric_names():
        assert cv2.imread(str(out / f"robustness_{metric}.png")) is not None
    rows = read_csv(out / "robustness.csv")
    assert {r["decoder"] for r in rows} == {"conv4", "conv12"} and len(rows) == 2 * (1 + len(PERTURB))
    # The ID values are the runs' own numbers (one training subset each: ID = its diagonal cell).
    detection = json.loads((out_of(sweep / "conv4") / "detection.json").read_text())
    cells = [
        r for r in read_csv(out / "detection.csv") if r["decoder"] == "conv4" and r["row_subset"] == r["test_subset"]
    ]
    assert float(cells[0]["auc"]) == pytest.approx(detection["test"][cells[0]["test_subset"]]["top"]["auc"], abs=1e-4)
    robust = json.loads((out_of(sweep / "conv4") / "robustness.json").read_text())
    conv4 = next(r for r in rows if r["decoder"] == "conv4" and r["perturbation"] == "noise")
    assert float(conv4["id_iou"]) == pytest.approx(robust["perturbed"]["noise=0.03"]["inpaint-telea"]["iou"], abs=1e-4)
    # Without --robustness: the detection table stays, the robustness section does not appear.
    assert report_main([str(sweep), "--out", str(tmp_path / "plain")]) == 0
    assert "## Robustness" not in (tmp_path / "plain" / "report.md").read_text()
