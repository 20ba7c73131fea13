"""Our ID / OOD IoU beside the study's published values (deeploc/resources/study_results.json), recomputed over the
same subsets, with how each configuration's setup differs from the study's (``deeploc-report --compare-study`` and
the ID-vs-OOD chart)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

from deeploc.report.collect import DOLOS_SUBSETS, ordered_subsets
from deeploc.report.provenance import LABELS, LOO, OTHER_KEYS, Settings, study_gaps
from deeploc.report.render import delta, fmt, fmt_stat, md_table, num, settings_cells
from deeploc.report.tables import Matrix, label_keys

STUDY_NOTE = (
    "Study values are recomputed from the author's matrices (deeploc/resources/study_results.json), which are "
    "published rounded to two decimals, so they can differ from the poster by 0.01 (67.28 / 11.02 vs 67.27 / 11.01). "
    "The poster prints OOD 14.77 / 15.12 for conv4 / conv12, which those matrices give as 15.48 / 16.09."
)


@dataclass(frozen=True)
class ComparisonRow:
    """Our ID / OOD IoU of one configuration beside the study's, and how its setup differs from the study's."""

    matrix: Matrix
    id: float | None
    id_study: float | None
    ood: float | None
    ood_study: float | None
    complete: bool
    gaps: list[str]  # empty = comparable

    @property
    def comparable(self) -> bool:
        return not self.gaps


@dataclass(frozen=True)
class StudyComparison:
    """Our ID / OOD IoU next to the study's, recomputed over the same subsets; `rows` empty when not applicable."""

    applies: bool
    note: str
    rows: list[ComparisonRow]


def study_matrix(decoder: str, feature: str, split: str = "cross") -> Matrix | None:
    """The study's published IoU matrix of one configuration (None when the study did not run it)."""
    data = json.loads(resources.files("deeploc").joinpath("resources/study_results.json").read_text("utf-8"))
    table = data[split].get(f"{decoder}/{feature}")
    if table is None:
        return None
    matrix = Matrix(decoder, feature, split, ordered_subsets(table), cross=split != LOO)
    matrix.runs = {(a, b): {None: [{"iou": v}]} for a, row in table.items() for b, v in row.items()}
    return matrix


def study_comparison(matrices: Mapping[Settings, Matrix], split: str = "cross") -> StudyComparison:
    """Our ID / OOD IoU per configuration beside the study's when the subsets are Dolos's, with the differences
    between each configuration's setup and the study's (random weights, another encoder, input size, ...)."""
    subsets = list(dict.fromkeys(s for m in matrices.values() for s in m.subsets))
    foreign = [s for s in subsets if s not in DOLOS_SUBSETS]
    if foreign or not subsets:
        note = (
            f"The comparison with the study does not apply: subsets {', '.join(foreign) or '(none)'} are not "
            f"Dolos's ({', '.join(DOLOS_SUBSETS)})."
        )
        return StudyComparison(False, note, [])
    rows = []
    for ours in matrices.values():
        theirs = study_matrix(ours.decoder, ours.feature, split)
        if theirs is not None:
            theirs.subsets = ours.subsets
        gaps = study_gaps(ours.settings, split) if ours.settings is not None else []
        if theirs is None:
            gaps = [*gaps, "the study did not run this configuration"]
        rows.append(
            ComparisonRow(
                ours,
                ours.id_mean(),
                theirs.id_mean() if theirs else None,
                ours.ood_mean(),
                theirs.ood_mean() if theirs else None,
                not ours.missing(),
                gaps,
            )
        )
    note = STUDY_NOTE
    if len(subsets) < len(DOLOS_SUBSETS):
        note += f" Study values use the same {len(subsets)} subsets as this sweep: {', '.join(subsets)}."
    return StudyComparison(True, note, rows)


def study_bars(comparison: StudyComparison) -> tuple[list[tuple[float | None, float | None] | None], str]:
    """The study's (ID, OOD) per row where comparable, else None; and a note saying which values are drawn and why
    the others are not."""
    if not comparison.applies:
        return [], f"Study values not drawn: {comparison.note}"
    bars = [(r.id_study, r.ood_study) if r.comparable else None for r in comparison.rows]
    why: dict[str, list[str]] = {}
    for r in comparison.rows:
        if not r.comparable:
            why.setdefault("; ".join(r.gaps), []).append(r.matrix.label)
    parts = ["Hatched bars: the study's values over the same subsets."] if any(bars) else []
    if why:
        everywhere = len(why) == 1 and len(next(iter(why.values()))) == len(comparison.rows)
        reasons = list(why) if everywhere else [f"{', '.join(labels)}: {reason}" for reason, labels in why.items()]
        parts.append("Study values not drawn (not comparable): " + " | ".join(reasons))
    return bars, " ".join(parts)


def comparison_csv(rows: list[tuple[str, ComparisonRow]]) -> tuple[list[str], list[list]]:
    """comparison.csv: our ID / OOD IoU beside the study's, and whether the setups are comparable."""
    header = ["split", "decoder", "feature", *OTHER_KEYS, "id_iou", "id_iou_study", "ood_iou", "ood_iou_study"]
    header += ["complete", "comparable", "differences_from_study"]
    body = [
        [
            split,
            *settings_cells(r.matrix),
            *(num(v) for v in (r.id, r.id_study, r.ood, r.ood_study)),
            r.complete,
            r.comparable,
            "; ".join(r.gaps),
        ]
        for split, r in rows
    ]
    return header, body


def comparison_md(comparisons: list[tuple[str, StudyComparison]]) -> str:
    """The --compare-study section: one table per split, loud when a row is not comparable."""
    text = ["## Comparison with the study (IoU, %)"]
    for split, c in comparisons:
        if not c.applies:
            continue
        keys = label_keys({r.matrix.settings: r.matrix for r in c.rows})  # type: ignore[misc]
        first, second = ("held-out", "seen") if split == LOO else ("ID", "OOD")
        header = ["decoder", "feature", *(LABELS[k] for k in keys), first, f"{first} (study)", f"Δ {first}"]
        header += [second, f"{second} (study)", f"Δ {second}", "comparable with the study"]
        body = [_comparison_line(r, keys) for r in c.rows]
        section = f"### {split}\n\n"
        if not all(r.comparable for r in c.rows):
            section += (
                "**⚠ Rows marked NO are NOT comparable with the study: their setup differs from it (last column); "
                "the Δ columns then measure that difference, not a reproduction gap.**\n\n"
            )
        text.append(section + md_table(header, body))
    text += list(dict.fromkeys(c.note for _, c in comparisons)) or ["No results to compare."]
    return "\n\n".join(text)


def _comparison_line(r: ComparisonRow, keys: tuple[str, ...]) -> list[str]:
    """A comparison table row; its last column says loudly when the setup is not the study's."""
    m = r.matrix
    settings = [m.settings.show(k) for k in keys] if m.settings is not None else []
    comparable = "yes" if r.comparable else f"**NO**: {'; '.join(r.gaps)}"
    ours = [
        fmt_stat(m.id_stat(), not r.complete),
        fmt(r.id_study),
        delta(r.id, r.id_study),
        fmt_stat(m.ood_stat(), not r.complete),
        fmt(r.ood_study),
        delta(r.ood, r.ood_study),
    ]
    return [m.decoder, m.feature, *settings, *ours, comparable]
