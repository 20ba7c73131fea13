"""`deeploc-train -m hparams_search=optuna`: real Optuna searches (deeploc's sweeper, hydra_plugins/deeploc_optuna) of 1-epoch trials on the micro
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
    assert (sweeper.n_trials, sweeper.n_jobs, sweeper.sampler.n_startup_trials) == (20, 1, 10)
    assert sweeper.max_failure_rate == 0.5 and sweeper.storage is None  # the journal in the sweep folder
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


def test_the_search_space_syntax_is_hydras_sweep_syntax_and_the_command_line_wins() -> None:
    """`data.batch_size=64` fixes a searched key, `model.lr='interval(1e-4,1e-3)'` re-ranges it (after the preset)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.deeploc_optuna._space import search_space

    preset = [f"{key}={value}" for key, value in _compose("hparams_search=optuna").hydra.sweeper.params.items()]
    space, fixed = search_space([*preset, "data.batch_size=64", "model.lr=interval(1e-4,1e-3)", "seed=range(0,12,4)"])
    assert fixed == {"data.batch_size": "64"}
    assert space["model.lr"] == FloatDistribution(1e-4, 1e-3)
    assert space["model.weight_decay"] == CategoricalDistribution([0.0, 1e-5, 1e-4, 1e-3])
    assert space["decoder.depth"] == CategoricalDistribution([4, 12, 20]) and space["seed"] == IntDistribution(
        0, 8, step=4
    )
    assert search_space(preset)[0]["model.lr"] == FloatDistribution(1e-4, 1e-2, log=True)


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


# ------------------------------------------------------------------ the sweeper: failures, kill -9, resume (tiny jobs)
# tests/optuna_app: a real Hydra multirun of deeploc's Optuna sweeper whose jobs take milliseconds (4 trials).
APP = "tests.optuna_app.app"
REPO = Path(__file__).resolve().parents[1]


def _app_env(workdir: Path, **extra: str) -> dict[str, str]:
    import os

    from tests.e2e import env_for

    env = env_for(workdir) | extra
    env.pop("HYDRA_FULL_ERROR")  # errors as the user sees them: one line
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run_app(workdir: Path, *args: str, check: bool = True, **extra: str):
    import subprocess
    import sys

    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", APP, "-m", *args], cwd=workdir, env=_app_env(workdir, **extra),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _study(workdir: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = workdir / "sweeps" / "tiny" / "optuna.journal"
    assert journal.is_file()
    return optuna.load_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(journal))))


def _states(study) -> list[str]:
    return [trial.state.name for trial in study.get_trials()]


def test_a_failed_trial_is_recorded_and_the_search_goes_on_to_n_trials_finished_ones(tmp_path: Path) -> None:
    """Trial 1 fails: it is recorded FAIL with its reason, the search goes on until 4 trials finished, and the best
    finished trial is written (the old sweeper ended the whole search at the first failure, writing nothing)."""
    proc = _run_app(tmp_path, DEEPLOC_TEST_FAIL="1")
    study = _study(tmp_path)
    assert _states(study) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert study.trials[1].user_attrs["failure"] == "trial 1 broke on purpose"
    assert "trial 1 failed (failure 1 of this run; 2 allowed): trial 1 broke on purpose" in proc.stdout + proc.stderr
    best = yaml.safe_load((tmp_path / "sweeps" / "tiny" / BEST_FILE).read_text())
    assert best["best_value"] == pytest.approx(study.best_value)
    assert Path(best["run_dir"]).name == str(study.best_trial.number)
    # The same command again: the study is complete, nothing runs again.
    started = (tmp_path / "started.txt").read_text()
    _run_app(tmp_path, DEEPLOC_TEST_FAIL="1")
    assert (tmp_path / "started.txt").read_text() == started


def test_too_many_failures_stop_the_search_in_one_line_with_the_best_trial_written(tmp_path: Path) -> None:
    """2 trials may fail (max_failure_rate 0.5 of 4); the third failure stops the search with exit 1 and one line,
    and the trial that finished before is written as the best."""
    proc = _run_app(tmp_path, check=False, DEEPLOC_TEST_FAIL="1,2,3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("optuna-app: ")]
    assert "stopped: 3 trials failed in this run, more than hydra.sweeper.max_failure_rate=0.5" in line
    assert "last: trial 3: trial 3 broke on purpose" in line and "Traceback" not in proc.stderr
    study = _study(tmp_path)
    assert _states(study) == ["COMPLETE", "FAIL", "FAIL", "FAIL"]
    best = yaml.safe_load((tmp_path / "sweeps" / "tiny" / BEST_FILE).read_text())
    assert Path(best["run_dir"]).name == "0" and best["best_value"] == pytest.approx(study.trials[0].value)
    # Another search in the same sweep folder (width fixed) is refused, naming the change.
    other = _run_app(tmp_path, "width=4", check=False)
    assert (
        other.returncode == 1 and "this sweep folder holds the Optuna search 'tiny' of other settings" in other.stderr
    )
    assert "changed: width" in other.stderr


def test_a_search_survives_kill_9_of_its_driver_and_the_same_command_continues(tmp_path: Path) -> None:
    """kill -9 of the driver while trial 2 runs; the same command then keeps trials 0 and 1, marks trial 2 failed
    (interrupted) and runs its settings again, and ends with 4 finished trials: the same trials as a search never
    interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    work = tmp_path / "killed"
    work.mkdir()
    driver = subprocess.Popen(
        [sys.executable, "-m", APP, "-m"], cwd=work, env=_app_env(work, DEEPLOC_TEST_HOLD="2"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (work / "holding").exists() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (work / "holding").exists(), "trial 2 never started"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    assert _states(_study(work)) == ["COMPLETE", "COMPLETE", "RUNNING"]

    proc = _run_app(work)
    assert "trial 2 was interrupted: its driver (pid" in proc.stdout + proc.stderr
    study = _study(work)
    assert _states(study) == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert "interrupted" in study.trials[2].user_attrs and study.trials[3].params == study.trials[2].params
    started = [line.split(" ", 1)[0] for line in (work / "started.txt").read_text().splitlines()]
    assert started == ["0", "1", "2", "3", "4"]  # the finished trials 0 and 1 did not run again
    assert (work / "sweeps" / "tiny" / BEST_FILE).is_file()

    _run_app(tmp_path / "whole")
    whole = _study(tmp_path / "whole")
    finished = [t.params for t in study.trials if t.state.name == "COMPLETE"]
    assert finished == [t.params for t in whole.trials]


def test_a_trial_of_a_driver_on_another_host_is_taken_as_interrupted_when_its_heartbeat_stops(tmp_path: Path) -> None:
    """Drivers on several nodes share a study: another node's running trial is left alone while its driver's
    heartbeat file is fresh, and restarted when it is older than STALE_S (or gone: the driver ended)."""
    import os
    import socket
    import time

    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from hydra_plugins.deeploc_optuna._impl import DRIVERS, STALE_S, driver_stopped

    def running(driver: str):
        return create_trial(
            state=TrialState.RUNNING, params={"lr": 0.1}, distributions={"lr": FloatDistribution(0, 1)},
            user_attrs={"driver": driver},
        )  # fmt: skip

    other = running("node-b:4242")
    assert driver_stopped(other, tmp_path)  # no heartbeat: its driver ended
    beat = tmp_path / DRIVERS / "node-b-4242"
    beat.parent.mkdir()
    beat.touch()
    assert not driver_stopped(other, tmp_path)
    os.utime(beat, (time.time() - STALE_S - 5,) * 2)
    assert driver_stopped(other, tmp_path)
    # On this host the process decides: this test's own process is alive.
    assert not driver_stopped(running(f"{socket.gethostname()}:{os.getpid()}"), tmp_path)
