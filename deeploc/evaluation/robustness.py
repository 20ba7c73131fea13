"""Robustness: a trained model's scores on perturbed copies of the test images, per perturbation and strength.

How a perturbed image is scored
    Each test image is read, perturbed (:mod:`deeploc.evaluation.perturbations`, deterministic per image) and written
    as a lossless PNG, so the encoder sees exactly the perturbed pixels; the mask is the ORIGINAL one. When the image
    was resized, the model predicts on the resized image (the encoder resizes it to its square input as any image)
    and its probabilities are resized bilinearly to the original mask's size (:func:`deeploc.metrics.resize_probs`,
    as for every image): the metrics are computed at the original mask resolution, on the same pixels and with the
    same F1 boundary band as the clean score, so every strength is comparable with it. No mask is resampled.

Features of perturbed images
    Computed like those of clean images. With a feature cache (``--features-dir``) the perturbed PNGs are written
    under ``<cache>/perturbed/<perturbation>/`` (named by the sha256 of the source image) and their features are
    cached by the store like any image's, keyed by the PNG's own sha256: a perturbed image is other content, so it
    gets its own key, and every run on the same encoder and test images (e.g. the study's five configurations x
    four training subsets) encodes each perturbed image once. Without a cache, the PNGs go to a temporary folder
    removed after each strength, and the encoder runs on them directly.

Outputs (next to eval.json): ``robustness.json``, ``robustness.csv`` (one row per subset, perturbation and strength;
``none`` = clean), ``robustness.md`` (one table per metric) and ``robustness_<metric>.png`` (one panel per
perturbation, strength on x from clean to harshest, one line per subset). Every table names the metric convention
and the pixel threshold.
"""

from __future__ import annotations

import csv
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2

from deeploc.data.images import read_rgb
from deeploc.data.roles import subset_role
from deeploc.data.samples import Sample
from deeploc.evaluation.figures import Line, root_name, strength_panels
from deeploc.evaluation.perturbations import Perturbation, apply
from deeploc.evaluation.scoring import THRESHOLD, evaluate, score_keys
from deeploc.io import atomic_write_bytes, file_digest, write_json_atomic
from deeploc.metrics import metric_label, metric_names
from deeploc.visualize import save

log = logging.getLogger(__name__)

CLEAN = "none"
Scores = dict[str, dict[str, float]]  # subset -> metric -> value


def write_perturbed(
    samples: Sequence[Sample], perturbation: Perturbation, folder: Path, workers: int = 2
) -> list[Sample]:
    """Every sample with its image perturbed and written as ``folder/<sha256 of the source image>.png`` (mask, name
    and subset unchanged)."""
    folder.mkdir(parents=True, exist_ok=True)

    def one(sample: Sample) -> Sample:
        target = folder / f"{file_digest(sample.image)}.png"
        ok, data = cv2.imencode(".png", cv2.cvtColor(apply(read_rgb(sample.image), perturbation), cv2.COLOR_RGB2BGR))
        if not ok:  # pragma: no cover - OpenCV fails only on invalid arrays
            raise RuntimeError(f"cannot encode the perturbed {sample.image}")
        atomic_write_bytes(target, data.tobytes())
        return replace(sample, image=target)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, samples))


@contextmanager
def _folder(feature_dir: str | None, perturbation: Perturbation) -> Iterator[Path]:
    """Where the perturbed PNGs of one strength go: inside the feature cache (kept), else a temporary folder."""
    if feature_dir is not None:
        yield Path(feature_dir) / "perturbed" / perturbation.text
        return
    folder = Path(tempfile.mkdtemp(prefix=f"deeploc-{perturbation.text}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_robustness(
    model: Any,
    by_subset: Mapping[str, list[Sample]],
    perturbations: Sequence[Perturbation],
    batch_size: int = 32,
    num_workers: int = 0,
    feature_dir: str | None = None,
    convention: str = "study",
) -> dict[str, Scores]:
    """Scores of ``model`` on each perturbed copy of ``by_subset``: ``{"jpeg=70": {subset: scores}}``."""
    results: dict[str, Scores] = {}
    for perturbation in perturbations:
        log.info("robustness: %s", perturbation.text)
        with _folder(feature_dir, perturbation) as folder:
            perturbed = {
                name: write_perturbed(samples, perturbation, folder, max(2, num_workers))
                for name, samples in by_subset.items()
            }
            results[perturbation.text] = evaluate(
                model, perturbed, batch_size, num_workers, feature_dir, convention, match_sizes=False
            )
    return results


# ------------------------------------------------------------------------------------------------------ outputs


def ordered(perturbations: Sequence[Perturbation]) -> dict[str, list[Perturbation]]:
    """Perturbations grouped by name (first-seen order), each group from mildest to harshest."""
    groups: dict[str, list[Perturbation]] = {}
    for p in perturbations:
        groups.setdefault(p.name, []).append(p)
    return {name: sorted(group, key=Perturbation.severity) for name, group in groups.items()}


def write_robustness(
    out_dir: Path,
    clean: Scores,
    perturbed: Mapping[str, Scores],
    perturbations: Sequence[Perturbation],
    context: dict[str, Any],
    trained: Mapping[str, Any] | None = None,
) -> list[Path]:
    """robustness.json / .csv / .md and one figure per metric (module docstring); `trained` (the model's training
    config: split, subset) names each subset's role in the figures' legends."""
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = ordered(perturbations)
    payload = {
        **context,
        "threshold": THRESHOLD,
        "perturbations": [
            {"name": p.name, "strength": p.strength, "label": p.spec.label, "description": p.spec.description}
            for group in groups.values()
            for p in group
        ],
        "clean": clean,
        "perturbed": {p.text: perturbed[p.text] for group in groups.values() for p in group},
    }
    paths = [write_json_atomic(out_dir / "robustness.json", payload)]
    rows = [(name, CLEAN, "", scores) for name, scores in clean.items()]
    rows += [
        (name, p.name, f"{p.strength:g}", perturbed[p.text][name]) for g in groups.values() for p in g for name in clean
    ]
    paths.append(out_dir / "robustness.csv")
    with open(paths[-1], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subset", "perturbation", "strength", "split", "convention", "threshold", *score_keys()])
        for name, kind, strength, scores in rows:
            values = [f"{scores[k]:.4f}" if k in scores else "" for k in score_keys()]  # "": not in the convention
            writer.writerow([name, kind, strength, context["split"], context["convention"], THRESHOLD, *values])
    paths.append(out_dir / "robustness.md")
    paths[-1].write_text(robustness_markdown(clean, perturbed, groups, context) + "\n", encoding="utf-8")
    paths += robustness_figures(out_dir, clean, perturbed, groups, context, trained)
    return paths


def reported(clean: Scores) -> list[str]:
    """The metrics the scores hold (a convention reports only the metrics it defines), in registry order."""
    first = next(iter(clean.values()), {})
    return [m for m in metric_names() if m in first]


def robustness_markdown(
    clean: Scores, perturbed: Mapping[str, Scores], groups: Mapping[str, list[Perturbation]], context: Mapping[str, Any]
) -> str:
    """One table per metric (:func:`metric_table`), after a line naming the convention, threshold and perturbations."""
    sections = [
        f"Robustness on the {context['split']} split (%, mean over images; metric convention {context['convention']}, "
        f"pixel threshold {THRESHOLD}). Perturbations: "
        + "; ".join(f"{name}: {group[0].spec.description}" for name, group in groups.items())
        + "."
    ]
    for metric in reported(clean):
        sections.append(f"### {metric_label(metric)}\n\n" + metric_table(clean, perturbed, groups, metric))
    return "\n\n".join(sections)


def metric_table(
    clean: Scores, perturbed: Mapping[str, Scores], groups: Mapping[str, list[Perturbation]], metric: str
) -> str:
    """A Markdown table of one metric: rows the subsets, columns clean then every perturbation, mildest first."""
    columns = [p for group in groups.values() for p in group]
    header = ["subset", "clean", *(p.text for p in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in clean:
        values = [clean[name][metric], *(perturbed[p.text][name][metric] for p in columns)]
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in values) + " |")
    return "\n".join(lines)


def robustness_figures(
    out_dir: Path,
    clean: Scores,
    perturbed: Mapping[str, Scores],
    groups: Mapping[str, list[Perturbation]],
    context: Mapping[str, Any],
    trained: Mapping[str, Any] | None = None,
) -> list[Path]:
    """``robustness_<metric>.png``: a panel per perturbation, strength on x (clean first), a line per subset
    (:func:`robustness_lines`), under :func:`robustness_caption`."""
    paths = []
    for metric in reported(clean):
        lines = robustness_lines(clean, perturbed, groups, metric, trained)
        figure = strength_panels(groups, lines, metric, robustness_caption(context))
        paths.append(save(figure, out_dir / f"robustness_{metric}.png"))
    return paths


def robustness_caption(context: Mapping[str, Any]) -> str:
    """What produced a robustness figure: the model, the split and data folder (its name, not its machine path),
    the metric convention and the pixel threshold."""
    return (
        f"{context.get('described', '')}; {context['split']} split of {root_name(str(context.get('data', '')))}; "
        f"metric convention {context['convention']}, pixel threshold {THRESHOLD}."
    )


def robustness_lines(
    clean: Scores,
    perturbed: Mapping[str, Scores],
    groups: Mapping[str, list[Perturbation]],
    metric: str,
    trained: Mapping[str, Any] | None = None,
) -> list[Line]:
    """One line of `metric` per subset; with `trained` (the model's split and subset) each legend names the
    subset's role (in-domain / out-of-domain, held out / seen) and the training (or held-out) subset is wider."""
    split, subset = (trained or {}).get("split"), (trained or {}).get("subset")
    return [
        Line(
            f"{name} ({subset_role(split, subset, name)})" if split and subset else name,
            name,
            "-",
            {
                kind: [clean[name][metric], *(perturbed[p.text][name][metric] for p in group)]
                for kind, group in groups.items()
            },
            width=3.0 if name == subset else 1.5,
        )
        for name in clean
    ]


def _fmt(value: float | None) -> str:
    return "—" if value is None or value != value else f"{value:.2f}"
