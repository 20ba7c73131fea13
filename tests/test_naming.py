"""Run directory and evaluation folder names: readable, short, shell-safe, stable (real Hydra composition)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from deeploc.config import CONF_DIR
from deeploc.runs.naming import MAX_NAME, changed_inputs, eval_dir_name, run_name


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def _tail_digest(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:8]


def test_sweep_keys_lead_and_paths_become_name_plus_digest_of_their_last_two_parts() -> None:
    name = run_name(["data.root=/mnt/big/dolos/wacv_data", "trainer.max_epochs=3", "arch=conv4_image_embed",
                     "subset_index=2", "seed=7"])  # fmt: skip
    expected_root = f"data.root=wacv_data-{_tail_digest('dolos', 'wacv_data')}"
    assert name == f"subset_index=2,arch=conv4_image_embed,seed=7,{expected_root},trainer.max_epochs=3"


def test_moving_a_dataset_keeps_the_name_another_parent_folder_changes_it() -> None:
    here = run_name(["data.root=/home/me/dolos/wacv_data"])
    assert run_name(["data.root=/scratch/copy/of/dolos/wacv_data"]) == here
    assert run_name(["data.root=/home/me/dolos_v2/wacv_data"]) != here
    # Relative paths are made absolute first (the same folder typed two ways is one name).
    assert run_name(["data.root=./dolos/wacv_data"]) == run_name([f"data.root={Path.cwd()}/dolos/wacv_data"])


def test_long_values_unsafe_characters_and_long_names_are_bounded() -> None:
    long_value = "x" * 100
    name = run_name([f"data.subsets=[{long_value}]"])
    assert len(name) < 60 and name.startswith("data.subsets=xxxxxxxxxxxxxxxx-")
    assert run_name(["+foo='a b'"]) == "+foo=a_b"
    many = [f"key{i:03d}={'v' * 20}" for i in range(30)]
    cut = run_name(["subset_index=3", *many])
    assert len(cut) <= MAX_NAME and cut.startswith("subset_index=3,")
    assert run_name(["subset_index=3", *many[:-1], "key029=" + "w" * 20]) != cut  # the digest covers the cut part
    assert run_name([]) == "default"


def test_excluded_keys_do_not_name_runs() -> None:
    assert run_name(
        ["data.num_workers=3", "resume=false", "decoder=conv4"], exclude=["data.num_workers", "resume"]
    ) == ("decoder=conv4")


def test_hydra_names_run_and_sweep_directories_with_the_new_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPLOC_OUTPUTS", str(tmp_path))
    cfg = _compose("data.root=/d/dolos/wacv_data", "arch=conv4_image_embed", "subset_index=1", "data.num_workers=0")
    expected = f"subset_index=1,arch=conv4_image_embed,data.root=wacv_data-{_tail_digest('dolos', 'wacv_data')}"
    assert cfg.hydra.run.dir == f"{tmp_path}/runs/{expected}"
    assert cfg.hydra.sweep.subdir == expected


def test_eval_folders_differ_for_different_data_and_subsets(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "wacv_data", tmp_path / "b" / "wacv_data"
    name = eval_dir_name(a, "test", ["lama", "ldm"])
    assert name.startswith("wacv_data-test-")
    assert eval_dir_name(b, "test", ["lama", "ldm"]) != name
    assert eval_dir_name(a, "valid", ["lama", "ldm"]) != name
    assert eval_dir_name(a, "test", ["lama"]) != name
    assert eval_dir_name(a, "test", ["ldm", "lama"]) == name
    assert eval_dir_name(a, "test", ["lama", "ldm"], "trufor") != name  # scores in another metric convention


def test_changed_inputs_tell_a_moved_folder_from_another_existing_one(tmp_path: Path) -> None:
    here, there = tmp_path / "x" / "wacv_data", tmp_path / "y" / "wacv_data"
    here.mkdir(parents=True)
    there.mkdir(parents=True)
    run = OmegaConf.create({"data": {"root": str(here)}, "encoder": {"checkpoint": None}})
    same = OmegaConf.create({"data": {"root": str(here)}, "encoder": {"checkpoint": None}})
    other = OmegaConf.create({"data": {"root": str(there)}, "encoder": {"checkpoint": None}})
    assert changed_inputs(run, same) == ([], [])
    moved, conflicts = changed_inputs(run, other)
    assert moved == [] and len(conflicts) == 1 and str(here) in conflicts[0] and str(there) in conflicts[0]
    here.rmdir()  # the run's folder is gone: the dataset was moved
    moved, conflicts = changed_inputs(run, other)
    assert conflicts == [] and moved == [f"data.root: {here} -> {there}"]


@pytest.mark.parametrize("value", ["val/iou", "val/loss"])
def test_optimized_metric_does_not_name_runs(value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPLOC_OUTPUTS", str(tmp_path))
    cfg = _compose(f"optimized_metric={value}", "seed=1")
    assert Path(cfg.hydra.run.dir).name == "seed=1"


SHELL_SAFE = r"[A-Za-z0-9_.,=+-]+"


def test_names_of_everyday_commands_are_short_and_shell_safe() -> None:
    # The tiny-data e2e overrides plus a list value made a 200+ character name holding "[" (issue 21, item 15).
    import re

    from tests.e2e import TINY_DATA

    overrides = [*TINY_DATA, "data.root=/data/x/wacv_data", "features.dir=/cache/features", "heads=[conv4,fusion]",
                 "trainer.max_epochs=2", "+model.extra='a b'", "~callbacks.last"]  # fmt: skip
    name = run_name(overrides)
    assert len(name) <= MAX_NAME == 100 and re.fullmatch(SHELL_SAFE, name), name
    assert run_name(["heads=[conv4,fusion]"]) == "heads=conv4+fusion"
    # The keys that tell sweep jobs apart lead, so a cut name keeps them.
    assert run_name([*overrides, "debug=limit", "seed=3"]).startswith("debug=limit,heads=conv4+fusion,seed=3,")
    assert run_name([*overrides[:-1], "~callbacks.best"]) != name  # the digest covers the cut part
