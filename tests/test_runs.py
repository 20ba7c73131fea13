"""RunDir owns the file names of a run; RunRecord is the one schema of metrics.json's settings."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest

import deeploc
from deeploc.runs.record import RunRecord, RunRecordError
from deeploc.runs.rundir import RunDir

# File and folder names of a run directory: only deeploc/runs/rundir.py may spell them.
RUN_FILE_NAMES = {"metrics.json", "config_resolved.yaml", "heads.json", "checkpoints", "overlays", "eval", ".lock"}


def _joined_names(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants used as a path component (``x / "name"``) or that are a run file's full name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
            if node.right.value in RUN_FILE_NAMES:
                found.append((node.lineno, node.right.value))
        elif isinstance(node, ast.Constant) and node.value in ("metrics.json", "config_resolved.yaml", "heads.json"):
            found.append((node.lineno, node.value))
    return found


def test_only_rundir_spells_the_file_names_of_a_run() -> None:
    package = Path(deeploc.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path == package / "runs" / "rundir.py":
            continue
        offenders += [
            f"{path.relative_to(package)}:{line} {name!r}" for line, name in _joined_names(ast.parse(path.read_text()))
        ]
    assert offenders == []


def test_run_dir_paths(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.lock_file == tmp_path / ".lock"
    assert run.resolved_config == tmp_path / "config_resolved.yaml"
    assert run.overlay_dir("real") == tmp_path / "overlays" / "real"
    assert run.heads_file == tmp_path / "heads.json"
    assert RunDir.of_checkpoint(run.last_checkpoint) == tmp_path.resolve()
    assert RunDir.of_checkpoint(tmp_path / "x.ckpt") is None


def _record() -> dict:
    return {f.name: f"v{i}" for i, f in enumerate(fields(RunRecord))}


def test_run_record_round_trips_in_metrics_json_key_order() -> None:
    config = _record()
    record = RunRecord.from_metrics({"config": config})
    assert list(record.to_dict()) == list(config)
    assert record.to_dict() == config


def test_a_record_without_a_field_is_refused_naming_the_file_and_the_fix() -> None:
    config = _record()
    del config["weights"]
    with pytest.raises(RunRecordError, match=r"run/metrics.json: its config lacks weights.*if_finished=retrain"):
        RunRecord.from_metrics({"config": config}, source="run/metrics.json")


def test_the_suite_ignores_deeploc_settings_of_the_shell(tmp_path: Path) -> None:
    # A debug-preset test failed when DEEPLOC_OUTPUTS was set in the shell (issue 21, item 20).
    import os
    import subprocess
    import sys

    env = dict(os.environ, DEEPLOC_OUTPUTS=str(tmp_path / "elsewhere"), DEEPLOC_SIGNING_KEY="x", SLURM_JOB_ID="1")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
         "tests/test_debug_presets.py::test_every_preset_composes_without_plus_into_the_debug_folders"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
