"""The training-free k-NN probe (deeploc/evaluation/knn_probe.py, deeploc-probe)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeploc.errors import ConfigError
from deeploc.evaluation.knn_probe import (
    MemoryBank,
    ProbeSettings,
    build_banks,
    knn_probabilities,
    patch_targets,
    probe_scores,
)
from tests.e2e import run_cli, train_args


class ColourCells(nn.Module):
    """An encoder whose 8-px cells hold the mean colour of the cell: on images painted by their masks, the features
    encode the mask."""

    def forward(self, images: torch.Tensor, names: tuple[str, ...] = ("cells",)) -> dict[str, torch.Tensor]:
        return {"cells": F.avg_pool2d(images, 8)}


def painted(seed: int, count: int = 4) -> dict[str, torch.Tensor]:
    """64 x 64 images: a random 8-px-aligned rectangle (the mask) painted red on a blue background, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(count, 1, 64, 64)
    for mask in masks:
        top, left = (torch.randint(0, 5, (2,), generator=generator) * 8).tolist()
        height, width = (torch.randint(2, 4, (2,), generator=generator) * 8).tolist()
        mask[:, top : top + height, left : left + width] = 1
    red, blue = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1), torch.tensor([0.1, 0.1, 0.9]).view(1, 3, 1, 1)
    images = masks * red + (1 - masks) * blue + 0.05 * torch.rand(count, 3, 64, 64, generator=generator)
    return {"image": images, "mask": masks, "index": torch.arange(count) + 100 * seed}


def test_patch_targets_are_each_cells_manipulated_fraction() -> None:
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :1] = 1  # the top-left 2 x 2 cell is half manipulated
    assert patch_targets(mask, (2, 2)).tolist() == [[[0.5, 0.0], [0.0, 0.0]]]


def test_knn_is_exact_and_chunking_does_not_change_it() -> None:
    keys = F.normalize(torch.randn(50, 6), dim=1)
    bank = MemoryBank(keys.half(), torch.rand(50))
    queries = F.normalize(torch.randn(30, 6), dim=1)
    expected = bank.labels[(queries @ bank.features.float().T).topk(3, dim=1).indices].mean(1)
    assert torch.equal(knn_probabilities(bank, queries, k=3, chunk=7), expected)
    assert torch.equal(knn_probabilities(bank, bank.features.float()[:5], k=1), bank.labels[:5])  # itself


def test_probe_recovers_masks_its_features_encode() -> None:
    settings = ProbeSettings(k=5, bank_size=200)
    train = [painted(seed) for seed in range(4)]
    banks = build_banks(train, ColourCells(), ("cells",), n_images=16, settings=settings)
    assert len(banks["cells"]) == 200 and banks["cells"].features.dtype == torch.float16  # bounded, subsampled
    test = [painted(seed) for seed in (10, 11)]
    for batch in test:  # on the grid, every test cell gets its own manipulated fraction back
        cells = ColourCells()(batch["image"])["cells"]
        queries = F.normalize(cells.permute(0, 2, 3, 1).reshape(-1, 3), dim=1)
        recovered = knn_probabilities(banks["cells"], queries, k=5).reshape(-1, 8, 8)
        assert torch.equal(recovered > 0.5, patch_targets(batch["mask"], (8, 8)) > 0.5)
    # Upsampled bilinearly to the masks and scored: only the rectangles' corner pixels blur.
    scores = probe_scores(test, ColourCells(), banks, settings)["cells"]
    assert scores["n_images"] == 8 and scores["iou"] > 95 and scores["f1_best"] > 97


def test_bad_settings_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^probe.k=0 must be a positive integer$"):
        ProbeSettings(k=0)


@pytest.mark.filterwarnings("ignore:.* RANDOM weights")
def test_deeploc_probe_runs_end_to_end_and_tables_every_probe(shared_workdir: Path, tmp_path: Path) -> None:
    args = train_args(shared_workdir, "encoder=timm_micro", "encoder.layers=[2,5]", "probe.bank_size=500")
    proc = run_cli("deeploc.cli.probe", args, tmp_path)
    [results] = (tmp_path / "outputs" / "probe").rglob("results.json")
    record = json.loads(results.read_text())
    assert set(record["results"]) == {"layer2", "layer5"} and record["bank_patches"] == {"layer2": 500, "layer5": 500}
    assert record["train_images"] == 32 and record["encoder"]["model"] == "vit_small_patch14_dinov2"
    for subsets in record["results"].values():
        for scores in subsets.values():
            assert 0 <= scores["iou"] <= 100 and scores["n_images"] > 0
    table = (tmp_path / "outputs" / "probe" / "table.md").read_text()
    assert table.count("| vit_small_patch14_dinov2@112 | layer5 |") == len(record["results"]["layer5"])
    assert "every probe so far" in proc.stdout
    refused = run_cli("deeploc.cli.probe", [*args, "encoder.adapt=lora"], tmp_path, check=False)
    assert refused.returncode == 1 and "the k-NN probe is training-free" in refused.stderr
