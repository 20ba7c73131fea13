"""deeploc-predict's inputs: files, folders and globs expanded, and each image decoded as training reads it, within
a pixel limit. A file that cannot be used is refused with its reason (:class:`InputError`), never silently dropped."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deeploc.data.errors import DatasetError
from deeploc.data.images import read_rgb
from deeploc.data.samples import IMAGE_EXTENSIONS
from deeploc.errors import DeeplocError

__all__ = ["DEFAULT_MAX_PIXELS", "DecodedInputs", "InputError", "InputFile", "collect_inputs", "load_image"]

DEFAULT_MAX_PIXELS = 50_000_000


class InputError(DeeplocError, ValueError):
    """Inputs that cannot be predicted on at all (a missing path, a glob that matches nothing, a bad image)."""


@dataclass(frozen=True)
class InputFile:
    """One file to predict on."""

    path: Path
    explicit: bool  # named on the command line (a failure makes the run fail), not found in a folder or glob


def collect_inputs(
    inputs: Sequence[str | os.PathLike[str]], recursive: bool = False, exclude: Path | None = None
) -> list[InputFile]:
    """Expand files, folders (their files, sorted; subfolders with ``recursive``) and glob patterns.

    A path that does not exist and matches no glob is an :class:`InputError`; so is a folder or glob without
    any file. Files found in folders and globs are all returned (non-images are reported later, not dropped).
    """
    found: list[InputFile] = []
    seen: set[Path] = set()
    excluded = exclude.resolve() if exclude is not None else None

    def add(path: Path, explicit: bool) -> None:
        key = path.resolve()
        if key in seen or (excluded is not None and (key == excluded or excluded in key.parents)):
            return
        seen.add(key)
        found.append(InputFile(path, explicit))

    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_file():
            add(path, True)
        elif path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern) if p.is_file() and not _hidden(p.relative_to(path)))
            if not files:
                raise InputError(
                    f"folder {path} holds no files" + ("" if recursive else " (use --recursive for subfolders)")
                )
            for file in files:
                add(file, False)
        elif glob.has_magic(str(raw)):
            files = sorted(
                Path(p) for p in glob.glob(os.path.expanduser(str(raw)), recursive=True) if Path(p).is_file()
            )
            if not files:
                raise InputError(f"no file matches {raw!r}")
            for file in files:
                add(file, False)
        else:
            raise InputError(f"{path} does not exist (expected an image, a folder or a glob pattern)")
    if not found:
        raise InputError("no input files")
    return found


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def load_image(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS, explicit: bool = True) -> np.ndarray:
    """``H x W x 3`` uint8 RGB of an image file, or :class:`InputError` with the reason it cannot be used.

    Grayscale is replicated to RGB, an alpha channel is dropped (the colour channels are what was manipulated),
    16-bit images are scaled to 8 bits: the conversions training applies (``deeploc.data.images.read_rgb``).
    """
    if not explicit and path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise InputError(f"not an image file (extension {path.suffix or 'none'!r}; images: {sorted(IMAGE_EXTENSIONS)})")
    if max_pixels is not None:
        size = _header_size(path)
        if size is not None and size[0] * size[1] > max_pixels:
            raise InputError(_too_large(size, max_pixels))
    try:
        image = read_rgb(path)
    except DatasetError as exc:
        raise InputError(str(exc).removeprefix(f"image {path}: ")) from None
    height, width = image.shape[:2]
    if max_pixels is not None and height * width > max_pixels:
        raise InputError(_too_large((width, height), max_pixels))
    return image


def _too_large(size: tuple[int, int], max_pixels: int) -> str:
    return (
        f"image is {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} megapixels), over the limit of "
        f"{max_pixels / 1e6:.1f} megapixels (raise it with --max-pixels)"
    )


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header without decoding the pixels, when Pillow can read it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except Image.DecompressionBombError:
        return (1 << 16, 1 << 16)  # far over any sensible limit; the caller refuses it by size
    except Exception:
        return None  # not readable by Pillow: OpenCV decides


class DecodedInputs(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers; a failure is returned as its reason, never raised."""

    def __init__(self, inputs: list[InputFile], max_pixels: int | None) -> None:
        self.inputs = inputs
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str | None]:
        item = self.inputs[index]
        try:
            return index, load_image(item.path, self.max_pixels, explicit=item.explicit), None
        except InputError as exc:
            return index, None, str(exc)
        except Exception as exc:  # any decoder crash is this file's problem, not the batch's
            return index, None, f"cannot be read: {type(exc).__name__}: {exc}"
