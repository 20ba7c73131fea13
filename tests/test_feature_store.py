"""The feature store: cached maps equal the encoder's, are computed once, and are never served stale or corrupt."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeploc.data.datasets import ImageMaskDataset
from deeploc.data.layout import Sample
from deeploc.features import FeatureCache, FeatureStore, FeatureStoreError, extract_features
from deeploc.features.entry import HEADER_SIZE, read_entry
from deeploc.models.encoders.clip import CLIPEncoder
from deeploc.models.encoders.sam2 import SAM2Encoder

MICRO = "sam2.1_hiera_micro"
FEATURE = "image_embed"
pytestmark = pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights")


def make_encoder(seed: int = 0, image_size: int = 256) -> SAM2Encoder:
    return SAM2Encoder(MICRO, random_init=True, image_size=image_size, seed=seed)


@pytest.fixture(scope="module")
def encoder() -> SAM2Encoder:
    return make_encoder()


def write_image(path: Path, seed: int, size: int = 64) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def make_samples(root: Path, n: int, subset: str = "lama", seed: int = 0, size: int = 64) -> list[Sample]:
    """n real PNG images + 3-channel Dolos masks (0 = manipulated, 255 = real) under root/subset."""
    samples = []
    for i in range(n):
        name = f"{i:05d}"
        image = root / subset / "images" / f"{name}.png"
        mask = root / subset / "masks" / f"{name}.png"
        write_image(image, seed * 100_003 + i, size)
        m = np.full((size, size, 3), 255, np.uint8)
        m[i % size : size // 2 + i % size, 4:20] = 0
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(mask)
        samples.append(Sample(image=image, mask=mask, subset=subset, split="train", name=name))
    return samples


def reference(encoder: SAM2Encoder, samples: list[Sample], feature: str = FEATURE) -> torch.Tensor:
    images = torch.stack([ImageMaskDataset(samples)[i]["image"] for i in range(len(samples))])
    return encoder(images, names=(feature,))[feature]


def fill(store: FeatureStore, samples: list[Sample], encoder, **kwargs) -> int:
    """Extract the missing entries of one store; how many were computed."""
    return extract_features([store], samples, encoder, **kwargs)[store.feature]


def n_entries(store: FeatureStore) -> int:
    return sum(1 for _ in (store.path / "entries").rglob("*.f16"))


# ------------------------------------------------------------------------------------------------ correctness


def test_features_equal_encoder_output_and_dataset_items(tmp_path: Path, encoder: SAM2Encoder) -> None:
    samples = make_samples(tmp_path / "data", 5)
    store = FeatureStore.for_encoder(tmp_path / "cache", encoder, FEATURE)
    assert store.missing(samples) == samples
    assert fill(store, samples, encoder, batch_size=2, progress=False) == 5
    ds = store.dataset(samples)
    expected = reference(encoder, samples)
    online = ImageMaskDataset(samples)
    assert len(ds) == 5
    for i in range(5):
        item = ds[i]
        assert item["features"][FEATURE].dtype == torch.float16
        assert item["features"][FEATURE].shape == encoder.feature_shape(FEATURE)
        # fp16 storage: equal to the encoder's fp32 output up to half-precision rounding.
        torch.testing.assert_close(item["features"][FEATURE].float(), expected[i], rtol=1e-3, atol=1e-3)
        assert item["mask"].dtype == torch.float32
        assert torch.equal(item["mask"], online[i]["mask"])
        assert (item["name"], item["subset"], item["index"]) == (samples[i].name, "lama", i)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["features"][FEATURE].shape == (5, *encoder.feature_shape(FEATURE))
    assert store.nbytes_per_image == HEADER_SIZE + 256 * 16 * 16 * 2
    assert "5 images" in store.describe() and str(store.path) in store.describe()


def test_second_extract_computes_nothing_and_identical_images_are_shared(
    tmp_path: Path, encoder: SAM2Encoder, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = make_samples(tmp_path / "data", 4)
    # The same bytes in another subset: one entry serves both.
    twin = tmp_path / "data" / "ldm" / "images" / "00000.png"
    twin.parent.mkdir(parents=True)
    shutil.copyfile(samples[0].image, twin)
    samples.append(Sample(twin, samples[0].mask, "ldm", "test", "00000"))
    store = FeatureStore.for_encoder(tmp_path / "cache", encoder, FEATURE)
    assert fill(store, samples, encoder, progress=False) == 4
    assert "computing 4 of 4 images" in capsys.readouterr().out
    assert n_entries(store) == 4
    again = FeatureStore.for_encoder(tmp_path / "cache", encoder, FEATURE)  # a new run / process
    assert again.missing(samples) == []
    assert fill(again, samples, encoder, progress=False) == 0
    assert "already cached" in capsys.readouterr().out
    ds = again.dataset(samples)
    assert torch.equal(ds[0]["features"][FEATURE], ds[4]["features"][FEATURE])
    assert ds[4]["subset"] == "ldm"
    memo = json.loads((tmp_path / "cache" / "image_hashes.json").read_text())
    assert str(twin) in memo


def test_changed_image_is_recomputed(tmp_path: Path, encoder: SAM2Encoder) -> None:
    samples = make_samples(tmp_path / "data", 3)
    store = FeatureStore.for_encoder(tmp_path / "cache", encoder, FEATURE)
    fill(store, samples, encoder, progress=False)
    before = store.dataset(samples)[1]["features"][FEATURE]
    write_image(samples[1].image, seed=999)  # same path, same size, new contents
    assert store.missing(samples) == [samples[1]]
    assert fill(store, samples, encoder, progress=False) == 1
    after = store.dataset(samples)[1]["features"][FEATURE]
    assert not torch.equal(before, after)
    torch.testing.assert_close(after.float(), reference(encoder, samples[1:2])[0], rtol=1e-3, atol=1e-3)


def test_another_encoder_seed_or_size_or_feature_gets_its_own_cache(tmp_path: Path, encoder: SAM2Encoder) -> None:
    samples = make_samples(tmp_path / "data", 2)
    store = FeatureStore.for_encoder(tmp_path / "cache", encoder, FEATURE)
    fill(store, samples, encoder, progress=False)
    other_seed = make_encoder(seed=1)
    other_size = make_encoder(image_size=128)
    stores = [
        FeatureStore.for_encoder(tmp_path / "cache", other_seed, FEATURE),
        FeatureStore.for_encoder(tmp_path / "cache", other_size, FEATURE),
        FeatureStore.for_encoder(tmp_path / "cache", encoder, "high_res_feats_1"),
    ]
    assert len({store.path, *(s.path for s in stores)}) == 4
    for s in stores:
        assert s.missing(samples) == samples
    # Extracting into a store with another encoder's identity is refused.
    with pytest.raises(FeatureStoreError, match="does not match"):
        fill(stores[0], samples, encoder, progress=False)
    assert fill(stores[1], samples, other_size, progress=False) == 2
    assert stores[1].dataset(samples)[0]["features"][FEATURE].shape == other_size.feature_shape(FEATURE)
    # A folder whose recorded identity differs (collision, hand edit) is never used.
    ident = store.path / "identity.json"
    doc = json.loads(ident.read_text())
    doc["encoder"]["weights"] = "sha256:0000"
    ident.write_text(json.dumps(doc))
    with pytest.raises(FeatureStoreError, match="different identity"):
        FeatureStore.for_encoder(tmp_path / "cache", encoder, FEATURE)


class CountingEncoder(SAM2Encoder):
    """Counts the images it encodes."""

    encoded = 0

    def forward(self, images, names=None):
        self.encoded += images.shape[0]
        return super().forward(images, names)


def test_one_encoder_pass_fills_the_stores_of_several_features(tmp_path: Path) -> None:
    enc = CountingEncoder(MICRO, random_init=True, image_size=256)
    samples = make_samples(tmp_path / "data", 4)
    names = ("image_embed", "high_res_feats_0", "high_res_feats_1")
    first = FeatureStore.for_encoder(tmp_path / "cache", enc, names[0])
    fill(first, samples[:2], enc, progress=False)
    assert enc.encoded == 2
    stores = [FeatureStore.for_encoder(tmp_path / "cache", enc, name) for name in names]
    counts = extract_features(stores, samples, enc, batch_size=3, progress=False)
    assert counts == {"image_embed": 2, "high_res_feats_0": 4, "high_res_feats_1": 4}
    assert enc.encoded == 2 + 4  # each image once, all maps at a time
    assert extract_features(stores, samples, enc, progress=False) == dict.fromkeys(names, 0)
    for name, store in zip(names, stores):
        expected = reference(enc, samples, name)
        ds = store.dataset(samples)
        for i in range(4):
            torch.testing.assert_close(ds[i]["features"][name].float(), expected[i], rtol=1e-3, atol=1e-3)


class CountingCLIP(CLIPEncoder):
    """Counts the images it encodes."""

    encoded = 0

    def forward(self, images, names=None):
        self.encoded += images.shape[0]
        return super().forward(images, names)


@pytest.mark.filterwarnings("ignore:CLIP encoder .* RANDOM weights")
def test_selected_layers_are_cached_in_the_pass_of_the_decoders_map(tmp_path: Path) -> None:
    """CLIP's encoder.layers chooses which blocks it computes: all of them are cached by the first run that reads
    one, so a sweep over feature=layer12,layer20 encodes each image once; the store of a layer is the same whatever
    list it came from."""
    samples = make_samples(tmp_path / "data", 3)
    layers = [12, 16, 20, 23]
    enc = CountingCLIP("clip_micro", layers=layers, random_init=True, image_size=112)
    first = FeatureCache(tmp_path / "cache", enc, ["layer12"])
    assert first.extract(samples, enc, progress=False) == {f"layer{k}": 3 for k in layers}
    assert enc.encoded == 3
    # Served: the decoder's map only; stored: every selected layer, equal to the encoder's own output.
    assert set(first.dataset(samples)[0]["features"]) == {"layer12"}
    expected = enc(torch.stack([ImageMaskDataset(samples)[i]["image"] for i in range(3)]))
    for k in layers:
        store = FeatureStore.for_encoder(tmp_path / "cache", enc, f"layer{k}")
        assert n_entries(store) == 3
        torch.testing.assert_close(
            store.dataset(samples)[2]["features"][f"layer{k}"].float(), expected[f"layer{k}"][2], rtol=1e-3, atol=1e-3
        )
    # The sweep's next job (feature=layer20), and a run whose encoder lists layer 20 alone: nothing to compute.
    enc.encoded = 0
    assert FeatureCache(tmp_path / "cache", enc, ["layer20"]).extract(samples, enc, progress=False)["layer20"] == 0
    alone = CountingCLIP("clip_micro", layers=[20], random_init=True, image_size=112)
    assert FeatureCache(tmp_path / "cache", alone, ["layer20"]).extract(samples, alone, progress=False) == {
        "layer20": 0
    }
    assert enc.encoded == alone.encoded == 0
    assert len(list((tmp_path / "cache").glob("clip_micro-*"))) == 4  # one store per layer


# ---------------------------------------------------------------------------------------------------- safety


def test_truncated_or_corrupted_entries_are_detected(tmp_path: Path, encoder: SAM2Encoder) -> None:
    samples = make_samples(tmp_path / "data", 3)
    store = FeatureStore.for_encoder(tmp_path / "cache", encoder, FEATURE)
    fill(store, samples, encoder, progress=False)
    good = store.dataset(samples)
    paths = good.entries[FEATURE][0]
    truncated, flipped = paths[0], paths[1]
    size = os.path.getsize(truncated)
    with open(truncated, "r+b") as handle:
        handle.truncate(size - 100)
    with open(flipped, "r+b") as handle:
        handle.seek(HEADER_SIZE + 1000)
        byte = handle.read(1)
        handle.seek(HEADER_SIZE + 1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    # Cheap checks (header, size) find the truncation; the crc finds the flipped byte.
    assert store.missing(samples) == [samples[0]]
    assert store.missing(samples, verify=True) == samples[:2]
    with pytest.raises(FeatureStoreError, match="truncated"):
        store.dataset(samples)
    with pytest.raises(FeatureStoreError, match="crc32"):
        good[1]
    with pytest.raises(FeatureStoreError, match="belongs to image"):
        read_entry(paths[2], good.entries[FEATURE][1][0], store.shape)
    # Recomputed, not read as garbage.
    assert fill(store, samples, encoder, progress=False, verify=True) == 2
    ds = store.dataset(samples)
    expected = reference(encoder, samples)
    for i in range(3):
        torch.testing.assert_close(ds[i]["features"][FEATURE].float(), expected[i], rtol=1e-3, atol=1e-3)


def _flip_a_data_byte(path: str | Path) -> None:
    """Damage an entry without changing its size or header: only the crc32 can tell."""
    with open(path, "r+b") as handle:
        handle.seek(HEADER_SIZE + 1000)
        byte = handle.read(1)
        handle.seek(HEADER_SIZE + 1000)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_a_damaged_entry_names_the_file_to_delete_and_both_fixes_work(
    tmp_path: Path, encoder: SAM2Encoder, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = make_samples(tmp_path / "data", 3)
    store = FeatureStore.for_encoder(tmp_path / "cache", encoder, FEATURE)
    fill(store, samples, encoder, progress=False)
    ds = store.dataset(samples)
    damaged = ds.entries[FEATURE][0][1]
    _flip_a_data_byte(damaged)
    with pytest.raises(FeatureStoreError) as err:
        ds[1]
    msg = str(err.value)
    assert f"feature entry {damaged} is corrupt: crc32 mismatch" in msg
    assert f"rm {damaged}" in msg and "deeploc-extract" in msg
    # Fix 1, as advised: delete the file; the next extraction (training's own step) recomputes exactly that entry.
    Path(damaged).unlink()
    assert fill(store, samples, encoder, progress=False) == 1
    expected = reference(encoder, samples)
    torch.testing.assert_close(
        store.dataset(samples)[1]["features"][FEATURE].float(), expected[1], rtol=1e-3, atol=1e-3
    )
    # Fix 2, as advised: a verifying extraction (deeploc-extract) finds the damage, says so and recomputes it.
    _flip_a_data_byte(damaged)
    capsys.readouterr()
    assert fill(store, samples, encoder, progress=False) == 0  # the cheap checks cannot see it ...
    assert fill(store, samples, encoder, progress=False, verify=True) == 1  # ... the crc32 check can
    out = capsys.readouterr().out
    assert f"1 damaged entry recomputed: {damaged} (crc32 mismatch)" in out
    torch.testing.assert_close(
        store.dataset(samples)[1]["features"][FEATURE].float(), expected[1], rtol=1e-3, atol=1e-3
    )


class OverflowingEncoder(SAM2Encoder):
    """Features beyond the float16 range."""

    def forward(self, images, names=None):
        return {k: v * 1e6 for k, v in super().forward(images, names).items()}


def test_features_that_overflow_float16_are_refused(tmp_path: Path) -> None:
    enc = OverflowingEncoder(MICRO, random_init=True, image_size=256)
    samples = make_samples(tmp_path / "data", 2)
    store = FeatureStore.for_encoder(tmp_path / "cache", enc, FEATURE)
    with pytest.raises(FeatureStoreError, match="not finite in float16"):
        fill(store, samples, enc, progress=False)
    assert n_entries(store) == 0


class InterruptedStore(FeatureStore):
    """Stops (like Ctrl-C) after writing `stop_after` entries."""

    stop_after = 3

    def write_entry(self, digest: str, fmap: torch.Tensor) -> None:
        if self.stop_after == 0:
            raise KeyboardInterrupt
        super().write_entry(digest, fmap)
        self.stop_after -= 1


def test_interrupted_extraction_resumes(tmp_path: Path, encoder: SAM2Encoder) -> None:
    samples = make_samples(tmp_path / "data", 7)
    store = InterruptedStore.for_encoder(tmp_path / "cache", encoder, FEATURE)
    with pytest.raises(KeyboardInterrupt):
        fill(store, samples, encoder, batch_size=2, progress=False)
    assert len(store.missing(samples)) == 4
    # A temporary file left by a process killed mid-write is neither read nor kept.
    stale = store.entry_path("ab" * 32).with_name("x.f16.123.deadbeef.tmp")
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"partial")
    resumed = FeatureStore.for_encoder(tmp_path / "cache", encoder, FEATURE)
    assert fill(resumed, samples, encoder, batch_size=2, progress=False) == 4
    assert not stale.exists()
    ds = resumed.dataset(samples)
    expected = reference(encoder, samples)
    for i in range(7):
        torch.testing.assert_close(ds[i]["features"][FEATURE].float(), expected[i], rtol=1e-3, atol=1e-3)


def _extract_in_process(root: str, images: list[str], masks: list[str], barrier, results) -> None:
    import warnings

    warnings.filterwarnings("ignore", message="SAM2 encoder")
    samples = [Sample(Path(i), Path(m), "lama", "train", Path(i).stem) for i, m in zip(images, masks)]
    enc = make_encoder()
    store = FeatureStore.for_encoder(root, enc, FEATURE)
    barrier.wait()
    results.put(fill(store, samples, enc, batch_size=4, progress=False))


def test_two_processes_extracting_at_once_share_the_work(tmp_path: Path, encoder: SAM2Encoder) -> None:
    samples = make_samples(tmp_path / "data", 12)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = (str(tmp_path / "cache"), [str(s.image) for s in samples], [str(s.mask) for s in samples], barrier, results)
    procs = [ctx.Process(target=_extract_in_process, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    counts = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert counts == [0, 12]  # one computed everything, the other waited and found it done
    store = FeatureStore.for_encoder(tmp_path / "cache", encoder, FEATURE)
    assert n_entries(store) == 12
    assert not list(store.path.rglob("*.tmp"))
    assert store.missing(samples, verify=True) == []
    ds = store.dataset(samples)
    expected = reference(encoder, samples)
    for i in range(12):
        torch.testing.assert_close(ds[i]["features"][FEATURE].float(), expected[i], rtol=1e-3, atol=1e-3)


def test_refuses_when_the_disk_is_too_small(
    tmp_path: Path, encoder: SAM2Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = make_samples(tmp_path / "data", 3)
    store = FeatureStore.for_encoder(tmp_path / "cache", encoder, FEATURE)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    needed = 3 * store.nbytes_per_image
    with pytest.raises(FeatureStoreError) as info:
        fill(store, samples, encoder, progress=False)
    message = str(info.value)
    assert str(store.path) in message and f"needs {needed} bytes" in message and "1000 bytes" in message
    assert n_entries(store) == 0


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from deeploc.data.layout import Sample
    from deeploc.features.store import FeatureStore

    def peak_kib():
        # VmHWM: this process's own peak RSS. (ru_maxrss is not usable here: Linux carries the parent's
        # high-water mark over fork+exec into the child's ru_maxrss.)
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0])

    root, ident, feature, n, listing = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    rows = json.loads(Path(listing).read_text())[:n]
    samples = [Sample(Path(i), Path(m), "lama", "train", Path(i).stem) for i, m in rows]
    shape = json.loads(sys.argv[6])
    ds = FeatureStore(root, ident, feature, shape).dataset(samples)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=0)
    next(iter(loader))  # warm up allocator and imports before the baseline
    before = peak_kib()
    total = 0.0
    for _ in range(2):
        for batch in loader:
            total += float(batch["features"][feature].float().sum())
    after = peak_kib()
    print(json.dumps({"before_kib": before, "peak_kib": after, "n": len(ds)}))
    """
)


def test_peak_rss_does_not_grow_with_the_number_of_cached_images(tmp_path: Path) -> None:
    # high_res_feats_0 at 256 is 256 KiB per image: 4N = 128 images is 32 MiB of features.
    enc = make_encoder()
    feature, n = "high_res_feats_0", 32
    samples = make_samples(tmp_path / "data", 4 * n)
    store = FeatureStore.for_encoder(tmp_path / "cache", enc, feature)
    fill(store, samples, enc, batch_size=16, progress=False)
    listing = tmp_path / "listing.json"
    listing.write_text(json.dumps([[str(s.image), str(s.mask)] for s in samples]))

    def measure(count: int) -> dict[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "cache"), json.dumps(enc.cache_identity()), feature,
             str(count), str(listing), json.dumps(enc.feature_shape(feature))],
            capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    small, large = measure(n), measure(4 * n)
    assert (small["n"], large["n"]) == (n, 4 * n)
    extra_bytes = 3 * n * store.nbytes_per_image
    growth_small = (small["peak_kib"] - small["before_kib"]) * 1024
    growth_large = (large["peak_kib"] - large["before_kib"]) * 1024
    assert large["peak_kib"] <= 1.10 * small["peak_kib"], (small, large)
    # Holding the features (or their mappings) would add ~extra_bytes; streaming adds little (allocator and
    # page-cache noise measured up to ~0.36 x extra_bytes on a busy machine).
    assert growth_large - growth_small < 0.6 * extra_bytes, (small, large, extra_bytes)


# ------------------------------------------------------------------------------------------------ deeploc-extract


@pytest.mark.slow  # ~30 s; default suite: test_extract_cli_shards_add_up_to_the_full_cache, test_clip_e2e (each image encoded once)
def test_deeploc_extract_fills_the_cache_a_training_run_reads(tmp_path: Path) -> None:
    from tests.e2e import TINY_DATA, env_for, run_cli

    data = ["data.synthetic.n_train=8", "data.synthetic.n_valid=4", "data.synthetic.n_test=4"]
    args = [f"data.root={tmp_path / 'data'}", f"features.dir={tmp_path / 'features'}", *TINY_DATA, *data]
    # Through the installed console script: a Hydra app must find conf/ from there too, not only with python -m.
    script = Path(sys.executable).parent / "deeploc-extract"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "deeploc.cli.extract"]
    first = subprocess.run(
        [*command, *args], cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stderr[-4000:]
    assert "computing 28 of 28 images" in first.stdout  # train 8 + valid 4 of one subset, test 4 x 4 subsets
    assert "deeploc-extract: FeatureStore high_res_feats_1" in first.stdout
    # Hydra's own files go under outputs/extract, never into the run / sweep folders deeploc-report scans.
    assert (tmp_path / "outputs" / "extract").is_dir() and not (tmp_path / "outputs" / "runs").exists()
    # Exactly the store a training job with these overrides opens (same identity, feature, folder): complete.
    enc = make_encoder()  # conf/encoder/micro.yaml: sam2.1_hiera_micro, random seed 0, 256
    store = FeatureStore.for_encoder(tmp_path / "features", enc, "high_res_feats_1")
    assert f"at {store.path}: 28 images" in first.stdout
    assert n_entries(store) == 28
    # A damaged entry (same size, crc32 mismatch) stops training naming the file; deeploc-extract, as the message
    # advises, finds and recomputes it, and the same training command then works (issue 16, item 11).
    train_image = sorted((tmp_path / "data").glob("**/fake/inpaint-telea/images/train/*.png"))[0]
    damaged = store.entry_path(store.content_hashes([Sample(train_image, train_image, "x", "train", "x")])[0])
    _flip_a_data_byte(damaged)
    train = [*args, "trainer.max_epochs=1", "overlays=0", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}"]
    failed = run_cli("deeploc.cli.train", train, tmp_path, check=False)
    assert failed.returncode != 0
    assert f"feature entry {damaged} is corrupt: crc32 mismatch" in failed.stderr
    assert "deeploc-extract" in failed.stderr
    repair = subprocess.run(
        [*command, *args], cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert repair.returncode == 0, repair.stderr[-4000:]
    assert f"1 damaged entry recomputed: {damaged} (crc32 mismatch)" in repair.stdout
    run_cli("deeploc.cli.train", train, tmp_path)
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_a_damaged_entry_read_in_a_dataloader_worker_is_reported_in_one_line(
    tmp_path: Path, encoder: SAM2Encoder
) -> None:
    """torch re-raises a worker's error with the worker's traceback in its message; the commands print only the
    entry's own line (issue 21, item 10)."""
    from deeploc.cli.app import error_message

    samples = make_samples(tmp_path / "data", 2)
    store = FeatureStore.for_encoder(tmp_path / "cache", encoder, FEATURE)
    fill(store, samples, encoder, progress=False)
    ds = store.dataset(samples)
    damaged = ds.entries[FEATURE][0][1]
    _flip_a_data_byte(damaged)
    with pytest.raises(FeatureStoreError) as err:
        list(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1))
    assert "DataLoader worker" in str(err.value)  # torch's re-raise in the main process
    line = error_message(err.value)
    assert line.startswith(f"feature entry {damaged} is corrupt: crc32 mismatch") and "deeploc-extract" in line
    assert "\n" not in line and "Traceback" not in line


_DISK_FULL_SCRIPT = textwrap.dedent(
    """
    import json, math, os, shutil, sys, warnings
    from pathlib import Path
    warnings.filterwarnings("ignore", message="SAM2 encoder")
    from deeploc.data.layout import Sample
    from deeploc.features import FeatureStore, FeatureStoreError, extract_features
    from deeploc.models.encoders.sam2 import SAM2Encoder

    cache, listing = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    samples = [Sample(Path(i), Path(m), "lama", "train", Path(i).stem) for i, m in listing]
    enc = SAM2Encoder("sam2.1_hiera_micro", random_init=True, image_size=256)
    store = FeatureStore.for_encoder(cache, enc, "image_embed")
    store.content_hashes(samples)  # the hash memo is written before the disk fills up
    # Free space for the entries' bytes but not for the whole pages they occupy: the space check before the pass
    # is satisfied, and a write then hits a full disk.
    page = os.sysconf("SC_PAGE_SIZE")
    filler = cache / "filler"
    filler.write_bytes(bytes(shutil.disk_usage(cache).free - math.ceil(len(samples) * store.nbytes_per_image / page) * page))
    try:
        extract_features([store], samples, enc, progress=False)
        first = "no error"
    except FeatureStoreError as exc:
        first = str(exc)
    written = len(samples) - len(store.missing(samples, verify=True))
    leftovers = [str(p) for p in store.path.rglob("*.tmp")]
    filler.unlink()  # space again: the same extraction resumes
    resumed = extract_features([store], samples, enc, progress=False)["image_embed"]
    print(json.dumps({"first": first, "store": str(store.path), "written": written, "leftovers": leftovers,
                      "resumed": resumed, "missing": len(store.missing(samples, verify=True))}))
    """
)


def test_a_disk_full_during_extraction_ends_in_one_line_and_the_next_run_resumes(tmp_path: Path) -> None:
    """A real full file system (a 4 MiB tmpfs mounted in a user namespace, no root needed): one line naming the folder,
    the space needed and free and DEEPLOC_OUTPUTS; no half-written entry; the next extraction resumes (issue 21,
    item 8)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged user namespaces here: cannot mount a small file system to fill")
    samples = make_samples(tmp_path / "data", 8)
    listing = tmp_path / "listing.json"
    listing.write_text(json.dumps([[str(s.image), str(s.mask)] for s in samples]))
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mount_and_run = 'mount -t tmpfs -o size=4m tmpfs "$0" && exec "$1" -c "$2" "$0" "$3"'
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", mount_and_run, str(disk), sys.executable, _DISK_FULL_SCRIPT, str(listing)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    message = result["first"]
    assert message.startswith(f"not enough disk space for the feature cache in {result['store']}: needs "), message
    assert " free" in message and "DEEPLOC_OUTPUTS" in message and "\n" not in message
    assert 0 < result["written"] < 8 and result["leftovers"] == []  # whole entries only
    assert result["resumed"] == 8 - result["written"] and result["missing"] == 0
