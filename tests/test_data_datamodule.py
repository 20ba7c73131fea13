"""ImageMaskDataset, augmentations and LocalizationDataModule end to end on a generated dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from deeploc.data.augment import build_augmentations
from deeploc.data.datamodule import EpochSeededSampler, LocalizationDataModule
from deeploc.data.datasets import ImageMaskDataset
from deeploc.data.errors import DatasetError
from deeploc.data.layout import index_subsets
from deeploc.data.manipulations import SUBSETS
from deeploc.data.synthetic import dataset_folder_name, generate_dataset

STRONG_AUG = {"jpeg": {"p": 1.0, "quality": [20, 40]}, "blur": 1.0, "color_jitter": 1.0}


def data_module(root: Path, **kw: object) -> LocalizationDataModule:
    """A set-up data module on ``root``: the generated subsets, cross from copy-move, small batches, no workers."""
    args: dict = {
        "root": str(root),
        "subsets": list(SUBSETS),
        "split": {"mode": "cross", "subset": "copy-move"},
        "batch_size": 5,
        "eval_batch_size": 3,
        "num_workers": 0,
        "validate_cache": None,
    }
    args.update(kw)
    dm = LocalizationDataModule(**args)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------- dataset


def test_dataset_item_matches_files(synthetic_data: Path) -> None:
    samples = index_subsets(synthetic_data, ["blur-noise"], splits=("test",))
    ds = ImageMaskDataset(samples)
    item = ds[2]
    s = samples[2]
    assert item["name"] == s.name and item["subset"] == "blur-noise" and item["index"] == 2
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 64, 64)
    assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, 64, 64)
    rgb = cv2.cvtColor(cv2.imread(str(s.image)), cv2.COLOR_BGR2RGB)
    assert torch.allclose(item["image"], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    manipulated = cv2.imread(str(s.mask))[..., 2] != 255
    assert torch.equal(item["mask"][0], torch.from_numpy(manipulated).float())
    assert 0.05 <= item["mask"].mean().item() <= 0.40  # 1 = manipulated is the minority class here


def test_dataset_names_undecodable_file(synthetic_copy: Path) -> None:
    samples = index_subsets(synthetic_copy, ["copy-move"], splits=("valid",))
    samples[1].image.write_bytes(b"broken")
    with pytest.raises(DatasetError, match=f"image {samples[1].image}: cannot be decoded"):
        ImageMaskDataset(samples)[1]


# --------------------------------------------------------------------------------------------- augment


def test_augmentations_off_by_default_and_validated() -> None:
    assert build_augmentations(None) is None
    assert build_augmentations({}) is None
    assert build_augmentations({"jpeg": {"p": 0.0}, "blur": 0}) is None
    with pytest.raises(ValueError, match="unknown section 'flip'"):
        build_augmentations({"flip": 1.0})
    with pytest.raises(ValueError, match=r"augment.blur: unknown key 'sigmaa'"):
        build_augmentations({"blur": {"p": 1, "sigmaa": 1}})
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        build_augmentations({"jpeg": 2})


def test_augmentations_change_image_never_mask(synthetic_data: Path) -> None:
    samples = index_subsets(synthetic_data, ["inpaint-telea"], splits=("train",))
    plain = ImageMaskDataset(samples)
    for name in ("jpeg", "blur", "color_jitter"):
        aug = ImageMaskDataset(samples, transform=build_augmentations({name: 1.0}, seed=0))
        for i in range(3):
            a, b = plain[i], aug[i]
            assert torch.equal(a["mask"], b["mask"]), name
            assert (a["image"] - b["image"]).abs().mean() > 1e-3, f"{name} did nothing"
            assert b["image"].min() >= 0 and b["image"].max() <= 1


# ------------------------------------------------------------------------------------------ datamodule


def test_datamodule_cross_end_to_end(synthetic_data: Path) -> None:
    dm = data_module(synthetic_data)
    assert dm.data_root == synthetic_data / "data"
    assert (len(dm.plan.train), len(dm.plan.valid)) == (12, 4)
    assert dm.test_subsets == list(SUBSETS)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (5, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (5, 1, 64, 64) and batch["mask"].dtype == torch.float32
    assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    assert isinstance(batch["name"], list) and len(batch["name"]) == 5
    assert batch["subset"] == ["copy-move"] * 5
    # one epoch covers every training sample once, in a shuffled order
    names = [n for b in dm.train_dataloader() for n in b["name"]]
    assert sorted(names) == sorted(s.name for s in dm.plan.train) and names != sorted(names)
    assert [len(b["name"]) for b in dm.val_dataloader()] == [3, 1]
    loaders = dm.test_dataloader()
    assert len(loaders) == 4
    for subset, loader in zip(dm.test_subsets, loaders):
        got = [(s, n) for b in loader for s, n in zip(b["subset"], b["name"])]
        assert {s for s, _ in got} == {subset} and len(got) == 4
        assert [n for _, n in got] == sorted(n for _, n in got)  # evaluation is not shuffled
    assert dm.describe()["n_test"] == dict.fromkeys(SUBSETS, 4)


def test_datamodule_leave_one_out_and_in_domain(synthetic_data: Path) -> None:
    dm = data_module(
        synthetic_data, split={"mode": "leave_one_out", "subset": "blur-noise", "n_train": 4, "n_valid": 2}
    )
    assert (len(dm.plan.train), len(dm.plan.valid)) == (12, 6)
    assert dm.test_subsets == ["blur-noise", "inpaint-telea", "copy-move", "splice-jpeg"]
    by_subset = {}
    for b in dm.train_dataloader():
        for s, n in zip(b["subset"], b["name"]):
            by_subset.setdefault(s, set()).add(n)
    assert set(by_subset) == {"inpaint-telea", "copy-move", "splice-jpeg"}
    assert by_subset["inpaint-telea"] == by_subset["copy-move"] == by_subset["splice-jpeg"]
    dm = data_module(
        synthetic_data, split={"mode": "in_domain", "subset": "splice-jpeg", "n_train": None, "n_valid": None}
    )
    assert dm.test_subsets == ["splice-jpeg"] and len(dm.test_dataloader()) == 1
    assert (len(dm.plan.train), len(dm.plan.valid)) == (12, 4)


def test_in_domain_reads_only_its_subset(synthetic_copy: Path) -> None:
    shutil.rmtree(synthetic_copy / "data" / "celebahq" / "fake" / "blur-noise")
    dm = data_module(synthetic_copy, split={"mode": "in_domain", "subset": "copy-move"})
    assert len(dm.plan.train) == 12
    with pytest.raises(DatasetError, match=r"missing subset folder .*blur-noise"):
        data_module(synthetic_copy)


def test_setup_validates_used_samples(synthetic_copy: Path) -> None:
    bad = sorted((synthetic_copy / "data/celebahq/fake/splice-jpeg/masks/test").iterdir())[0]
    cv2.imwrite(str(bad), np.full((10, 10, 3), 255, np.uint8))
    with pytest.raises(DatasetError, match=f"mask {bad}: size 10x10 differs"):
        data_module(synthetic_copy)
    dm = data_module(synthetic_copy, validate=False)  # off: setup passes, reading the sample still fails loudly
    with pytest.raises(DatasetError, match=str(bad)):
        list(dm.test_dataloader()[3])
    # an in_domain split on another subset never touches the bad file
    data_module(synthetic_copy, split={"mode": "in_domain", "subset": "copy-move"})


def test_validation_cache_file(synthetic_data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "v.json"
    data_module(synthetic_data, validate_cache=str(cache))
    assert cache.is_file() and str(synthetic_data) in cache.read_text()


def test_train_order_is_seeded_per_epoch(synthetic_data: Path) -> None:
    def epoch_names(dm: LocalizationDataModule, epoch: int | None) -> list[str]:
        loader = dm.train_dataloader()
        if epoch is not None:
            loader.sampler.set_epoch(epoch)
        return [n for b in loader for n in b["name"]]

    a, b = data_module(synthetic_data, seed=1), data_module(synthetic_data, seed=1)
    loader = a.train_dataloader()
    e0 = [n for x in loader for n in x["name"]]
    e1 = [n for x in loader for n in x["name"]]  # second pass without set_epoch = next epoch
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert epoch_names(b, 0) == e0
    assert epoch_names(b, 1) == e1  # "resume" at epoch 1 replays epoch 1
    assert epoch_names(data_module(synthetic_data, seed=2), 0) != e0
    assert EpochSeededSampler(12, 1).order(1) == EpochSeededSampler(12, 1).order(1)


@pytest.mark.parametrize("workers", [0, 2])
def test_augmented_epochs_reproducible_on_resume(synthetic_data: Path, workers: int) -> None:
    def run(epochs: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        dm = data_module(synthetic_data, augment=STRONG_AUG, num_workers=workers, seed=3)
        loader = dm.train_dataloader()
        out = {}
        for epoch in epochs:
            loader.sampler.set_epoch(epoch)
            out[epoch] = {n: img for b in loader for n, img in zip(b["name"], b["image"])}
        return out

    straight, resumed = run([0, 1]), run([1])
    names = sorted(straight[0])
    assert len(names) == 12
    # epoch 1 after epoch 0 == epoch 1 straight after a restart (same order, same augmentation draws)
    assert all(torch.equal(straight[1][n], resumed[1][n]) for n in names)
    # and each epoch draws new augmentations for the same image
    assert min((straight[0][n] - straight[1][n]).abs().mean().item() for n in names) > 1e-4


def test_augmentation_only_for_training(synthetic_data: Path) -> None:
    plain = data_module(synthetic_data).dataset("train")
    aug_dm = data_module(synthetic_data, augment=STRONG_AUG)
    augmented = aug_dm.dataset("train")
    assert plain.transform is None and augmented.transform is not None
    assert (plain[0]["image"] - augmented[0]["image"]).abs().mean() > 1e-3
    assert torch.equal(plain[0]["mask"], augmented[0]["mask"])
    assert aug_dm.dataset("valid").transform is None and aug_dm.dataset("test", "copy-move").transform is None


def test_dataset_factory_extension_point(synthetic_data: Path) -> None:
    calls: list[tuple[str, int]] = []

    class Features(Dataset):
        def __init__(self, samples, stage):
            self.samples, self.stage = samples, stage
            calls.append((stage, len(samples)))

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, i):
            return {"features": torch.full((2,), float(i)), "name": self.samples[i].name}

    dm = data_module(synthetic_data)
    dm.set_dataset_factory(Features)
    assert next(iter(dm.train_dataloader()))["features"].shape == (5, 2)
    dm.val_dataloader()
    dm.test_dataloader()
    assert calls == [("train", 12), ("valid", 4), *[("test", 4)] * 4]
    dm.set_dataset_factory(None)
    assert isinstance(dm.dataset("train"), ImageMaskDataset)


def test_synthetic_generation_from_datamodule(tmp_path: Path) -> None:
    synth = {"n_train": 3, "n_valid": 2, "n_test": 2, "size": 32, "n_real": 0}
    dm = data_module(tmp_path / "gen", synthetic=synth, split={"mode": "in_domain", "subset": "copy-move"})
    assert dm.data_root == tmp_path / "gen" / dataset_folder_name(synth) / "wacv_data" / "data"
    assert next(iter(dm.train_dataloader()))["image"].shape == (3, 3, 32, 32)
    # a root named wacv_data is the dataset itself; generation is idempotent
    dm2 = data_module(dm.data_root.parent, synthetic=synth, split={"mode": "in_domain", "subset": "copy-move"})
    assert dm2.data_root == dm.data_root


def test_generated_data_is_keyed_by_its_parameters(tmp_path: Path) -> None:
    """A small-data run and the demo share one data.root without refusing each other (issue 15, item 7)."""
    split = {"mode": "in_domain", "subset": "copy-move"}
    small = {"n_train": 3, "n_valid": 2, "n_test": 2, "size": 32, "n_real": 0}
    other = {**small, "n_train": 4, "seed": 1}
    a = data_module(tmp_path / "gen", synthetic=small, split=split)
    b = data_module(tmp_path / "gen", synthetic=other, split=split)
    assert (len(a.plan.train), len(b.plan.train)) == (3, 4)
    assert a.data_root.parents[2] == b.data_root.parents[2] == tmp_path / "gen"
    assert a.data_root.parents[1].name.startswith("train3-valid2-test2-real0-32px-seed0-")
    assert b.data_root.parents[1].name.startswith("train4-valid2-test2-real0-32px-seed1-")
    # Defaults written out or left implicit name the same data; workers never change the bytes.
    assert dataset_folder_name({**small, "seed": 0, "workers": 1}) == dataset_folder_name(small)
    assert data_module(tmp_path / "gen", synthetic=small, split=split).data_root == a.data_root
    with pytest.raises(DatasetError, match=r"data\.synthetic\.n_trian is not a generator setting"):
        dataset_folder_name({**small, "n_trian": 3})
    # A dataset generated straight into the root (deeploc-make-data OUT, or deeploc <= 0.1) with these very
    # parameters is used as it is; with other parameters the keyed folder is generated beside it.
    legacy = generate_dataset(tmp_path / "made", **small)
    assert data_module(tmp_path / "made", synthetic=small, split=split).data_root == legacy / "data"
    keyed = tmp_path / "made" / b.data_root.parents[1].name / "wacv_data" / "data"
    assert data_module(tmp_path / "made", synthetic=other, split=split).data_root == keyed
    # An explicit .../wacv_data root is the dataset itself: other parameters are refused, never mixed.
    with pytest.raises(DatasetError, match="other parameters"):
        data_module(legacy, synthetic=other, split=split)


def test_bad_configuration_fails_early(synthetic_data: Path) -> None:
    with pytest.raises(ValueError, match=r"split\.mode 'xval' is unknown"):
        LocalizationDataModule(str(synthetic_data), list(SUBSETS), {"mode": "xval", "subset": "copy-move"})
    with pytest.raises(ValueError, match=r"unknown keys \['subsets'\]"):
        LocalizationDataModule(str(synthetic_data), list(SUBSETS), {"mode": "cross", "subset": "a", "subsets": []})
    with pytest.raises(ValueError, match="unknown section"):
        LocalizationDataModule(str(synthetic_data), list(SUBSETS), {"mode": "cross", "subset": "a"}, augment={"x": 1})
    dm = LocalizationDataModule(str(synthetic_data), list(SUBSETS), {"mode": "cross", "subset": "copy-move"})
    with pytest.raises(RuntimeError, match=r"setup\(\) has not run"):
        dm.train_dataloader()
    hp = dict(dm.hparams)
    assert hp["split"]["n_train"] == 3000 and hp["seed"] == 0  # defaults filled in, primitives only


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.orders: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        self.orders.setdefault(self.current_epoch, []).extend(batch["name"])
        return (self.w * batch["image"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_sets_the_sampler_epoch(synthetic_data: Path, tmp_path: Path) -> None:
    dm = data_module(synthetic_data, split={"mode": "in_domain", "subset": "copy-move"}, batch_size=4, seed=5)
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    names = [s.name for s in dm.plan.train]
    sampler = EpochSeededSampler(len(names), 5)
    for epoch in range(3):
        assert model.orders[epoch] == [names[i] for i in sampler.order(epoch)]


def test_hyperparameters_stay_primitive_with_omegaconf_input(synthetic_data: Path, tmp_path: Path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(
        {
            "subsets": list(SUBSETS),
            "split": {"mode": "leave_one_out", "subset": "copy-move", "n_train": 4, "n_valid": 2},
            "augment": {"jpeg": {"p": 0.5, "quality": [30, 90]}},
        }
    )
    dm = LocalizationDataModule(
        synthetic_data, cfg.subsets, cfg.split, augment=cfg.augment, num_workers=0, validate_cache=None
    )
    hp = dict(dm.hparams)
    assert type(hp["split"]) is dict and type(hp["subsets"]) is list and type(hp["augment"]["jpeg"]["quality"]) is list
    assert hp["root"] == str(synthetic_data)
    torch.save(hp, tmp_path / "hp.pt")
    assert torch.load(tmp_path / "hp.pt", weights_only=True) == hp
    dm.setup()
    assert len(dm.plan.train) == 12
