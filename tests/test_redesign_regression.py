"""CONV-N results are unchanged by the plug-in redesign: fixed-seed runs give the metrics.json numbers that
deeploc recorded for the same commands just before it (main at fc5f7a6, study metric convention).

The numbers below were produced by ``deeploc-train`` on that commit with exactly :data:`OVERRIDES` (2 epochs on
the tiny generated set, micro SAM2 with random weights, cached features). They are a regression record, not a
quality claim. A tolerance of 1e-6 absolute allows for another CPU's rounding; on this project's machines the
numbers are bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e import run_cli, train_args

pytestmark = pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights")

OVERRIDES = ["trainer.max_epochs=2", "logger=csv", "overlays=0"]
RECORDED = {
    "conv4_high_res_feats_1": {
        "best_val_iou": 3.4646025068677114e-10,
        "test": {
            "inpaint-telea": {
                "iou": 0.003679717979121206,
                "f1_fixed": 0.013819789939192924,
                "f1_best": 35.211052385136696,
                "ap": 25.6575043340263,
            },
            "copy-move": {
                "iou": 5.814281821047262e-10,
                "f1_fixed": 1.7150228313146576e-33,
                "f1_best": 26.027685246099765,
                "ap": 18.095843541188493,
            },
            "blur-noise": {
                "iou": 5.814281821047262e-10,
                "f1_fixed": 1.7150228313146576e-33,
                "f1_best": 30.413008990269066,
                "ap": 22.52908977486466,
            },
            "splice-jpeg": {
                "iou": 5.814281821047262e-10,
                "f1_fixed": 1.7150228313146576e-33,
                "f1_best": 31.956923386637783,
                "ap": 24.112116041998434,
            },
        },
    },
    "conv12_image_embed": {
        "best_val_iou": 3.4599821159407856e-10,
        "test": {
            "inpaint-telea": {
                "iou": 0.6153624546513186,
                "f1_fixed": 1.5066119262701687,
                "f1_best": 26.31325371268185,
                "ap": 20.089704542133752,
            },
            "copy-move": {
                "iou": 0.5515845422174002,
                "f1_fixed": 1.5335325110215572,
                "f1_best": 23.393157913684032,
                "ap": 17.02919130620957,
            },
            "blur-noise": {
                "iou": 0.726272190986006,
                "f1_fixed": 1.6767139298126903,
                "f1_best": 26.438836402941572,
                "ap": 20.519817532110604,
            },
            "splice-jpeg": {
                "iou": 0.3914405016025402,
                "f1_fixed": 0.7183908045977011,
                "f1_best": 26.879434869210225,
                "ap": 20.395516125646456,
            },
        },
    },
}


@pytest.mark.parametrize(
    # one configuration in the default suite (~10 s each); every recorded one with `make test-all`
    "arch",
    [pytest.param(a, marks=() if i == 0 else pytest.mark.slow) for i, a in enumerate(sorted(RECORDED))],
)
def test_fixed_seed_conv_runs_reproduce_the_numbers_recorded_before_the_redesign(
    arch: str, shared_workdir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / arch
    run_cli(
        "deeploc.cli.train",
        train_args(shared_workdir, f"arch={arch}", *OVERRIDES, f"hydra.run.dir={run_dir}"),
        tmp_path,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_val_iou"] == pytest.approx(RECORDED[arch]["best_val_iou"], abs=1e-6)
    for subset, scores in RECORDED[arch]["test"].items():
        for name, value in scores.items():
            assert metrics["test"][subset][name] == pytest.approx(value, abs=1e-6), (subset, name)
