"""How the report prints values: Markdown tables, CSV files, numbers and stats, settings cells, file-name slugs."""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deeploc.report.provenance import OTHER_KEYS
from deeploc.report.tables import Cell, Matrix, Stat


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (``|`` in cells escaped)."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in lines)


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    """`rows` under `header` as a CSV file at `path`."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def num(v: float | None) -> float | str:
    """A CSV number: rounded to 4 decimals, empty when absent."""
    return "" if v is None else round(v, 4)


def fmt(v: float | None, incomplete: bool = False) -> str:
    """A value as ``62.50`` (``—`` when absent); ``*`` = incomplete matrix."""
    return "—" if v is None else f"{v:.2f}" + ("*" if incomplete else "")


def fmt_stat(s: Stat | None, incomplete: bool = False, with_n: bool = False) -> str:
    """A value as `62.50` or `62.50 ± 1.00`, `(n=3)` added when asked and several seeds; `*` = incomplete matrix."""
    if s is None or s.mean is None:
        return "—"
    text = f"{s.mean:.2f}" + ("" if s.std is None else f" ± {s.std:.2f}")
    if with_n and s.n_max > 1:
        text += f" (n={s.seeds})"
    return text + ("*" if incomplete else "")


def delta(ours: float | None, theirs: float | None) -> str:
    """``+1.23`` / ``-0.50``, ``—`` when either is absent."""
    return "—" if ours is None or theirs is None else f"{ours - theirs:+.2f}"


def settings_cells(m: Matrix) -> list[str]:
    """decoder, feature and every other setting of a matrix, as printed."""
    assert m.settings is not None
    return [m.decoder, m.feature, *(m.settings.show(k) for k in OTHER_KEYS)]


def cells_text(cells: list[Cell]) -> str:
    """``a→b, c→d``."""
    return ", ".join(f"{a}→{b}" for a, b in cells)


def missing_text(missing: dict[str, list[Cell]]) -> str:
    """Expected cells without an IoU, then any cells lacking only some other metric."""
    parts = [cells_text(missing["iou"])] if missing["iou"] else []
    parts += [f"{k}: {cells_text(c)}" for k, c in missing.items() if k != "iou" and c and c != missing["iou"]]
    return "; ".join(parts)


def params(count: int | None) -> str:
    """A decoder's parameter count as the tables print it (``3.08 M``, ``0.13 M``); ``?`` when not recorded."""
    return "?" if count is None else f"{count / 1e6:.2f} M"


def slug(m: Matrix) -> str:
    """A file-name part: decoder_feature, then the distinguishing settings (shortened with a digest when long)."""
    text = f"{m.decoder}_{m.feature}" + (f"_{m.variant}" if m.label_keys else "")
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-")
    if len(name) > 80:
        name = f"{name[:70]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return name


def rel(path: Path, root: Path) -> str:
    """`path` relative to `root` when inside it."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def values_text(values: Iterable[Any]) -> str:
    """Distinct values in natural order (``2, 10``), ``not recorded`` for None."""
    shown = sorted({"not recorded" if v is None else str(v) for v in values}, key=_natural)
    return ", ".join(shown)


def _natural(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))
