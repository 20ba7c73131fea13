"""Scale-out glue: checkpoint-and-requeue on a signal, rank discovery for submitit jobs (shards: deeploc.training.shards).

One owner of the requeue signal
    :class:`RequeueOnSignal` (added to every Trainer by ``deeploc.training.steps.build_trainer``) owns ``SIGUSR1`` (change
    with ``DEEPLOC_REQUEUE_SIGNAL=USR2`` etc., ``off`` disables it). Its handler only records the signal; at the
    next training-batch end every rank agrees on it (one all-reduce of a flag), all ranks save
    ``<run>/checkpoints/requeue.ckpt`` together, rank 0 asks the scheduler to run the job again, and the process
    exits with :data:`REQUEUE_EXIT_CODE` (144). Nobody else acts on the signal:

    * Lightning's own SLURM auto-requeue is switched off (``SLURMEnvironment(auto_requeue=False)`` on SLURM), so it
      registers no ``SIGUSR1`` handler of its own (its handler saves inside the signal handler, which can deadlock
      DDP ranks that are in a collective);
    * submitit keeps its ``USR2`` handler, but SLURM is told to send ``USR1`` (``conf/hydra/launcher/slurm.yaml``:
      ``additional_parameters.signal: USR1@<signal_delay_s>``) and ``max_num_timeout: 0``, so it never fires.

    "Run again" means: on SLURM, ``scontrol requeue <job>`` (same job id, same array index); in a submitit *local*
    job, the exit code 144 itself (submitit's local controller restarts tasks that exit with it); elsewhere, nothing
    (the message says to re-run the same command). The job's overrides are unchanged, so it lands in the SAME run
    directory, :meth:`deeploc.runs.rundir.RunDir.resume_checkpoint` picks ``requeue.ckpt`` there and the W&B id (derived from the run
    directory) is the same.

Ranks of a submitit local job
    ``hydra/launcher=local`` starts ``trainer.devices`` tasks per job; :class:`SubmititLocalEnvironment` tells
    Lightning their ranks (as ``SLURMEnvironment`` does on SLURM), so DDP never re-executes the command line
    (Lightning's subprocess launcher re-runs ``sys.argv``, which inside a Hydra multirun means the whole sweep:
    :func:`check_launch` refuses that combination).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

from deeploc.runs.rundir import REQUEUE_CHECKPOINT, RunDir

log = logging.getLogger("deeploc.training.cluster")

try:  # the code submitit's local controller restarts a job on; keep in step with it
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE as REQUEUE_EXIT_CODE
except ImportError:  # pragma: no cover - submitit is a dependency of the launcher configs only
    REQUEUE_EXIT_CODE = 144

SIGNAL_ENV = "DEEPLOC_REQUEUE_SIGNAL"
DEFAULT_SIGNAL = "USR1"
_OFF = {"", "0", "off", "none", "false", "no"}


__all__ = [
    "REQUEUE_EXIT_CODE",
    "RequeueOnSignal",
    "RequeueRequested",
    "SubmititLocalEnvironment",
    "check_launch",
    "is_first_process",
    "parse_signal",
    "request_requeue",
    "slurm_job_id",
    "trainer_extras",
]


# ------------------------------------------------------------------------------------------------ signals


def parse_signal(value: str | int | None) -> signal.Signals | None:
    """``"USR1"``, ``"SIGUSR1"``, ``10`` -> ``signal.SIGUSR1``; ``None``/``"off"`` -> None (requeue disabled)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        return signal.Signals(int(value))
    name = value.strip().upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"{SIGNAL_ENV}={value!r} is not a signal name (e.g. USR1, USR2) nor 'off'") from None


class RequeueRequested(SystemExit):
    """Raised (on every rank) after the requeue checkpoint is written: ends the job with :data:`REQUEUE_EXIT_CODE`.

    A ``SystemExit``, so that neither Hydra's job runner nor submitit records the job as finished or failed with a
    result: the scheduler (or the user) runs the same command again and training resumes.
    """

    def __init__(self, message: str, code: int = REQUEUE_EXIT_CODE) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` needs: ``<array job>_<task>`` inside a job array, else ``SLURM_JOB_ID``."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def request_requeue() -> str:
    """Ask the scheduler to run this job again; returns a sentence saying what happens next (rank 0 only)."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "local":
        return f"exiting with {REQUEUE_EXIT_CODE}: submitit's local controller starts the job again"
    job = slurm_job_id()
    if job is None or not SLURMEnvironment.detect():
        return "no scheduler to requeue with: re-run the same command to resume"
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`scontrol requeue {job}` failed ({exc}): resubmit the same command to resume"
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        return f"`scontrol requeue {job}` failed ({proc.returncode}: {detail}): resubmit the same command to resume"
    return f"requeued SLURM job {job}"


def _ignore_sigterm(signum: int, frame: Any) -> None:
    log.info("ignoring %s: this job is already checkpointed and exiting for requeue", signal.Signals(signum).name)


class RequeueOnSignal(L.Callback):
    """Checkpoint all ranks and requeue the job when the scheduler warns of preemption or the time limit.

    Args:
        signum: the signal owned (default: ``$DEEPLOC_REQUEUE_SIGNAL`` or ``USR1``; None/"off" = inactive).
        filename: checkpoint name, written into the run's ``checkpoints/`` folder.
        every_n_steps: how often ranks compare notes (one all-reduce of a flag); 1 = every training batch.

    The handler only records the signal (safe at any point, also inside a collective). The checkpoint is written
    at the next ``on_train_batch_end`` by ``trainer.save_checkpoint`` on every rank at the same step, with the
    same loop state a step-interval ``ModelCheckpoint`` would have. A signal that arrives after the last training
    batch (final validation, test) is logged and otherwise ignored: the job is allowed to finish.
    """

    def __init__(
        self,
        signum: str | int | None = "env",
        filename: str = REQUEUE_CHECKPOINT,
        every_n_steps: int = 1,
    ) -> None:
        if signum == "env":
            signum = os.environ.get(SIGNAL_ENV, DEFAULT_SIGNAL)
        self.signum = parse_signal(signum)
        self.filename = filename
        self.every_n_steps = max(1, int(every_n_steps))
        self.received: int | None = None
        self._previous: Any = None
        self._installed = False
        self._announced = False

    # ------------------------------------------------------------------ handler
    def _record(self, signum: int, frame: Any) -> None:
        self.received = signum  # nothing else: this may run in the middle of anything

    def _install(self) -> None:
        if self.signum is None or self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("requeue on %s not armed: the Trainer does not run in the main thread", self.signum.name)
            return
        previous = signal.getsignal(self.signum)
        if previous not in (signal.SIG_DFL, signal.SIG_IGN, None):
            log.info("%s: deeploc's requeue handler replaces %r while the trainer runs", self.signum.name, previous)
        self._previous = previous
        signal.signal(self.signum, self._record)
        self._installed = True
        if not self._announced:  # armed again for testing: said once
            log.info("requeue on %s armed (pid %d)", self.signum.name, os.getpid())
            self._announced = True

    def _uninstall(self) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    # -------------------------------------------------------------------- hooks
    # Installed once Lightning has registered its own handlers (it restores the ones it found at teardown).
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Armed for testing too: an early warning then must not kill the process (the default action of USR1).
        self._install()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.received is not None and stage != "fit":
            log.warning("%s received outside training: ignored", signal.Signals(self.received).name)
        self._uninstall()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._uninstall()  # Lightning skips teardown hooks when fit ends with an exception

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.signum is None or trainer.global_step % self.every_n_steps:
            return
        # Every rank takes part in the reduction at the same steps, whether or not it saw the signal.
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self._checkpoint_and_exit(trainer)

    # ------------------------------------------------------------------- action
    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        """``<run>/checkpoints/<filename>``: the folder of the configured ModelCheckpoints (resume looks there)."""
        for callback in trainer.checkpoint_callbacks:
            dirpath = getattr(callback, "dirpath", None)
            if dirpath:
                return Path(dirpath) / self.filename
        return RunDir(Path(trainer.default_root_dir)).checkpoints / self.filename

    def _checkpoint_and_exit(self, trainer: L.Trainer) -> None:
        name = signal.Signals(self.received).name if self.received is not None else str(self.signum.name)
        path = self.checkpoint_path(trainer)
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            log.warning(
                "%s received: saving %s (epoch %d, step %d) before requeue",
                name, path, trainer.current_epoch, trainer.global_step,
            )  # fmt: skip
        trainer.save_checkpoint(path)  # collective: every rank calls it, rank 0 writes (atomically)
        if threading.current_thread() is threading.main_thread():
            # The scheduler's SIGTERM (e.g. after `scontrol requeue`) must not start Lightning's own SIGTERM
            # handling (a broadcast) while ranks are leaving; Lightning's teardown restores the previous handler.
            signal.signal(signal.SIGTERM, _ignore_sigterm)
        outcome = request_requeue() if trainer.is_global_zero else ""
        trainer.strategy.barrier("deeploc.requeue")
        message = f"{name}: checkpoint {path} written at step {trainer.global_step}" + (
            f"; {outcome}" if outcome else ""
        )
        if trainer.is_global_zero:
            log.warning(message)
        self._uninstall()
        raise RequeueRequested(message)


# ------------------------------------------------------------------------------ submitit local environment


class SubmititLocalEnvironment(ClusterEnvironment):
    """The tasks of one submitit *local* job as DDP ranks (``hydra/launcher=local``, ``tasks_per_node`` tasks).

    Ranks come from ``SUBMITIT_LOCAL_GLOBALID`` / ``_LOCALID`` / ``_NTASKS``; the rendezvous is on 127.0.0.1, at
    ``MASTER_PORT`` if set, else a port derived from the job id (identical for the job's tasks, different for
    concurrent jobs).
    """

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return os.environ.get("MASTER_ADDR", "127.0.0.1")

    @property
    def main_port(self) -> int:
        if os.environ.get("MASTER_PORT"):
            return int(os.environ["MASTER_PORT"])
        job = os.environ.get("SUBMITIT_LOCAL_JOB_ID", "0")
        return 20000 + zlib.crc32(job.encode()) % 20000

    @staticmethod
    def detect() -> bool:
        return os.environ.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_GLOBALID" in os.environ

    def world_size(self) -> int:
        return int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1"))

    def set_world_size(self, size: int) -> None:
        pass  # fixed by the launcher; validate_settings checks it against the Trainer

    def global_rank(self) -> int:
        return int(os.environ.get("SUBMITIT_LOCAL_GLOBALID", "0"))

    def set_global_rank(self, rank: int) -> None:
        pass

    def local_rank(self) -> int:
        return int(os.environ.get("SUBMITIT_LOCAL_LOCALID", "0"))

    def node_rank(self) -> int:
        return int(os.environ.get("SUBMITIT_LOCAL_NODEID", "0"))

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        if num_devices * num_nodes != self.world_size():
            raise ValueError(
                f"this submitit local job runs {self.world_size()} tasks but the Trainer wants {num_devices} devices x "
                f"{num_nodes} nodes; hydra.launcher.tasks_per_node must equal trainer.devices (the default of "
                "conf/hydra/launcher/local.yaml) and trainer.num_nodes must be 1"
            )


# ---------------------------------------------------------------------------------------- trainer wiring


def _as_list(value: Any) -> list[Any]:
    from omegaconf import OmegaConf

    if value is None:
        return []
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return list(value)
    return [value]


def trainer_extras(trainer_cfg: Any, callbacks: list[Any]) -> dict[str, Any]:
    """Keyword arguments ``build_trainer`` adds to the Trainer: the callbacks plus :class:`RequeueOnSignal` (unless
    one is configured or ``$DEEPLOC_REQUEUE_SIGNAL`` is off), and the cluster environment plugin the job needs:
    ``SLURMEnvironment(auto_requeue=False)`` on SLURM, :class:`SubmititLocalEnvironment` in a submitit local job
    with several tasks. Plugins configured in ``trainer.plugins`` are kept."""
    from hydra.utils import instantiate

    callbacks = list(callbacks)
    if not any(isinstance(c, RequeueOnSignal) for c in callbacks):
        requeue = RequeueOnSignal()
        if requeue.signum is not None:
            callbacks.append(requeue)
    extras: dict[str, Any] = {"callbacks": callbacks}
    get = trainer_cfg.get if hasattr(trainer_cfg, "get") else (lambda key, default=None: default)
    accelerator = str(get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if get("sync_batchnorm", False) and on_cpu:
        log.info("sync_batchnorm switched off: torch synchronises BatchNorm on GPUs only (CPU/gloo run)")
        extras["sync_batchnorm"] = False
    plugins = [instantiate(p) if hasattr(p, "keys") else p for p in _as_list(get("plugins", None))]
    if not any(isinstance(p, ClusterEnvironment) for p in plugins):
        if SubmititLocalEnvironment.detect() and SubmititLocalEnvironment().world_size() > 1:
            plugins.append(SubmititLocalEnvironment())
        elif SLURMEnvironment.detect():
            plugins.append(SLURMEnvironment(auto_requeue=False))
    if plugins:
        extras["plugins"] = plugins
    return extras


def check_launch(trainer: L.Trainer) -> None:
    """Refuse DDP that Lightning would start by re-executing the command line inside a Hydra multirun."""
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # not under Hydra
        multirun = False
    launcher = getattr(trainer.strategy, "launcher", None)
    environment = getattr(trainer.strategy, "cluster_environment", None)
    spawns = isinstance(launcher, _SubprocessScriptLauncher) and not (
        environment is not None and environment.creates_processes_externally
    )
    if multirun and trainer.world_size > 1 and spawns:
        raise RuntimeError(
            f"DDP over {trainer.world_size} processes inside a Hydra multirun with the basic launcher: Lightning would "
            "start the other ranks by re-running this command line, i.e. the whole sweep. Use hydra/launcher=local "
            "(one submitit job per run, tasks_per_node=trainer.devices) or hydra/launcher=slurm, or run the "
            "configuration as a single run (no -m). See docs/cluster.md."
        )


# Variables through which launchers (Lightning's DDP subprocesses, torchrun, SLURM, submitit) tell a process its rank.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID")


def is_first_process() -> bool:
    """Whether this process is rank 0 of its job, as the environment says before any Trainer exists (the other
    ranks of a DDP run are started with a non-zero rank variable); True outside any launcher."""
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in _RANK_VARIABLES)
