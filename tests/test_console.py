"""The console of a training job (issue 21, item 17): warnings as one line, Lightning's resume warning filtered, the
progress bar without a made-up rate and kept out of log files. Real Lightning fits of a two-weight model."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from deeploc.console import quiet_console
from deeploc.training.callbacks import ProgressBar

REPO = Path(__file__).resolve().parents[1]


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(callbacks: list[L.Callback], root: Path) -> None:
    """One epoch of ONE batch (Rich has no rate to show) on the CPU."""
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=callbacks, default_root_dir=root,
        enable_model_summary=False, enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
    )  # fmt: skip
    trainer.fit(_Tiny(), DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=4))


def test_a_warning_prints_one_line_without_its_source_line(tmp_path: Path) -> None:
    """Python echoes the line that raised a warning under it (a library's `warnings.warn(` call), in every job."""
    script = tmp_path / "warn.py"
    script.write_text(
        "import warnings\nfrom deeploc.console import quiet_console\nquiet_console()\n"
        "warnings.warn('deeploc test warning', UserWarning)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.stderr.splitlines() == [f"{script}:4: UserWarning: deeploc test warning"]


def test_lightnings_checkpoint_directory_warning_does_not_show_on_resume(tmp_path: Path) -> None:
    """A resumed run's checkpoints folder holds its checkpoints: Lightning's "exists and is not empty" is noise."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"an earlier epoch")
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, filename="last", enable_version_counter=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_console()
        _fit([checkpoint], tmp_path)
    assert (folder / "last.ckpt").read_bytes() != b"an earlier epoch"  # the fit ran and checkpointed
    assert not [w for w in caught if "Checkpoint directory" in str(w.message)]


def test_the_progress_bar_is_not_written_into_a_log_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Not a terminal (a pipe, a SLURM log): Rich would print each bar once at its end, its metrics wrapped."""
    _fit([ProgressBar()], tmp_path)
    captured = capsys.readouterr()
    assert "Epoch 1/1" not in captured.out + captured.err and "it/s" not in captured.out + captured.err


def test_the_progress_bar_shows_no_rate_before_rich_has_measured_one(tmp_path: Path) -> None:
    """On a terminal the bar shows; an epoch of one batch has no rate yet: no `0.00it/s`."""
    screen = io.StringIO()
    _fit([ProgressBar(console_kwargs={"file": screen, "force_terminal": True, "width": 160})], tmp_path)
    assert "Epoch 1/1" in screen.getvalue()
    assert "it/s" not in screen.getvalue()
