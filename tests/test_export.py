"""deeploc-export: one small safetensors file that rebuilds the trained model exactly, and refuses wrong pairings."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deeploc.cli.evaluate import main as eval_main
from deeploc.cli.export import main as export_main
from deeploc.cli.predict import main as predict_main
from deeploc.inference.export import FORMAT, read_export
from deeploc.inference.loading import load_model, load_model_and_metadata
from deeploc.inference.predict import predict_images
from deeploc.io import file_digest
from deeploc.models.encoders.sam2 import save_random_checkpoint
from deeploc.runs.checkpoints import IncompatibleModelError, MissingCheckpointError, ModelError
from deeploc.testing import sam2_conv
from deeploc.training.module import LocalizationModule
from tests.test_predict import TRAIN_OVERRIDES, shared_base, train_run

pytestmark = [
    pytest.mark.filterwarnings("ignore:SAM2 encoder .* RANDOM weights"),
    pytest.mark.filterwarnings("ignore:Found keys that are in the model state dict"),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The same run as tests/test_predict.py (trained once per session).
    return train_run(shared_base(tmp_path_factory), "random-encoder", "trainer.max_epochs=2")


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "decoder.safetensors"
    assert export_main([str(run_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(64, 64, 3), (40, 90, 3), (9, 7, 3)]]


def test_export_is_one_small_self_describing_file(exported: Path, run_dir: Path) -> None:
    assert exported.stat().st_size < 1_000_000
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with safe_open(str(exported), framework="pt") as handle:
        keys = set(handle.keys())
        header = json.loads(handle.metadata()["deeploc"])
    assert keys == set(sam2_conv("high_res_feats_1", 4).state_dict())  # decoder only, no encoder weights
    assert header["format"] == FORMAT and header["deeploc_version"]
    assert header["decoder"]["inputs"] == ["high_res_feats_1"] and header["decoder"]["options"]["depth"] == 4
    assert header["decoder"]["name"] == "conv" and header["decoder"]["label"] == "conv4"
    assert header["encoder"] == ckpt["deeploc"]["encoder"]
    assert header["encoder"]["config"] == "sam2.1_hiera_micro" and header["encoder"]["weights"] == "random:seed=0"
    assert header["input"]["image_size"] == 64
    assert header["test"] == metrics["test"]
    assert header["training"]["config"] == metrics["config"]
    assert header["training"]["data"]["subsets"] == metrics["config"]["subsets"]
    assert header["decoder_sha256"].startswith("sha256:")
    for key, value in ckpt["state_dict"].items():
        if key.startswith("decoder."):
            assert torch.equal(read_export(exported)[0][key.removeprefix("decoder.")], value)


def test_export_then_import_gives_identical_outputs(exported: Path, run_dir: Path, images) -> None:
    reference = LocalizationModule.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt", map_location="cpu")
    reference.eval()
    from_export, metadata = load_model_and_metadata(exported)
    from_run = load_model(run_dir)
    from_ckpt = load_model(run_dir / "checkpoints" / "best.ckpt")
    assert metadata["decoder"] == from_export.hparams.decoder
    for image, p_export, p_run, p_ckpt in zip(
        images,
        predict_images(from_export, images, batch_size=1),
        predict_images(from_run, images, batch_size=1),
        predict_images(from_ckpt, images, batch_size=1),
    ):
        expected = reference.predict_probabilities(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0]
        assert torch.equal(p_export, expected) and torch.equal(p_run, expected) and torch.equal(p_ckpt, expected)


def test_predict_cli_accepts_the_export(exported: Path, run_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "in" / "face.png"
    image.parent.mkdir()
    from PIL import Image

    Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(image)
    for model, out in ((exported, tmp_path / "a"), (run_dir, tmp_path / "b")):
        assert predict_main([str(image), "--model", str(model), "--out", str(out), "--save-probs", "--quiet"]) == 0
    assert np.array_equal(
        np.load(tmp_path / "a" / "probs" / "face.npy"), np.load(tmp_path / "b" / "probs" / "face.npy")
    )
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["model"]["encoder"]["weights"] == "random:seed=0"


def test_export_for_another_encoder_or_feature_is_refused_naming_both(exported: Path) -> None:
    _, metadata = read_export(exported)
    other_seed = {**metadata["encoder"], "weights": "random:seed=1"}
    with pytest.raises(IncompatibleModelError, match=r"random:seed=0.*random:seed=1"):
        load_model_and_metadata(exported, expect_encoder=other_seed)
    other_config = {**metadata["encoder"], "config": "sam2.1_hiera_t", "image_size": 1024}
    with pytest.raises(IncompatibleModelError, match=r"sam2.1_hiera_micro.*sam2.1_hiera_t"):
        load_model(exported, expect_encoder=other_config)
    with pytest.raises(IncompatibleModelError, match=r"'high_res_feats_1'.*'image_embed'"):
        load_model(exported, expect_feature="image_embed")
    # The matching pair loads.
    load_model_and_metadata(exported, expect_encoder=metadata["encoder"], expect_feature="high_res_feats_1")


def test_damaged_or_foreign_files_are_refused(exported: Path, tmp_path: Path) -> None:
    state, metadata = read_export(exported)
    with safe_open(str(exported), framework="pt") as handle:
        header = handle.metadata()  # the signed metadata, unchanged: only the tensors differ
    tampered = {k: v.clone() for k, v in state.items()}
    tampered["head.bias"] += 1
    save_file(tampered, tmp_path / "tampered.safetensors", metadata=header)
    with pytest.raises(ModelError, match=r"digest .* differs from the recorded"):
        load_model(tmp_path / "tampered.safetensors")
    # Weights of another architecture under this metadata (a hand-edited header) are refused, naming both.
    wrong = sam2_conv("image_embed", 4).state_dict()
    from deeploc.inference.export import write_export

    write_export(tmp_path / "wrong.safetensors", wrong, metadata)
    with pytest.raises(IncompatibleModelError, match="not a conv4 decoder on high_res_feats_1"):
        load_model(tmp_path / "wrong.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ModelError, match="not a deeploc decoder export"):
        load_model(tmp_path / "plain.safetensors")


class _Pickled:
    """Unpickling this creates a marker file: proof that a loader executed pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_never_unpickles(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    for name in ("evil.safetensors", "evil.ckpt"):
        torch.save({"state_dict": {}, "deeploc": {}, "hyper_parameters": _Pickled(marker)}, tmp_path / name)
        with pytest.raises(ModelError):
            load_model(tmp_path / name)
    assert not marker.exists()


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run trained on a SAM2 checkpoint file (official format; random weights written by save_random_checkpoint)."""
    base = shared_base(tmp_path_factory)
    sam2 = save_random_checkpoint(base / "sam2" / "micro-seed5.pt", "sam2.1_hiera_micro", seed=5)
    run = train_run(
        base, "checkpoint-encoder", f"encoder.checkpoint={sam2}", "encoder.random_init=false", "trainer.max_epochs=1"
    )
    return run, sam2


def test_sam2_checkpoint_is_verified_by_digest(checkpoint_run, run_dir: Path, tmp_path: Path, images, capsys) -> None:
    run, sam2 = checkpoint_run
    right = f"sha256:{file_digest(sam2)}"
    out = tmp_path / "decoder.safetensors"
    assert export_main([str(run), "--out", str(out)]) == 0
    assert read_export(out)[1]["encoder"]["weights"] == right

    with pytest.raises(MissingCheckpointError, match=rf"{right}.*--encoder-checkpoint"):
        load_model_and_metadata(out)
    other = save_random_checkpoint(tmp_path / "other.pt", "sam2.1_hiera_micro", seed=6)
    wrong = f"sha256:{file_digest(other)}"
    with pytest.raises(IncompatibleModelError, match=rf"{wrong}.*{right}"):
        load_model_and_metadata(out, encoder_checkpoint=other)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(images[1]).save(image)
    rc = predict_main(
        [str(image), "--model", str(out), "--encoder-checkpoint", str(other), "--out", str(tmp_path / "p")]
    )
    err = capsys.readouterr().err
    assert rc == 1 and wrong in err and right in err

    # The right checkpoint rebuilds the trained model exactly; a run directory finds the path it was trained with.
    model, _ = load_model_and_metadata(out, encoder_checkpoint=sam2)
    from_run = load_model(run)
    for a, b in zip(predict_images(model, images, 1), predict_images(from_run, images, 1)):
        assert torch.equal(a, b)
    # A checkpoint given for a decoder trained on random weights is a mismatch too.
    with pytest.raises(IncompatibleModelError, match=r"RANDOM weights \(random:seed=0\).*other.pt"):
        load_model(run_dir, encoder_checkpoint=other)


def test_export_cli_refuses_what_it_cannot_export(tmp_path: Path, capsys) -> None:
    assert export_main([str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty-run").mkdir()
    assert export_main([str(tmp_path / "empty-run")]) == 1
    assert "has no checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------- metadata covered by a digest

_MARK = "\x00field\x00"


def _fields(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every leaf of a JSON document with its path (dict keys and list positions)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _fields(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _fields(value, (*path, index))
    else:
        yield path, node


def _replaced(document: Any, path: tuple, value: Any) -> Any:
    changed = copy.deepcopy(document)
    node = changed
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return changed


def _other_byte(byte: int) -> int:
    char = chr(byte)
    if char.isdigit():
        return ord(str((int(char) + 1) % 10))
    if char.isalpha():
        return ord(char.swapcase())
    return ord("x")


def _edit_one_byte(data: bytes, text: str, metadata: dict[str, Any], path: tuple) -> bytes:
    """The export file with ONE byte of the stored JSON text of metadata field ``path`` changed in place."""
    # Where the field's value starts in the stored text: everything before it serialises identically.
    start = json.dumps(_replaced(metadata, path, _MARK), sort_keys=True).index(json.dumps(_MARK))
    value = json.dumps(_value(metadata, path))
    offset = start + (1 if value.startswith('"') and len(value) > 2 else 0)
    # Inside the safetensors header the text is a JSON string: locate it with its escaping.
    escaped = json.dumps(text)[1:-1].encode()
    assert data.count(escaped) == 1
    position = data.index(escaped) + len(json.dumps(text[:offset])[1:-1].encode())
    return data[:position] + bytes([_other_byte(data[position])]) + data[position + 1 :]


def _value(document: Any, path: tuple) -> Any:
    for key in path:
        document = document[key]
    return document


def test_a_one_byte_edit_of_any_metadata_field_is_refused(exported: Path, tmp_path: Path) -> None:
    with safe_open(str(exported), framework="pt") as handle:
        text = handle.metadata()["deeploc"]
    metadata = json.loads(text)
    assert json.dumps(metadata, sort_keys=True) == text  # the stored text is the canonical serialisation
    data = exported.read_bytes()
    fields = list(_fields(metadata))
    assert len(fields) > 50 and ("training", "best_val_iou") in dict(fields) and ("encoder", "weights") in dict(fields)
    for index, (path, _) in enumerate(fields):
        edited = tmp_path / f"edited-{index}.safetensors"
        edited.write_bytes(_edit_one_byte(data, text, metadata, path))
        assert sum(a != b for a, b in zip(data, edited.read_bytes())) == 1
        with pytest.raises(ModelError) as refused:
            read_export(edited)
        message = str(refused.value)
        assert str(edited) in message, path
        assert "modified" in message and "deeploc-export" in message, (path, message)
        edited.unlink()
    # The recorded digest itself is covered too.
    with safe_open(str(exported), framework="pt") as handle:
        digest = handle.metadata()["deeploc_sha256"]
    position = data.index(digest.encode()) + len("sha256:")
    edited = tmp_path / "edited-digest.safetensors"
    edited.write_bytes(data[:position] + bytes([_other_byte(data[position])]) + data[position + 1 :])
    with pytest.raises(ModelError, match="modified"):
        read_export(edited)


def test_an_unsigned_export_of_an_older_deeploc_is_refused_with_the_fix(exported: Path, tmp_path: Path) -> None:
    # deeploc 0.1 wrote format 1: the metadata JSON alone, covered by no digest.
    state, metadata = read_export(exported)
    old = tmp_path / "old.safetensors"
    save_file(state, old, metadata={"deeploc": json.dumps({**metadata, "format_version": 1}, sort_keys=True)})
    with pytest.raises(ModelError, match=r"export format 1.*not covered by a digest.*deeploc-export RUN_DIR"):
        load_model(old)
    # A current export whose digest was stripped from the header is not mistaken for an old one.
    stripped = tmp_path / "stripped.safetensors"
    save_file(state, stripped, metadata={"deeploc": json.dumps(metadata, sort_keys=True)})
    with pytest.raises(ModelError, match=r"no metadata digest.*modified"):
        load_model(stripped)


# ------------------------------------------------------------------------ a run's checkpoint is its own


@pytest.fixture(scope="module")
def conv12_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another run on the same data and encoder, with another decoder (CONV-12)."""
    return train_run(shared_base(tmp_path_factory), "conv12", "~arch", "decoder=conv12", "trainer.max_epochs=1")


def _refusals(run: Path, tmp_path: Path, capsys) -> list[str]:
    """The error output of deeploc-eval, deeploc-predict and deeploc-export on ``run`` (each must exit 1)."""
    image = tmp_path / "face.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    calls = [
        (eval_main, [str(run), "--out", str(tmp_path / "eval")]),
        (predict_main, [str(image), "--model", str(run), "--out", str(tmp_path / "pred"), "--quiet"]),
        (export_main, [str(run), "--out", str(tmp_path / "x.safetensors")]),
    ]
    errors = []
    for main, args in calls:
        assert main(args) == 1, main.__module__
        errors.append(capsys.readouterr().err)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "x.safetensors").exists()
    return errors


def test_metrics_json_records_the_checkpoint_digests(run_dir: Path) -> None:
    recorded = json.loads((run_dir / "metrics.json").read_text())["checkpoint_sha256"]
    assert recorded == {
        f"checkpoints/{name}": f"sha256:{file_digest(run_dir / 'checkpoints' / name)}"
        for name in ("best.ckpt", "last.ckpt")
    }


def test_a_run_whose_checkpoint_was_replaced_is_refused_naming_both(
    run_dir: Path, conv12_run: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    best = run / "checkpoints" / "best.ckpt"
    shutil.copyfile(conv12_run / "checkpoints" / "best.ckpt", best)
    ours = json.loads((run / "metrics.json").read_text())["checkpoint_sha256"]["checkpoints/best.ckpt"]
    theirs = f"sha256:{file_digest(best)}"
    for err in _refusals(run, tmp_path, capsys):
        assert ours in err and theirs in err and "replaced or modified" in err, err
    with pytest.raises(IncompatibleModelError, match=theirs):
        load_model(best)  # the .ckpt inside the run directory is checked too

    # The checkpoint is also checked against the config metrics.json records (here with its digest recorded), and
    # an unfinished run (no metrics.json) against its config_resolved.yaml.
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["checkpoint_sha256"]["checkpoints/best.ckpt"] = theirs
    (run / "metrics.json").write_text(json.dumps(metrics))
    for err in _refusals(run, tmp_path, capsys):
        assert "conv12 on" in err and "conv4 on" in err and "(metrics.json)" in err, err
    # A finished run without recorded digests (deeploc 0.1) is refused as such, with the fix.
    del metrics["checkpoint_sha256"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    for err in _refusals(run, tmp_path, capsys):
        assert "records no checkpoint digests" in err and "if_finished=retrain" in err, err
    (run / "metrics.json").unlink()
    for err in _refusals(run, tmp_path, capsys):
        assert "conv12 on" in err and "conv4 on" in err and "(config_resolved.yaml)" in err, err

    # Re-testing the run with deeploc-train (if_finished=eval) refuses it as well.
    shutil.rmtree(run)
    shutil.copytree(run_dir, run)
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    ckpt["state_dict"]["decoder.head.bias"] += 1  # same architecture, other weights: only the digest tells
    torch.save(ckpt, best)
    args = [*TRAIN_OVERRIDES, "trainer.max_epochs=2", f"hydra.run.dir={run}", "if_finished=eval"]
    base = run_dir.parent
    args += [f"data.root={base / 'data'}", f"features.dir={base / 'features'}"]
    from tests.e2e import run_cli

    proc = run_cli("deeploc.cli.train", args, tmp_path, check=False)
    assert proc.returncode != 0 and "replaced or modified" in proc.stdout + proc.stderr
    assert json.loads((run / "metrics.json").read_text()) == json.loads((run_dir / "metrics.json").read_text())


# ------------------------------------------------------------------------ keyed signatures (issue 21, 19)


def _forge(exported: Path, out: Path, key: bytes | None = None) -> Path:
    """A deliberate forgery: another encoder seed, both digests recomputed, signed with ``key`` (without one, the
    original signature is kept: the forger has no key)."""
    from deeploc.inference.export import metadata_digest
    from deeploc.inference.signing import SIGNATURE_KEY, sign

    state, metadata = read_export(exported)
    metadata["encoder"]["weights"] = "random:seed=7"
    text = json.dumps(metadata, sort_keys=True)
    header = {"deeploc": text, "deeploc_sha256": metadata_digest(text)}
    with safe_open(str(exported), framework="pt") as handle:
        original = (handle.metadata() or {}).get(SIGNATURE_KEY)
    if key is not None:
        header[SIGNATURE_KEY] = sign(text, key)
    elif original is not None:
        header[SIGNATURE_KEY] = original
    save_file(state, out, metadata=header)
    return out


def test_a_keyed_signature_refuses_forgeries_that_the_digest_accepts(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from deeploc.inference.signing import KEY_ENV, SignatureError

    key_file = tmp_path / "key"
    key_file.write_text("a-shared-secret-of-the-lab\n")
    signed = tmp_path / "signed.safetensors"
    assert export_main([str(run_dir), "--out", str(signed), "--key-file", str(key_file)]) == 0
    unsigned = tmp_path / "unsigned.safetensors"
    assert export_main([str(run_dir), "--out", str(unsigned)]) == 0
    forged = _forge(signed, tmp_path / "forged.safetensors")
    assert load_model(forged) is not None  # the unkeyed digest cannot tell a recomputed forgery

    key = b"a-shared-secret-of-the-lab"
    assert load_model(signed, signing_key=key) is not None
    with pytest.raises(SignatureError, match="signature does not match"):
        load_model(forged, signing_key=key)
    with pytest.raises(SignatureError, match="signature does not match"):
        load_model(_forge(signed, tmp_path / "other-key.safetensors", b"another key"), signing_key=key)
    with pytest.raises(SignatureError, match="is not signed"):
        load_model(unsigned, signing_key=key)

    # The commands: --key-file, or the key in DEEPLOC_SIGNING_KEY.
    image = tmp_path / "face.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    predict = [str(image), "--out", str(tmp_path / "pred"), "--quiet"]
    assert predict_main([*predict, "--model", str(signed), "--key-file", str(key_file)]) == 0
    capsys.readouterr()
    monkeypatch.setenv(KEY_ENV, key.decode())
    assert predict_main([*predict, "--model", str(forged)]) == 1
    assert "signature does not match" in capsys.readouterr().err
    assert eval_main([str(unsigned), "--out", str(tmp_path / "eval")]) == 1
    assert "is not signed" in capsys.readouterr().err
