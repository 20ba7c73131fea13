"""`deeploc-train -m hparams_search=optuna`: real Optuna searches (hydra-optuna-sweeper) of 1-epoch trials on the micro
encoder; what the search optimises (the best validation IoU, never a test score); the SLURM launcher with it."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from deeploc.config import CONF_DIR
from deeploc.training.hparams import BEST_FILE, RESULTS_FILE
from deeploc.training.results import best_validation_value
from tests.e2e import TINY_DATA, run_cli

TRIALS = 3
SEARCHED = ("model.lr", "model.weight_decay", "data.batch_size", "decoder.depth")
RETURNED = re.compile(r"best validation val/iou of the run: (\S+) \(the value returned to Hydra\)")


def _search(workdir: Path, data: Path, features: Path) -> Path:
    """A 3-trial search with the preset's own search space (batch size searched too); returns its sweep folder."""
    workdir.mkdir(parents=True, exist_ok=True)
    tiny = [arg for arg in TINY_DATA if not arg.startswith("data.batch_size=")]
    args = ["-m", "hparams_search=optuna", f"hydra.sweeper.n_trials={TRIALS}", "trainer.max_epochs=1"]
    args += ["overlays=0", "logger=csv", f"data.root={data}", f"features.dir={features}", *tiny]
    proc = run_cli("deeploc.cli.train", args, workdir)
    assert "best trial: val/iou max = " in proc.stdout + proc.stderr
    return workdir / "outputs" / "sweeps" / "optuna"


def _trials(sweep: Path) -> dict[tuple[str, ...], dict]:
    """Each trial by its searched settings: the value its job returned to the sweeper (its log), the best val/iou
    of its epochs (its metrics.csv) and its test IoUs (metrics.json)."""
    import json

    trials = {}
    for run in sorted(p.parent for p in sweep.glob("*/metrics.json")):
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        searched = tuple(sorted(line for line in overrides if line.split("=")[0] in SEARCHED))
        with open(run / "csv" / "metrics.csv", newline="") as handle:
            val_iou = [float(row["val/iou"]) for row in csv.DictReader(handle) if row.get("val/iou")]
        metrics = json.loads((run / "metrics.json").read_text())
        returned = best_validation_value(metrics, "val/iou")  # what deeploc-train's main returns to the sweeper
        [shown] = RETURNED.findall((run / "train.log").read_text())
        assert float(shown) == pytest.approx(returned, abs=0.005) and "e-" not in shown  # 2 decimals, no 7.8e-11
        test = {name: s["iou"] for name, s in metrics["test"].items()}
        trials[searched] = {"run": run, "returned": returned, "best_val": max(val_iou), "test": test}
    return trials


@pytest.fixture(scope="module")
def searches(shared_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same search twice on one private dataset: as generated, then with its TEST masks shuffled."""
    work = tmp_path_factory.mktemp("optuna")
    data, features = work / "data", shared_workdir / "features"
    first = _search(work / "first", data, features)
    for folder in data.glob("*/wacv_data/data/*/fake/*/masks/test"):
        masks = sorted(folder.glob("*.png"))
        contents = [m.read_bytes() for m in masks]
        for mask, content in zip(masks, contents[1:] + contents[:1]):  # each test image gets another's mask
            mask.write_bytes(content)
    second = _search(work / "second", data, features)
    return first, second


def test_the_search_returns_each_trials_best_validation_iou_and_saves_the_best_trial(searches) -> None:
    sweep, _ = searches
    trials = _trials(sweep)
    assert len(trials) == TRIALS
    # The search space of conf/hparams_search/optuna.yaml was sampled: every searched key in every trial.
    assert all(len(searched) == len(SEARCHED) for searched in trials)
    for trial in trials.values():
        assert trial["returned"] == pytest.approx(trial["best_val"], abs=1e-4)
    best = max(trials.values(), key=lambda t: t["returned"])
    # What the sweeper recorded as best (optimization_results.yaml) is the best of the returned validation values.
    results = yaml.safe_load((sweep / RESULTS_FILE).read_text())
    assert results["best_value"] == pytest.approx(best["returned"], abs=1e-9)
    saved = yaml.safe_load((sweep / BEST_FILE).read_text())
    assert Path(saved["run_dir"]).resolve() == best["run"].resolve()
    assert saved["best_value"] == pytest.approx(best["returned"]) and saved["direction"] == "maximize"
    assert saved["overrides"] == yaml.safe_load((best["run"] / ".hydra" / "overrides.yaml").read_text())
    assert saved["command"].startswith("deeploc-train ") and "hparams_search" not in saved["command"]


def test_the_choice_never_sees_the_test_set(searches) -> None:
    """The same search with every test image given another image's mask: the same trials, the same returned values
    and the same best trial, while the test scores changed."""
    first, second = (_trials(sweep) for sweep in searches)
    assert first.keys() == second.keys()
    for searched in first:
        assert second[searched]["returned"] == first[searched]["returned"]
    assert any(second[s]["test"] != first[s]["test"] for s in first), "shuffling the test masks changed no score"
    best = [yaml.safe_load((sweep / BEST_FILE).read_text())["best_params"] for sweep in searches]
    assert best[0] == best[1]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_search_space_direction_and_sampler_seed_are_the_documented_ones() -> None:
    cfg = _compose("hparams_search=optuna")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed == 12345 and sweeper.direction == "maximize" and cfg.optimized_metric == "val/iou"
    assert set(sweeper.params) == set(SEARCHED)
    # Minimising the validation loss turns the direction around.
    assert _compose("hparams_search=optuna", "optimized_metric=val/loss").hydra.sweeper.direction == "minimize"


@pytest.mark.usefixtures("srun_on_path")
def test_the_search_submits_its_trials_as_slurm_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real Optuna sweeper with `hydra/launcher=slurm`, up to sbatch: each batch of n_jobs trials is one SLURM
    array whose tasks carry the sampled settings; the jobs' returned values (here the scheduler's fake answers)
    feed the study, which picks the best."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra.core.plugins import Plugins
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import HydraContext

    cfg = _compose(
        "hparams_search=optuna",
        "hydra/launcher=slurm",
        f"paths.output_dir={tmp_path / 'out'}",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        "hydra.launcher.partition=gpu",
    )
    scripts: list[str] = []
    trials: list[list[str]] = []

    class Finished:
        def __init__(self, value: float) -> None:
            self.value = value

        def results(self) -> list[JobReturn]:
            ret = JobReturn(status=JobStatus.COMPLETED)
            ret.return_value = self.value
            return [ret]

    def fake_map_array(self, fn, *iterables):
        executor = self._executor
        executor.parameters["map_count"] = len(iterables[0])
        scripts.append(executor._make_submission_file_text(executor._submitit_command_str, "uid"))
        trials.extend(list(overrides) for overrides in iterables[0])
        return [Finished(float(len(trials) - len(iterables[0]) + i)) for i in range(len(iterables[0]))]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    context = HydraContext(config_loader=None, callbacks=None)  # used by the jobs themselves, not run here
    sweeper = Plugins.instance().instantiate_sweeper(config=cfg, hydra_context=context, task_function=None)
    sweeper.sweep(arguments=["subset_index=1"])
    assert len(scripts) == 2 and all("#SBATCH --array=0-1%2" in text.splitlines() for text in scripts)
    assert all("#SBATCH --partition=gpu" in text.splitlines() for text in scripts)
    assert len(trials) == 4
    assert all({line.split("=")[0] for line in t} >= {*SEARCHED, "subset_index"} for t in trials)
    # The last trial answered the highest value: the study's best is that trial (maximize).
    results = yaml.safe_load((tmp_path / "out" / "sweeps" / "optuna" / RESULTS_FILE).read_text())
    assert results["best_value"] == 3.0
    assert {f"{k}={v}" for k, v in results["best_params"].items()} <= set(trials[-1])


def test_a_search_without_m_is_refused_naming_the_preset() -> None:
    from deeploc.errors import ConfigError
    from deeploc.training.settings import check_choices

    hydra = _compose("hparams_search=optuna").hydra
    with pytest.raises(ConfigError, match=r"hparams_search=optuna is a sweep .* Add -m: deeploc-train -m "):
        check_choices(hydra)


def test_the_best_trial_is_found_among_finished_trials_only(tmp_path: Path) -> None:
    """A trial of another search in the same folder (other fixed settings) or an unfinished one is never chosen."""
    from deeploc.training.hparams import find_best_trial

    def trial(name: str, overrides: list[str], best: float | None) -> None:
        run = tmp_path / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        if best is not None:
            (run / "metrics.json").write_text(f'{{"status": "finished", "best_val": {{"val/iou": {best}}}}}')

    trial("other_search", ["model.lr=0.01", "subset_index=1"], 50.0)
    trial("unfinished", ["model.lr=0.01", "subset_index=0"], None)
    trial("this", ["model.lr=0.01", "subset_index=0", "seed=3"], 50.0)
    found = find_best_trial(tmp_path, {"model.lr": 0.01}, 50.0, ["subset_index=0"], "val/iou")
    assert found == (tmp_path / "this", ["model.lr=0.01", "subset_index=0", "seed=3"])
    shutil.rmtree(tmp_path / "this")
    assert find_best_trial(tmp_path, {"model.lr": 0.01}, 50.0, ["subset_index=0"], "val/iou") is None
