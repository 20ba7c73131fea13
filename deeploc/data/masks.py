"""How deeploc reads a mask file, and the rules a localization mask must follow.

Convention
    A mask is a gray image saved with one channel or three equal ones, the size of its image. With
    ``mask_polarity=black_is_manipulated`` (Dolos, the default) a pixel is manipulated unless it is exactly 255;
    ``white_is_manipulated`` is the mirror image (manipulated unless exactly 0). Every mask is first brought to the
    Dolos convention (:func:`to_dolos`), so the readers and each rule below exist once.

    ``mask_threshold`` (``data.mask_threshold``, default None) binarises a mask first (:func:`binarize`): a value
    above it is white (255), any other black (0); the polarity then says which colour is manipulated. It is for
    datasets whose masks are not exactly binary (saved as JPEG, resampled, 0/1 instead of 0/255); without it such
    masks are refused by the "binary up to noise" rule below.

Rules for one file (:func:`inspect_mask`)
    * binary up to noise: at most ``MASK_MAX_AMBIGUOUS_FRACTION`` of the pixels may be neither exactly "real" nor
      clearly "manipulated" (within ``MASK_MANIPULATED_MAX`` of it); a JPEG-saved or resampled mask is refused,
      because its real area, full of 250-254 values, would silently read as manipulated;
    * channels agree: a coloured mask (a red region on white reads 0% manipulated in channel 0 and 30% in the
      others) is refused when more than ``MASK_MAX_AMBIGUOUS_FRACTION`` of its pixels read manipulated in some
      channels and real in others; deeploc never guesses which channel was meant.

Rules for a split of a localization subset (:func:`empty_mask_problem`, :func:`polarity_problem`)
    * no empty mask (every manipulated image has a region), unless ``allow_empty_masks``;
    * the masks of one ``<subset>/<split>`` folder mark at most ``max_manipulated_fraction`` (0.5) of each image as
      manipulated on average; more means the polarity is almost surely inverted (Dolos edits eyes, mouths,
      faces: a fraction of the image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deeploc.data.errors import format_list

__all__ = [
    "DEFAULT_POLARITY",
    "MASK_MANIPULATED_MAX",
    "MASK_MAX_AMBIGUOUS_FRACTION",
    "MAX_MANIPULATED_FRACTION",
    "POLARITIES",
    "WHITE_POLARITY",
    "MaskRules",
    "MaskStats",
    "binarize",
    "check_polarity",
    "check_threshold",
    "empty_mask_problem",
    "inspect_mask",
    "polarity_problem",
    "to_dolos",
]

POLARITIES: tuple[str, ...] = ("black_is_manipulated", "white_is_manipulated")
DEFAULT_POLARITY = POLARITIES[0]
# Public localization sets (CASIA, COVERAGE, IMD2020, NIST16) draw the manipulated region white: the default of the
# folders and manifest sources. Dolos (the default elsewhere) draws it black.
WHITE_POLARITY = POLARITIES[1]
# A pixel is "clean" when it is exactly the real value or within MASK_MANIPULATED_MAX of the manipulated one
# (anti-aliased region edges are harmless: they read manipulated either way).
MASK_MANIPULATED_MAX = 32
MASK_MAX_AMBIGUOUS_FRACTION = 0.01
MAX_MANIPULATED_FRACTION = 0.5

_COLOURS = {"black_is_manipulated": ("black (0)", "white (255)"), "white_is_manipulated": ("white (255)", "black (0)")}


def check_polarity(value: object, key: str = "data.mask_polarity") -> str:
    """``value`` if it is a known polarity; otherwise a ValueError naming ``key`` and the choices."""
    if value not in POLARITIES:
        raise ValueError(f"{key}={value!r} is not a mask polarity; choose {' or '.join(POLARITIES)}")
    return str(value)


def check_threshold(value: object, key: str = "data.mask_threshold") -> int | None:
    """``value`` if it is None or an integer in [0, 254]; otherwise a ValueError naming ``key``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 254:
        raise ValueError(
            f"{key}={value!r} must be null (exact masks: 0 and 255) or an integer in [0, 254]: mask values above it "
            "read white, the others black (e.g. 127 for JPEG-saved masks, 0 for masks drawn with 0 and 1)"
        )
    return value


def binarize(values: np.ndarray, threshold: int | None) -> np.ndarray:
    """uint8 mask values as 0 / 255 (white above ``threshold``); unchanged when ``threshold`` is None."""
    if threshold is None:
        return values
    return np.where(values > threshold, np.uint8(255), np.uint8(0))


def _other(polarity: str) -> str:
    return POLARITIES[1 - POLARITIES.index(polarity)]


def _describe(polarity: str) -> str:
    manipulated, real = _COLOURS[polarity]
    return f"data.mask_polarity={polarity}: {manipulated} = manipulated, {real} = real"


@dataclass(frozen=True)
class MaskRules:
    """The settings of the split-level rules (config ``data.allow_empty_masks``, ``data.max_manipulated_fraction``)."""

    allow_empty: bool = False
    max_manipulated_fraction: float = MAX_MANIPULATED_FRACTION

    def __post_init__(self) -> None:
        if not isinstance(self.allow_empty, bool):
            raise ValueError(f"data.allow_empty_masks={self.allow_empty!r} must be true or false")
        fraction = self.max_manipulated_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(
                f"data.max_manipulated_fraction={fraction!r} must be in (0, 1]: the largest mean share of each image "
                "that the masks of one split may mark as manipulated"
            )


@dataclass(frozen=True)
class MaskStats:
    """What validation learns about one mask (and its image, which has the same size)."""

    height: int
    width: int
    manipulated: int  # pixels
    f1_positive: int  # manipulated pixels that survive the metrics' erosion (deeploc.data.regions.f1_positive_count)

    @property
    def fraction(self) -> float:
        return self.manipulated / max(1, self.height * self.width)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def thin(self) -> bool:
        """Manipulated, but every region is thinner than the metrics' erosion: F1 has no positive pixel here."""
        return self.manipulated > 0 and self.f1_positive == 0


def to_dolos(values: np.ndarray, polarity: str) -> np.ndarray:
    """uint8 mask values in the Dolos convention (255 = real, anything else manipulated) from ``polarity``'s."""
    return values if polarity == DEFAULT_POLARITY else np.subtract(255, values, dtype=np.uint8)


def inspect_mask(rgb: np.ndarray, polarity: str, threshold: int | None = None) -> tuple[list[str], MaskStats]:
    """Why a decoded ``HxWx3`` uint8 mask breaks the rules for one file (empty list if it does not), and its stats
    (read from channel 0, as the datasets read it; binarised first with ``threshold``)."""
    import torch  # with deeploc.metrics: only when a mask is decoded (a cached validation never imports them)

    from deeploc.data.regions import f1_positive_count

    dolos = to_dolos(binarize(rgb, threshold), polarity)
    first = dolos[..., 0]
    reasons: list[str] = []
    limit = MASK_MAX_AMBIGUOUS_FRACTION * first.size
    disagree = 0
    if not all(np.array_equal(first, dolos[..., c]) for c in range(1, dolos.shape[2])):  # fast path: gray masks
        real = [dolos[..., c] == 255 for c in range(dolos.shape[2])]
        disagree = int(np.count_nonzero(np.logical_or.reduce([real[0] != other for other in real[1:]])))
    if disagree > limit:
        reasons.append(
            f"coloured: its channels disagree on {disagree} pixels ({100.0 * disagree / first.size:.1f}%), "
            f"which read manipulated in some colour channels and real in others ({_describe(polarity)}). Save it as "
            "a gray mask (one channel, or three equal ones)"
        )
    ambiguous = int(np.count_nonzero((first > MASK_MANIPULATED_MAX) & (first < 255)))
    if ambiguous > limit:
        black = polarity == DEFAULT_POLARITY
        manipulated = f"<= {MASK_MANIPULATED_MAX}" if black else f">= {255 - MASK_MANIPULATED_MAX}"
        real_value = "255" if black else "0"
        reasons.append(
            f"not binary, {ambiguous} pixels ({100.0 * ambiguous / first.size:.1f}%) are neither {real_value} (real) "
            f"nor {manipulated} (manipulated); was it saved as JPEG or resized? Then binarise it: data.mask_threshold=127 "
            "(deeploc-eval: --mask-threshold 127; values above it read white, the others black)"
        )
    target = first != 255
    stats = MaskStats(
        height=int(first.shape[0]),
        width=int(first.shape[1]),
        manipulated=int(np.count_nonzero(target)),
        f1_positive=int(f1_positive_count(torch.from_numpy(target)[None])[0]),
    )
    return reasons, stats


def empty_mask_problem(masks: Sequence[Path], polarity: str) -> str:
    """The refusal of masks with no manipulated pixel (``masks`` non-empty)."""
    return (
        f"{len(masks)} mask(s) with no manipulated pixel ({_describe(polarity)}): {format_list(masks)}. In a "
        "localization subset every image has a manipulated region, so an empty mask is a wrong file or the wrong "
        f"polarity. Fix the masks, set data.mask_polarity={_other(polarity)} if that is how they are drawn, or keep them with "
        "data.allow_empty_masks=true (deeploc-check / deeploc-eval: --allow-empty-masks)"
    )


def polarity_problem(group: str, stats: Sequence[MaskStats], polarity: str, rules: MaskRules) -> str | None:
    """The refusal of a split whose masks mark most of each image as manipulated; None when it looks right."""
    if not stats:
        return None
    mean = float(np.mean([s.fraction for s in stats]))
    if mean <= rules.max_manipulated_fraction:
        return None
    other = _other(polarity)
    most = sum(s.fraction > 0.5 for s in stats)
    return (
        f"{group}: the masks mark {100.0 * mean:.1f}% of each image as manipulated on average ({most} of "
        f"{len(stats)} masks more than half; {_describe(polarity)}), so they look inverted. Set "
        f"data.mask_polarity={other} (deeploc-check / deeploc-eval: --mask-polarity {other}); if the regions "
        f"really cover most of each image, raise data.max_manipulated_fraction (now {rules.max_manipulated_fraction})"
    )
