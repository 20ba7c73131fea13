"""deeploc's Optuna search: trials proposed by Optuna's ask/tell API, launched as Hydra jobs, kept in a journal.

* **Persistent and shared**: the study lives in ``<sweep>/optuna.journal`` (Optuna's JournalStorage with a file
  backend; docs/decisions.md says why), so re-running the command continues the study and several drivers (e.g.
  SLURM array tasks) can share it. ``hydra.sweeper.storage`` names another journal file or an Optuna storage URL.
* **n_trials finished trials**: the search ends when the study holds ``n_trials`` COMPLETE trials; a failed trial
  is recorded (state FAIL, its reason in the user attr ``failure``) and replaced, within a failure budget of
  ``max_failure_rate * n_trials`` failures per run of the command; past it the search stops with one line.
* **Resumable after kill -9**: a trial left RUNNING by a driver that stopped (of this host: its process is gone; of
  another host: its heartbeat file in ``<sweep>/.optuna_drivers`` is older than 10 minutes) is marked FAIL (user attr
  ``interrupted``) and its settings are asked again first (the same run directory: it resumes from its checkpoint).
* **Same proposals**: the sampler is instantiated from its config before each batch, seeded with ``seed + number of
  trials proposed before`` (interrupted ones not counted), so a fixed command proposes the same trials, interrupted
  and resumed or not.
* The best finished trial is always written (``optimization_results.yaml`` and deeploc's ``best_trial.yaml``), also
  when the search stops on failures.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, Trial, TrialState

from deeploc.errors import ConfigError, DeeplocError
from deeploc.io import atomic_write_bytes
from deeploc.training.hparams import RESULTS_FILE, fixed_overrides, save_best_trial
from hydra_plugins.deeploc_optuna._space import search_space

log = logging.getLogger(__name__)

JOURNAL = "optuna.journal"
# Trial user attrs: its overrides, the driver that launched it (host:pid), why it failed, that it was interrupted.
OVERRIDES, DRIVER, FAILURE, INTERRUPTED = "overrides", "driver", "failure", "interrupted"
# Drivers touch <sweep>/.optuna_drivers/<host>-<pid> this often; a driver of another host silent for STALE_S is gone.
DRIVERS, HEARTBEAT_S, STALE_S = ".optuna_drivers", 60.0, 600.0


class SearchFailed(DeeplocError):
    """More trials failed than ``hydra.sweeper.max_failure_rate`` allows."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _Heartbeat:
    """While a driver lives, a daemon thread touches its file every HEARTBEAT_S seconds (removed at its end)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stop = threading.Event()

    def __enter__(self) -> _Heartbeat:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        threading.Thread(target=self._beat, name="optuna-driver-heartbeat", daemon=True).start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.path.touch()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)


def driver_stopped(trial: FrozenTrial, sweep_dir: Path) -> bool:
    """Whether the driver (``host:pid``) of a RUNNING trial is gone: its process (this host), or its heartbeat
    (another host; a trial asked by a driver that died before naming itself: its age)."""
    host, _, pid = str(trial.user_attrs.get(DRIVER, "")).rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return not _alive(int(pid))
    try:
        since = (sweep_dir / DRIVERS / f"{host}-{pid}").stat().st_mtime if host else trial.datetime_start.timestamp()
    except FileNotFoundError:  # its driver ended (and removed its file), or never had one
        return True
    return time.time() - since > STALE_S


def _reason(exc: BaseException) -> str:
    """One line for a trial's failure: the error's first line, named by its type unless it is deeploc's own."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return text if isinstance(exc, DeeplocError) else f"{type(exc).__name__}: {text}".rstrip(": ")


class OptunaSearch:
    """The sweeper's work (``OptunaSweeper`` in ``optuna_sweeper.py`` is the class Hydra instantiates)."""

    def __init__(
        self,
        sampler: DictConfig,
        direction: str,
        study_name: str,
        n_trials: int,
        n_jobs: int = 1,
        max_failure_rate: float = 0.5,
        storage: str | None = None,
        params: DictConfig | None = None,
    ) -> None:
        if str(direction) not in ("maximize", "minimize"):
            raise ConfigError(f"hydra.sweeper.direction={direction}: use maximize or minimize (one objective)")
        if not 0.0 <= float(max_failure_rate) <= 1.0:
            raise ConfigError(
                f"hydra.sweeper.max_failure_rate={max_failure_rate}: give the fraction of n_trials that may fail, "
                "between 0 and 1"
            )
        if int(n_trials) < 1 or int(n_jobs) < 1:
            raise ConfigError(f"hydra.sweeper.n_trials={n_trials} n_jobs={n_jobs}: both must be at least 1")
        self.sampler = sampler
        self.direction = str(direction)
        self.study_name = str(study_name)
        self.n_trials, self.n_jobs = int(n_trials), int(n_jobs)
        self.max_failure_rate = float(max_failure_rate)
        self.storage = storage
        self.params = params or {}
        self.driver = f"{socket.gethostname()}:{os.getpid()}"

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    # ------------------------------------------------------------------------------------------------ the study
    def _storage(self, sweep_dir: Path) -> Any:
        if self.storage is not None and "://" in str(self.storage):
            return str(self.storage)  # an Optuna RDB URL (sqlite:///..., postgresql://...)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = sweep_dir / JOURNAL if self.storage is None else Path(str(self.storage))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Its default lock is a symbolic link, atomic on NFS and other shared file systems.
        return JournalStorage(JournalFileBackend(str(path)))

    def _open_study(self, sweep_dir: Path, space: dict, fixed: dict) -> optuna.Study:
        ignored = set(self.config.hydra.job.config.override_dirname.get("exclude_keys") or [])
        # What makes two searches the same search (flat, so a change can be named by its key).
        signature = {"direction": self.direction, **{key: f"searched: {dist!r}" for key, dist in space.items()}}
        signature |= {key: str(value) for key, value in fixed.items() if key.lstrip("+~") not in ignored}
        study = optuna.create_study(
            study_name=self.study_name, storage=self._storage(sweep_dir), direction=self.direction,
            sampler=self._sampler(0), load_if_exists=True,
        )  # fmt: skip
        stored = study.user_attrs.get("search")
        if stored is None:
            study.set_user_attr("search", signature)
        elif stored != signature:
            changed = sorted(key for key in set(stored) | set(signature) if stored.get(key) != signature.get(key))
            raise ConfigError(
                f"{sweep_dir}: this sweep folder holds the Optuna search {self.study_name!r} of other settings "
                f"(changed: {', '.join(changed)}); give this search its own sweep_name=..., or remove "
                f"{sweep_dir / JOURNAL} to start the search over"
            )
        return study

    def _sampler(self, proposed: int) -> Any:
        """The configured sampler; its seed (if any) moved on by the number of trials proposed before."""
        seed = self.sampler.get("seed")
        return instantiate(self.sampler) if seed is None else instantiate(self.sampler, seed=int(seed) + proposed)

    def _restart_interrupted(self, study: optuna.Study, sweep_dir: Path) -> None:
        """Mark the trials left RUNNING by a stopped driver FAIL and ask their settings again first."""
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not driver_stopped(trial, sweep_dir):
                continue  # another driver's trial, still running
            host, _, pid = str(trial.user_attrs.get(DRIVER, "?:?")).rpartition(":")
            reason = (
                f"interrupted: its driver (pid {pid} on {host}) stopped while it ran; restarted with the same settings"
            )
            # Optuna's public API tells a trial's state by number but sets user attrs only through the storage.
            study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, reason)
            study.tell(trial.number, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"restart_of": trial.number})
            log.warning("trial %d was %s", trial.number, reason)

    # ------------------------------------------------------------------------------------------------ the search
    def sweep(self, arguments: list[str]) -> None:
        from deeploc.console import quiet_optuna

        quiet_optuna()
        sweep_dir = Path(self.config.hydra.sweep.dir)
        lines = [f"{key}={value}" for key, value in self.params.items()] + list(arguments)
        space, fixed = search_space(lines)
        study = self._open_study(sweep_dir, space, fixed)
        with _Heartbeat(sweep_dir / DRIVERS / self.driver.replace(":", "-")):
            self._restart_interrupted(study, sweep_dir)
            self._search(study, sweep_dir, space, fixed, arguments)

    def _search(self, study: optuna.Study, sweep_dir: Path, space: dict, fixed: dict, arguments: list[str]) -> None:
        """Ask, launch and tell batches until n_trials trials finished or too many failed."""
        allowed = math.floor(self.max_failure_rate * self.n_trials)
        failures: list[str] = []
        while True:
            trials = study.get_trials(deepcopy=False)
            complete = sum(t.state == TrialState.COMPLETE for t in trials)
            if len(failures) > allowed:
                self._save_results(study, sweep_dir, arguments)
                raise SearchFailed(
                    f"the Optuna search in {sweep_dir} stopped: {len(failures)} trials failed in this run, more "
                    f"than hydra.sweeper.max_failure_rate={self.max_failure_rate} of n_trials={self.n_trials} allows "
                    f"({allowed}); last: {failures[-1]}. Each trial's log is <its run dir>/train.log; fix the cause "
                    f"and run the same command again (it keeps the {complete} finished trial(s))"
                )
            running = sum(t.state == TrialState.RUNNING for t in trials)  # other drivers' trials
            to_go = self.n_trials - complete - running
            if to_go <= 0:
                break
            proposed = sum(t.state != TrialState.WAITING and INTERRUPTED not in t.user_attrs for t in trials)
            study.sampler = self._sampler(proposed)
            asked = [study.ask(space) for _ in range(min(self.n_jobs, to_go))]
            overrides = [self._overrides(trial, fixed) for trial in asked]
            for ret, trial in zip(self._launch(overrides, asked[0].number), asked):
                reason = self._tell(study, trial, ret)
                if reason is not None:
                    failures.append(f"trial {trial.number}: {reason}")
                    log.warning(
                        "trial %d failed (failure %d of this run; %d allowed): %s",
                        trial.number, len(failures), allowed, reason,
                    )  # fmt: skip
        self._save_results(study, sweep_dir, arguments)

    def _overrides(self, trial: Trial, fixed: dict[str, Any]) -> list[str]:
        overrides = [f"{key}={value}" for key, value in trial.params.items()]
        overrides += [f"{key}={value}" for key, value in fixed.items()]
        trial.set_user_attr(OVERRIDES, overrides)
        trial.set_user_attr(DRIVER, self.driver)
        return overrides

    def _launch(self, overrides: list[list[str]], first: int) -> list[JobReturn]:
        """The jobs' returns; a launcher that fails as a whole (e.g. a SLURM job killed) fails each of its trials."""
        try:
            return list(self.launcher.launch(overrides, initial_job_idx=first))
        except Exception as exc:
            failed = JobReturn(status=JobStatus.FAILED)
            failed.return_value = exc
            return [failed] * len(overrides)

    def _tell(self, study: optuna.Study, trial: Trial, ret: JobReturn) -> str | None:
        """Record the trial's value, or its failure (returned as one line)."""
        try:
            value = ret.return_value  # re-raises the job's error
        except Exception as exc:
            reason = _reason(exc)
        else:
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = None
            if value is not None and math.isfinite(value):
                reason = None
            elif ret._return_value is None:
                reason = "the job returned no value (its run had no validation epoch, or it trained several heads)"
            else:
                reason = f"the job returned {ret._return_value!r}, not a finite number"
        if reason is None:
            study.tell(trial, value)
            searched = " ".join(trial.user_attrs[OVERRIDES][: len(trial.params)])
            log.info("trial %d: %s -> %.4f", trial.number, searched, value)  # fixed notation, never 3.5e-10
            return None
        trial.set_user_attr(FAILURE, reason)
        study.tell(trial, state=TrialState.FAIL)
        return reason

    def _save_results(self, study: optuna.Study, sweep_dir: Path, arguments: list[str]) -> None:
        """``optimization_results.yaml`` and ``best_trial.yaml``: the best finished trial so far, if any."""
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            log.warning("no trial of the search in %s has finished: no best trial to write", sweep_dir)
            return
        best: FrozenTrial = study.best_trial
        results = {
            "name": "optuna",
            "best_params": dict(best.params),
            "best_value": float(best.value),
            "best_trial": best.number,
            "trials": {"complete": len(complete), "failed": sum(t.state == TrialState.FAIL for t in trials)},
            "storage": str(self.storage or sweep_dir / JOURNAL),
        }
        atomic_write_bytes(sweep_dir / RESULTS_FILE, yaml.safe_dump(results, sort_keys=False).encode())
        save_best_trial(
            sweep_dir, str(self.config.optimized_metric), self.direction, results["best_params"],
            results["best_value"], fixed_overrides(arguments),
        )  # fmt: skip
