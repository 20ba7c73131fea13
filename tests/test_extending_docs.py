"""docs/extending.md's four plug-ins, run as written from a folder outside the package: an encoder (a small ViT in
plain torch), a decoder, a data source and a metric, through every command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from tests.e2e import env_for

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
BLOCK = re.compile(r"```(?:python|yaml)\n# file: (\S+)\n(.*?)```", re.DOTALL)
MODULES = ["my_vit", "my_decoders", "my_source", "my_metrics"]


def documented_files(folder: Path) -> list[Path]:
    """Write every code block marked ``# file: <path>`` into ``folder``; returns the paths written."""
    written = []
    for relative, text in BLOCK.findall(DOC.read_text(encoding="utf-8")):
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def pairs_dataset(source: Path, dest: Path) -> Path:
    """The generated data in the documented ``pairs`` layout: two subsets, white-is-manipulated masks."""
    fake = source / "data" / "celebahq" / "fake"
    for subset, name in (("copy-move", "a"), ("blur-noise", "b")):
        for split in ("train", "valid", "test"):
            (dest / name / split).mkdir(parents=True)
            for image in sorted((fake / subset / "images" / split).iterdir()):
                shutil.copy(image, dest / name / split / f"{image.stem}.png")
                mask = cv2.imread(str(fake / subset / "masks" / split / image.name), cv2.IMREAD_GRAYSCALE)
                cv2.imwrite(str(dest / name / split / f"{image.stem}_mask.png"), 255 - mask)
    return dest


def run(home: Path, workdir: Path, command: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m deeploc.cli.<command> args`` in ``home`` (the plug-ins' folder), outputs under ``workdir``."""
    env = env_for(workdir)
    env["PYTHONPATH"] = f"{home}:{env.get('PYTHONPATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-m", f"deeploc.cli.{command}", *args],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{command} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_the_four_documented_plugins_work_in_every_command(tmp_path: Path) -> None:
    from deeploc.data.synthetic import generate_dataset

    home = tmp_path / "myplugins"
    written = documented_files(home)
    assert sorted(p.relative_to(home).as_posix() for p in written) == [
        "conf/data/pairs.yaml",
        "conf/decoder/tiny.yaml",
        "conf/encoder/my_vit.yaml",
        "my_decoders.py",
        "my_metrics.py",
        "my_source.py",
        "my_vit.py",
    ]
    wacv = generate_dataset(tmp_path / "gen", n_train=8, n_valid=4, n_test=4, size=64, seed=0, n_real=0)
    data = pairs_dataset(wacv, tmp_path / "pairs")
    sweep = tmp_path / "sweep"
    common = [
        "--config-dir",
        "conf",
        f"plugins=[{','.join(MODULES)}]",
        "data=pairs",
        f"data.root={data}",
        "data.batch_size=8",
        "data.num_workers=0",
        "encoder=my_vit",
        "encoder.image_size=64",
        "encoder.dim=32",
        "feature.name=tokens",
        f"features.dir={tmp_path / 'features'}",
        "trainer.max_epochs=1",
        "logger=csv",
        "overlays=1",
    ]
    # Single runs: two architectures of the outside encoder, the outside decoder, optimized on the outside metric.
    run(home, tmp_path, "train", "-m", *common, "decoder=tiny", "optimized_metric=val/precision",
        "encoder.depth=1,2", f"hydra.sweep.dir={sweep}")  # fmt: skip
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(runs) == 2
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    assert {m["config"]["encoder_architecture"]["depth"] for m in metrics} == {1, 2}
    assert all("val/precision" in m["best_val"] and "precision" in m["test"]["a"] for m in metrics)
    # Multi-head: the outside decoder beside a built-in one.
    run(home, tmp_path, "train", *common, "heads=[tiny,conv4]", "encoder.depth=1")
    assert len(list((tmp_path / "outputs").rglob("heads.json"))) == 1
    run(home, tmp_path, "extract", *common, "decoder=tiny", "encoder.depth=1")

    imports = [arg for module in MODULES for arg in ("--import", module)]
    out = tmp_path / "eval"
    run(home, tmp_path, "evaluate", str(runs[0]), *imports, "--source", "pairs", "--data-root", str(data),
        "--out", str(out))  # fmt: skip
    assert "precision" in json.loads((out / "eval.json").read_text())["test"]["a"]

    report = run(home, tmp_path, "report", str(sweep), "--import", "my_metrics", "--out", str(tmp_path / "rep"))
    table = report.stdout
    assert "ID Precision" in table
    assert re.search(r"encoder architecture", table) and '"depth":1' in table and '"depth":2' in table

    export = tmp_path / "tiny.safetensors"
    run(home, tmp_path, "export", str(runs[0]), *imports, "--out", str(export))
    image = next((data / "a" / "test").glob("*[!k].png"))
    run(home, tmp_path, "predict", str(image), "--model", str(export), *imports, "--out", str(tmp_path / "pred"))
    assert (tmp_path / "pred" / "masks" / f"{image.stem}.png").is_file()


@pytest.mark.parametrize("where", ["plugins", "--import"])
def test_a_plugin_module_that_fails_to_import_is_refused_naming_it_and_the_key(tmp_path: Path, where: str) -> None:
    env = env_for(tmp_path)
    env.pop("HYDRA_FULL_ERROR")  # the user's view: one line
    if where == "plugins":
        args = ["-m", "deeploc.cli.train", "plugins=[no_such_plugin_module]", "encoder=micro"]
    else:
        args = ["-m", "deeploc.cli.report", str(tmp_path), "--import", "no_such_plugin_module"]
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert f"{where}: cannot import module 'no_such_plugin_module'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
