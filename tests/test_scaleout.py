"""Scale-out: DDP metrics, SLURM / submitit-local launcher configs, requeue on a signal, resume choice, shards.

End-to-end parts run the real CLI (real Hydra, real Lightning on gloo, real submitit local executor) on a tiny
generated dataset whose test subsets hold an ODD number of images, so that DistributedSampler pads with duplicates.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from deeploc.cli.report import main as report_main
from deeploc.config import stable_id
from deeploc.runs.rundir import REQUEUE_CHECKPOINT, RunDir
from deeploc.training import cluster
from deeploc.training.shards import shard_samples
from deeploc.training.steps import resume_path
from tests.e2e import env_for, run_cli

CONF = str(Path(__file__).resolve().parents[1] / "conf")
N_TEST = 9  # odd: 2 ranks get 5 + 5 images, one of them a padding duplicate
SYNTH = {"n_train": 32, "n_valid": 8, "n_test": N_TEST, "size": 128, "seed": 0}
EPOCHS = 6
STEPS_PER_EPOCH = 4  # 32 training images, batch 8


def _data_overrides(work: Path) -> list[str]:
    return [
        f"data.root={work / 'data'}",
        f"features.dir={work / 'features'}",
        *(f"data.synthetic.{k}={v}" for k, v in SYNTH.items()),
        "data.batch_size=8",
        "data.num_workers=0",
        "encoder=micro",
        f"trainer.max_epochs={EPOCHS}",
        "overlays=1",
    ]


def _global_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _test_scores(run_dir: Path) -> dict[str, dict[str, float]]:
    return json.loads((run_dir / "metrics.json").read_text())["test"]


def _assert_same_scores(a: dict, b: dict) -> None:
    """Same images, same scores; means may differ in the last bits only (rows are gathered in another order)."""
    assert set(a) == set(b)
    for subset in a:
        assert a[subset]["n_images"] == b[subset]["n_images"] == N_TEST, (subset, a[subset], b[subset])
        for key, value in a[subset].items():
            assert b[subset][key] == pytest.approx(value, rel=1e-12, abs=1e-12), (subset, key)


# ------------------------------------------------------------------------------------------- the sweep


def _job_dirs(sweep: Path) -> dict[int, Path]:
    """subset_index -> run directory of each job of the sweep that has started."""
    found = {}
    for overrides in sweep.glob("*/.hydra/overrides.yaml"):
        match = re.search(r"subset_index=(\d+)", overrides.read_text())
        if match:
            found[int(match.group(1))] = overrides.parent.parent
    return found


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A two-job sweep through hydra/launcher=local; job 0 gets the requeue signal after its first epoch."""
    from deeploc.data.synthetic import generate_dataset

    work = tmp_path_factory.mktemp("scaleout")
    generate_dataset(work / "data", **SYNTH)  # once, before the concurrent jobs
    args = ["-m", "hydra/launcher=local", "sweep_name=scaleout", *_data_overrides(work), "subset_index=0,1"]
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deeploc.cli.train", *args],
        cwd=work,
        env=env_for(work),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the local jobs can be stopped together on failure
    )
    sweep_dir = work / "outputs" / "sweeps" / "scaleout"
    try:
        _wait_for(lambda: 0 in _job_dirs(sweep_dir), 180, "job 0 to start", proc)
        run0 = _job_dirs(sweep_dir)[0]
        armed = re.compile(r"requeue on SIGUSR1 armed \(pid (\d+)\)")
        log0 = run0 / "train.log"
        _wait_for(lambda: log0.is_file() and armed.search(log0.read_text()), 180, "job 0 to arm", proc)
        _wait_for(lambda: (run0 / "checkpoints" / "last.ckpt").is_file(), 180, "job 0's first epoch", proc)
        pid = int(armed.search(log0.read_text()).group(1))
        os.kill(pid, signal.SIGUSR1)
        output, _ = proc.communicate(timeout=300)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, output[-6000:]
    return {"work": work, "dir": sweep_dir, "runs": _job_dirs(sweep_dir), "seconds": time.monotonic() - started}


def test_local_launcher_sweep_completes_and_report_reads_it(sweep: dict, capsys: pytest.CaptureFixture) -> None:
    runs = sweep["runs"]
    assert set(runs) == {0, 1}
    for run in runs.values():
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "finished"
        assert {s["n_images"] for s in metrics["test"].values()} == {N_TEST}
        assert (run / "checkpoints" / "best.ckpt").is_file()
        assert _global_step(run / "checkpoints" / "last.ckpt") == EPOCHS * STEPS_PER_EPOCH
    # The launcher's submitit folder sits in the sweep directory.
    assert list((sweep["dir"] / ".submitit").glob("*/*_log.out"))
    assert report_main([str(sweep["dir"])]) == 0
    out = capsys.readouterr().out
    assert (sweep["dir"] / "report").is_dir() and "inpaint-telea" in out


def test_requeue_signal_checkpoints_and_the_restarted_job_resumes(sweep: dict) -> None:
    run = sweep["runs"][0]
    requeue = run / "checkpoints" / REQUEUE_CHECKPOINT
    # Written mid-training, at a step strictly between the first epoch's end and the last step.
    step = _global_step(requeue)
    assert STEPS_PER_EPOCH <= step < EPOCHS * STEPS_PER_EPOCH
    log = (run / "train.log").read_text()
    assert "SIGUSR1 received: saving" in log
    assert f"exiting with {cluster.REQUEUE_EXIT_CODE}" in log
    # submitit's local controller restarted the job: same run directory, resumed from the requeue checkpoint.
    assert f"resuming from {requeue}" in log
    assert log.count("requeue on SIGUSR1 armed") >= 2
    assert log.count("epoch 1/") == 1, "the restarted job trained epoch 1 again"
    # Same W&B run: two offline segments of one run id (derived from the run directory).
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2
    assert {p.name.rsplit("-", 1)[-1] for p in offline} == {stable_id(str(run))}
    # The job that was left alone ran once.
    other = sweep["runs"][1]
    assert not (other / "checkpoints" / REQUEUE_CHECKPOINT).exists()
    assert len(list((other / "wandb").glob("offline-run-*"))) == 1


def test_ddp_evaluation_equals_single_process(sweep: dict) -> None:
    """Lightning's own DDP launcher (2 gloo processes), re-testing a run trained on one process."""
    run = sweep["runs"][1]
    single = _test_scores(run)
    args = [*_data_overrides(sweep["work"]), "subset_index=1", f"hydra.run.dir='{run}'", "if_finished=eval"]
    run_cli("deeploc.cli.train", [*args, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], sweep["work"])
    _assert_same_scores(single, _test_scores(run))
    # Only rank 0 wrote results: one overlay per test subset, no file from rank 1's Hydra job.
    assert len(list((run / "overlays").glob("*/*.png"))) == 4


@pytest.mark.slow  # ~25-45 s; `make test-all`
def test_ddp_evaluation_through_local_launcher_tasks(sweep: dict) -> None:
    """submitit local with tasks_per_node = trainer.devices = 2: ranks from submitit (as on SLURM), no re-exec."""
    run = sweep["runs"][0]
    single = _test_scores(run)
    args = [
        "-m",
        "hydra/launcher=local",
        *_data_overrides(sweep["work"]),
        "subset_index=0",
        f"hydra.sweep.dir={sweep['dir']}",
        f"hydra.sweep.subdir='{run.name}'",
        "if_finished=eval",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
    ]
    run_cli("deeploc.cli.train", args, sweep["work"])
    _assert_same_scores(single, _test_scores(run))
    logs = "".join(p.read_text() for p in (sweep["dir"] / ".submitit").glob("*/*_log.*"))
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs


# -------------------------------------------------------------------------------- the signal, in-process


class _Tiny(L.LightningModule):
    """Linear regression on random data; optionally sends itself the requeue signal during one step."""

    def __init__(self, signal_at_step: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.signal_at_step = signal_at_step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.signal_at_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=4)


def _tiny_trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root,
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_signal_saves_at_the_next_batch_end_and_exits_for_requeue(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    trainer = _tiny_trainer(tmp_path, callbacks=[cluster.RequeueOnSignal("USR1")])
    with pytest.raises(cluster.RequeueRequested) as raised:
        trainer.fit(_Tiny(signal_at_step=5))
    assert raised.value.code == cluster.REQUEUE_EXIT_CODE
    assert "re-run the same command" in str(raised.value)
    path = tmp_path / "checkpoints" / REQUEUE_CHECKPOINT
    assert _global_step(path) == 6  # the step in which the signal arrived completed, then the save
    assert signal.getsignal(signal.SIGUSR1) == before  # handler restored at teardown
    # Resuming continues from there to the end.
    trainer = _tiny_trainer(tmp_path, callbacks=[cluster.RequeueOnSignal("USR1")])
    trainer.fit(_Tiny(), ckpt_path=str(path))
    assert trainer.global_step == 2 * 8


def test_without_signal_training_is_untouched(tmp_path: Path) -> None:
    trainer = _tiny_trainer(tmp_path, callbacks=[cluster.RequeueOnSignal("USR1")])
    trainer.fit(_Tiny())
    assert trainer.global_step == 16 and not (tmp_path / "checkpoints").exists()


_DDP_SCRIPT = """
    import os, signal, sys
    import lightning as L, torch
    from torch.utils.data import DataLoader, TensorDataset
    from deeploc.training.cluster import RequeueOnSignal

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
        def training_step(self, batch, batch_idx):
            if self.global_rank == 1 and self.global_step == 2:  # only rank 1 is signalled
                os.kill(os.getpid(), signal.SIGUSR1)
            return self.layer(batch[0]).pow(2).mean()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)

    if __name__ == "__main__":
        trainer = L.Trainer(default_root_dir=sys.argv[1], max_epochs=3, accelerator="cpu", devices=2, strategy="ddp",
                            callbacks=[RequeueOnSignal("USR1")], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Tiny())
        print("FINISHED")
"""


@pytest.mark.slow  # ~10 s; default suite: test_ddp_evaluation_equals_single_process, the requeue test
def test_ddp_ranks_agree_on_a_signal_only_one_of_them_received(tmp_path: Path) -> None:
    script = tmp_path / "ddp_requeue.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == cluster.REQUEUE_EXIT_CODE, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FINISHED" not in proc.stdout
    assert _global_step(tmp_path / "checkpoints" / REQUEUE_CHECKPOINT) == 3


def test_signal_name_parsing_and_off_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cluster.parse_signal("USR2") == signal.SIGUSR2
    assert cluster.parse_signal("SIGUSR1") == signal.SIGUSR1
    assert cluster.parse_signal(None) is None and cluster.parse_signal("off") is None
    with pytest.raises(ValueError, match="DEEPLOC_REQUEUE_SIGNAL"):
        cluster.parse_signal("USR9")
    monkeypatch.setenv(cluster.SIGNAL_ENV, "off")
    extras = cluster.trainer_extras(OmegaConf.create({"accelerator": "cpu"}), [])
    assert extras["callbacks"] == []
    monkeypatch.setenv(cluster.SIGNAL_ENV, "USR2")
    (callback,) = cluster.trainer_extras(OmegaConf.create({}), [])["callbacks"]
    assert callback.signum == signal.SIGUSR2


# ------------------------------------------------------------------------------------- environments


def test_trainer_extras_pick_the_cluster_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for key in list(os.environ):
        if key.startswith(("SLURM_", "SUBMITIT_")):
            monkeypatch.delenv(key)
    cfg = OmegaConf.create({"accelerator": "cpu", "sync_batchnorm": True})
    extras = cluster.trainer_extras(cfg, [])
    assert "plugins" not in extras and extras["sync_batchnorm"] is False

    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    (env,) = cluster.trainer_extras(cfg, [])["plugins"]
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False  # deeploc owns the signal

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "2")
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", "1")
    monkeypatch.setenv("SUBMITIT_LOCAL_LOCALID", "1")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4242")
    (env,) = cluster.trainer_extras(cfg, [])["plugins"]
    assert isinstance(env, cluster.SubmititLocalEnvironment)
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (2, 1, 1, 0)
    assert env.creates_processes_externally and 20000 <= env.main_port < 40000
    with pytest.raises(ValueError, match=r"tasks_per_node must equal trainer\.devices"):
        env.validate_settings(num_devices=1, num_nodes=1)


def test_slurm_job_id_names_the_array_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "1001")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert cluster.slurm_job_id() == "1001"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1000")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert cluster.slurm_job_id() == "1000_3"


def test_ddp_in_a_basic_multirun_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["hydra.mode=MULTIRUN"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
        with pytest.raises(RuntimeError, match=r"hydra/launcher=local"):
            cluster.check_launch(trainer)
        cluster.check_launch(L.Trainer(accelerator="cpu", devices=1, logger=False))  # one process: fine
        # Ranks started by the launcher (submitit local tasks, SLURM): nothing is re-executed, fine too.
        for key, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "0",
                           "SUBMITIT_LOCAL_LOCALID": "0", "SUBMITIT_LOCAL_JOB_ID": "7"}.items():  # fmt: skip
            monkeypatch.setenv(key, value)
        extras = cluster.trainer_extras(OmegaConf.create({"accelerator": "cpu"}), [])
        cluster.check_launch(L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, **extras))
    finally:
        HydraConfig.instance().cfg = None


# ------------------------------------------------------------------------------------ launcher configs


def _launcher_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.usefixtures("srun_on_path")
def test_slurm_launcher_renders_the_sbatch_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose `hydra/launcher=slurm` as the CLI would, run the real launcher up to sbatch and read the script."""
    import submitit

    cfg = _launcher_cfg(
        "hydra/launcher=slurm",
        f"paths.output_dir={tmp_path / 'out'}",
        "sweep_name=grid",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=proj42",
        "hydra.launcher.timeout_min=240",
        "hydra.launcher.cpus_per_task=6",
        "hydra.launcher.mem_gb=200",
    )
    scripts: list[str] = []

    def fake_map_array(self, fn, *iterables):
        executor = self._executor
        executor.parameters["map_count"] = len(iterables[0])
        scripts.append(executor._make_submission_file_text(executor._submitit_command_str, "uid"))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    launcher.launch([["subset_index=0"], ["subset_index=1"]], initial_job_idx=0)
    (text,) = scripts
    sweep_dir = tmp_path / "out" / "sweeps" / "grid"
    for line in (
        "--partition=gpu",
        "--account=proj42",
        "--time=240",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=6",
        "--mem=200GB",
        "--signal=USR1@120",
        "--requeue",
        "--array=0-1%2",
        f"--output={sweep_dir}/.submitit/%A_%a/%A_%a_0_log.out",
    ):
        assert f"#SBATCH {line}" in text.splitlines(), (line, text)
    assert "USR2" not in text
    assert cfg.hydra.launcher.max_num_timeout == 0


def test_local_launcher_runs_one_task_per_device() -> None:
    cfg = _launcher_cfg("hydra/launcher=local", "trainer=ddp", "trainer.devices=3")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["tasks_per_node"] == 3 and launcher["nodes"] == 1
    assert launcher["submitit_folder"].startswith(str(cfg.hydra.sweep.dir))
    assert launcher["_target_"].endswith("LocalLauncher")


# ---------------------------------------------------------------------------------------- resume choice


def _fake_ckpt(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "epoch": step // 4}, path)
    return path


def test_resume_picks_the_most_advanced_checkpoint(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    yes, no = OmegaConf.create({"resume": True}), OmegaConf.create({"resume": False})
    assert resume_path(yes, run) is None
    last = _fake_ckpt(run.last_checkpoint, 8)
    assert resume_path(yes, run) == str(last)
    requeue = _fake_ckpt(run.checkpoints / REQUEUE_CHECKPOINT, 10)
    assert resume_path(yes, run) == str(requeue)
    assert resume_path(no, run) is None
    hpc = _fake_ckpt(run.path / "hpc_ckpt_1.ckpt", 11)  # Lightning's own SLURM requeue checkpoint
    assert resume_path(yes, run) == str(hpc)
    _fake_ckpt(run.last_checkpoint, 12)
    assert resume_path(yes, run) == str(last)
    # Equal steps: the later file (last.ckpt after the epoch's validation) wins.
    time.sleep(0.01)
    _fake_ckpt(requeue, 12)
    os.utime(last, ns=(time.time_ns(), time.time_ns()))
    assert resume_path(yes, run) == str(last)
    # A checkpoint cut short while written is skipped.
    last.write_bytes(last.read_bytes()[:20])
    assert resume_path(yes, run) == str(requeue)


# --------------------------------------------------------------------------------------------- shards


def test_shards_are_disjoint_stable_and_complete() -> None:
    from deeploc.data.samples import Sample

    samples = [Sample(Path(f"/x/{i}.png"), Path(f"/m/{i}.png"), f"s{i % 3}", "test", f"{i:05d}") for i in range(50)]
    shards = [shard_samples(samples, k, 3) for k in range(3)]
    assert sorted(s.name + s.subset for part in shards for s in part) == sorted(s.name + s.subset for s in samples)
    assert all(shards)
    assert shard_samples(list(reversed(samples)), 1, 3) == list(reversed(shards[1]))
    assert shard_samples(samples, 0, 1) == samples
    with pytest.raises(ValueError):
        shard_samples(samples, 3, 3)


def test_extract_cli_shards_add_up_to_the_full_cache(tmp_path: Path) -> None:
    """`deeploc-extract -m shard=0,1 num_shards=2` (two jobs) fills the cache one full extraction fills."""
    from deeploc.cli.extract import extract

    small = {"n_train": 3, "n_valid": 1, "n_test": 1, "size": 64, "seed": 0}
    common = [
        f"data.root={tmp_path / 'data'}",
        *(f"data.synthetic.{k}={v}" for k, v in small.items()),
        "data.num_workers=0",
        "encoder=micro",
        "features.batch_size=1",  # same batching in every job: bitwise-comparable entries
    ]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[*common, f"features.dir={tmp_path / 'full'}"])
    assert extract(cfg)["status"] == "done"
    proc = run_cli(
        "deeploc.cli.extract", ["-m", *common, f"features.dir={tmp_path / 'sharded'}", "shard=0,1", "num_shards=2"],
        tmp_path,
    )  # fmt: skip

    def entries(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("entries/*/*.f16")}

    full, sharded = entries(tmp_path / "full"), entries(tmp_path / "sharded")
    assert len(full) == 3 + 1 + 4  # the run's train + valid + one test image per subset
    assert sharded == full
    assert "shard 0 of 2" in proc.stdout and "shard 1 of 2" in proc.stdout
