"""MILANNOTATIONS (ALGORITHM.md, Evaluation protocols): human descriptions of ResNet-152
units, three per unit, in a ``layer,unit,summary`` CSV.

A unit is *reliable* when at least two of its annotations agree (pairwise cosine similarity
above a threshold, 0.81 in CLIP space in the paper). A description's score is its mean
similarity to the unit's annotations, averaged over all units and over reliable units. The
set is noisy: a constant generic label beats every method in the paper, so that baseline is
always computed beside a method's score.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dnd.evaluation.embedders import TextEmbedder
from dnd.evaluation.labels import LabelFileError
from dnd.evaluation.similarity import embed_unique
from dnd.metrics import cosine_matrix

RELIABLE_THRESHOLD = 0.81
GENERIC_LABELS = ("object", "objects", "texture", "pattern", "animal", "scene", "shape",
                  "color", "background")


@dataclass(frozen=True)
class UnitAnnotations:
    """The human annotations of one unit."""

    layer: str
    unit: int
    summaries: tuple[str, ...]


@dataclass(frozen=True)
class MilanScore:
    """One method's (or the baseline's) score: mean over all evaluated units and over the
    reliable ones; ``per_unit`` [n_units] in the order of :class:`MilanResult` ``units``."""

    name: str
    per_unit: np.ndarray
    mean_all: float
    mean_reliable: float


@dataclass(frozen=True)
class MilanResult:
    """Scores of a method and of the constant baseline on the same units.

    ``units``: (layer, unit) pairs that have both a description and annotations;
    ``reliable`` [n_units] bool; ``n_unlabelled``: annotated units with no description.
    """

    units: tuple[tuple[str, int], ...]
    reliable: np.ndarray
    method: MilanScore
    baseline: MilanScore
    n_unlabelled: int


def read_annotations(path: str | Path) -> list[UnitAnnotations]:
    """Read a ``layer,unit,summary`` CSV (one annotation per row; extra columns ignored),
    grouped by unit in order of first appearance. Empty summaries are dropped."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"annotation file not found: {path}")
    groups: dict[tuple[str, int], list[str]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"layer", "unit", "summary"} - set(reader.fieldnames or [])
        if missing:
            raise LabelFileError(f"{path}: missing column(s) {', '.join(sorted(missing))}; "
                                 f"expected layer,unit,summary")
        for line, row in enumerate(reader, 2):
            try:
                key = (row["layer"].strip(), int(row["unit"]))
            except (ValueError, AttributeError):
                raise LabelFileError(f"{path}, row {line}: bad unit {row['unit']!r}") from None
            text = (row["summary"] or "").strip()
            groups.setdefault(key, [])
            if text:
                groups[key].append(text)
    return [UnitAnnotations(layer, unit, tuple(s)) for (layer, unit), s in groups.items()]


def reliable_mask(annotations: Sequence[UnitAnnotations], embedder: TextEmbedder,
                  threshold: float = RELIABLE_THRESHOLD) -> np.ndarray:
    """bool [n_units]: True where some pair of the unit's annotations has cosine similarity
    above ``threshold`` (i.e. at least two annotations agree)."""
    rows = embed_unique(embedder, [s for a in annotations for s in a.summaries])
    return np.array([_agree(a.summaries, rows, threshold) for a in annotations], dtype=bool)


def _agree(summaries: Sequence[str], rows: Mapping[str, np.ndarray], threshold: float) -> bool:
    if len(summaries) < 2:
        return False
    emb = np.stack([rows[s] for s in summaries])
    sims = cosine_matrix(emb, emb)
    return bool((sims[np.triu_indices(len(summaries), k=1)] > threshold).any())


def milan_scores(descriptions: Mapping[tuple[str, int], str],
                 annotations: Sequence[UnitAnnotations], embedder: TextEmbedder, *,
                 name: str = "method", threshold: float = RELIABLE_THRESHOLD,
                 generic_labels: Sequence[str] = GENERIC_LABELS) -> MilanResult:
    """Score ``descriptions`` ((layer, unit) -> text) against ``annotations``.

    The baseline is the one label of ``generic_labels`` with the highest mean score over
    the evaluated units (pass a single label for a fixed constant). Picking it on the
    evaluation units flatters the baseline, which is the point: a method should beat even
    the best constant. Units without a description are left out of both scores.
    """
    if not generic_labels:
        raise ValueError("need at least one generic label for the constant baseline")
    annotated = [a for a in annotations if a.summaries]
    kept = [a for a in annotated if (a.layer, a.unit) in descriptions]
    if not kept:
        raise ValueError("no annotated unit has a description: check the layer names "
                         "(a labels.csv needs its layer given)")
    desc = [descriptions[(a.layer, a.unit)] for a in kept]
    # Units are scored one at a time: a full texts x annotations matrix of ResNet-152's
    # ~3,800 annotated units would take gigabytes.
    rows = embed_unique(embedder, [*desc, *generic_labels,
                                   *(s for a in kept for s in a.summaries)])
    reliable = np.array([_agree(a.summaries, rows, threshold) for a in kept], dtype=bool)

    def per_unit(text_of_unit: Sequence[str]) -> np.ndarray:
        return np.array([cosine_matrix(rows[t][None], np.stack([rows[s] for s in a.summaries]))
                         .mean() for t, a in zip(text_of_unit, kept)])

    def score(label: str, values: np.ndarray) -> MilanScore:
        rel = float(values[reliable].mean()) if reliable.any() else float("nan")
        return MilanScore(label, values, float(values.mean()), rel)

    method = score(name, per_unit(desc))
    candidates = [per_unit([g] * len(kept)) for g in generic_labels]
    best = int(np.argmax([c.mean() for c in candidates]))
    baseline = score(f'constant "{generic_labels[best]}"', candidates[best])
    return MilanResult(tuple((a.layer, a.unit) for a in kept), reliable, method, baseline,
                       len(annotated) - len(kept))
