"""Read the tensors of a TorchScript archive without running anything from it.

OpenAI distributes CLIP weights as TorchScript archives (``ViT-L-14.pt``). ``torch.load(weights_only=True)`` refuses
them, and ``torch.jit.load`` compiles the archive's code and unpickles its module objects. This reader opens the zip
itself and unpickles ``data.pkl`` with a restricted unpickler (the "restricting globals" recipe of Python's pickle
documentation): every TorchScript class becomes an inert record of its pickled attributes, tensors are rebuilt from
the archive's raw storage records by deeploc's own code, and any other global the pickle names is refused. Nothing
the file names is imported or called; its ``code/`` folder is never read.

The result is the module tree's tensor attributes by dotted name, as ``module.state_dict()`` would name them (plus
tensor attributes that are not parameters or buffers, which a strict load against a known model then reports).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deeploc.errors import DeeplocError

__all__ = ["TorchScriptError", "is_torchscript_archive", "read_torchscript_tensors"]

# Storage classes a TorchScript pickle names in its persistent ids, and the dtype of their elements.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class TorchScriptError(DeeplocError, ValueError):
    """A file that is not a TorchScript archive deeploc can read safely; the message names it."""


class _ScriptObject:
    """An instance of a TorchScript class, reduced to the state its pickle carries (never its behaviour)."""

    qualname = "?"

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class _StorageKind:
    dtype: torch.dtype


def _rebuild_tensor(
    storage: torch.Tensor,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    hooks: Any,
    metadata: Any = None,
) -> torch.Tensor:
    """A tensor view of a flat storage (the signature of ``torch._utils._rebuild_tensor_v2``, re-implemented)."""
    if hooks:
        raise pickle.UnpicklingError("a tensor carries backward hooks")
    try:
        return storage.as_strided(tuple(size), tuple(stride), int(offset))
    except RuntimeError as exc:
        raise pickle.UnpicklingError(f"a tensor lies outside its storage ({exc})") from None


def _restore_type_tag(value: Any, type_str: str) -> Any:
    return value  # TorchScript annotates typed containers; the values are what matters here


_ALLOWED_CALLABLES: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a TorchScript archive; storages come from ``archive`` under ``prefix/data/``."""

    def __init__(self, payload: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(payload))
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_ScriptObject,), {"qualname": f"{module}.{name}"})
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageKind(_STORAGE_DTYPES[name])
        try:
            return _ALLOWED_CALLABLES[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which a weights file has no need for"
            ) from None

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageKind)):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, kind, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            itemsize = torch.empty((), dtype=kind.dtype).element_size()
            if len(raw) != int(numel) * itemsize:
                raise pickle.UnpicklingError(f"storage {key} holds {len(raw)} bytes, expected {int(numel) * itemsize}")
            flat = torch.frombuffer(bytearray(raw), dtype=kind.dtype) if raw else torch.empty(0, dtype=kind.dtype)
            self._storages[key] = flat
        return self._storages[key]


def _archive_prefix(archive: zipfile.ZipFile) -> str | None:
    """The top folder of a TorchScript archive (``<prefix>/data.pkl`` next to ``constants.pkl`` or ``code/``)."""
    names = archive.namelist()
    for name in names:
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == "data.pkl":
            prefix = parts[0]
            if f"{prefix}/constants.pkl" in names or any(n.startswith(f"{prefix}/code/") for n in names):
                return prefix
    return None


def is_torchscript_archive(path: str | Path) -> bool:
    """Whether ``path`` is a zip laid out as a TorchScript archive (``torch.jit.save``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _archive_prefix(archive) is not None
    except (zipfile.BadZipFile, OSError):
        return False


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        return
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            out[f"{prefix}{name}"] = value
        elif isinstance(value, _ScriptObject):
            _flatten(value, f"{prefix}{name}.", out)


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the module saved in TorchScript archive ``path``, by dotted name (no code runs).

    Raises :class:`TorchScriptError` naming the file for a truncated or corrupt archive, a zip that is not a
    TorchScript archive, or a pickle that names anything besides TorchScript classes, tensors and plain containers.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive)
            if prefix is None:
                raise TorchScriptError(f"{path} is a zip file but not a TorchScript archive (no data.pkl + code)")
            if f"{prefix}/byteorder" in archive.namelist() and archive.read(f"{prefix}/byteorder") != b"little":
                raise TorchScriptError(f"{path} stores big-endian tensors, which deeploc does not read")
            root = _SafeUnpickler(archive.read(f"{prefix}/data.pkl"), archive, prefix).load()
    except TorchScriptError:
        raise
    except (zipfile.BadZipFile, EOFError, KeyError, OSError, zipfile.LargeZipFile) as exc:
        raise TorchScriptError(f"cannot read TorchScript archive {path}: truncated or corrupt ({exc})") from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise TorchScriptError(f"refusing TorchScript archive {path}: {exc}") from None
    if not isinstance(root, _ScriptObject):
        raise TorchScriptError(f"{path} does not hold a TorchScript module (its data.pkl is a {type(root).__name__})")
    tensors: dict[str, torch.Tensor] = {}
    _flatten(root, "", tensors)
    return tensors
