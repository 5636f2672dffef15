"""MILANNOTATIONS (ALGORITHM.md, Evaluation protocols): human descriptions of ResNet-152
units, three per unit, in a ``layer,unit,summary`` CSV.

A description's score is its mean cosine similarity to the unit's annotations, averaged
over all units and over *reliable* units, per layer (the paper reports layers 1-4
separately). The set is noisy: a constant generic label beats every method in the paper, so
that baseline is always computed beside a method's score.

A unit is reliable when two of its annotations agree: their cosine similarity exceeds a
threshold. Cosines are not comparable across text encoders (on the 200 units below, 0.81
marks 103 reliable in CLIP space and 3 in MiniLM space), so the threshold is per encoder
(:data:`RELIABLE_THRESHOLDS`):

- ``clip`` / ``hf_clip`` (CLIP ViT-B/16): 0.81, the paper's value. On the 200 units DnD
  published for ResNet-152 layers 1-4 (50 per layer), the paper's rule marks 103 reliable.
- ``minilm`` (all-MiniLM-L6-v2): 0.41, calibrated by rank matching (CLIP cannot be run
  here): on those same 200 units it marks as many reliable as 0.81 does in CLIP space.
  MiniLM's best-pair similarity exceeds 0.4102 for exactly 103 of them and 0.41 for 104;
  we keep two decimals, as the paper does. The counts per layer and threshold are in
  ``results/milannotations_reliability_minilm.md`` (``dnd tables --only
  milannotations_reliability_minilm``). Equal counts do not make equal sets: the two
  encoders rank annotation pairs differently.

Any other encoder has no calibrated threshold: its reliable units are reported as not
determined, never guessed, unless the caller passes a threshold.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from dnd.evaluation.embedders import TextEmbedder
from dnd.evaluation.labels import LabelFileError, find_columns, read_csv_rows
from dnd.evaluation.similarity import embed_unique
from dnd.metrics import cosine_matrix

# Text embedder name -> cosine above which two annotations of a unit agree (module docstring).
RELIABLE_THRESHOLDS: Mapping[str, float] = MappingProxyType(
    {"clip": 0.81, "hf_clip": 0.81, "minilm": 0.41})
_THRESHOLD_SOURCE = {
    "clip": "the paper's CLIP threshold",
    "hf_clip": "the paper's CLIP threshold",
    "minilm": "MiniLM's threshold, rank-matched to the paper's CLIP 0.81: on DnD's 200 "
              "published ResNet-152 units it marks 104 reliable, CLIP at 0.81 103",
}
GENERIC_LABELS = ("object", "objects", "texture", "pattern", "animal", "scene", "shape",
                  "color", "background")
NO_RELIABLE_UNIT = "no reliable unit"
NOT_DETERMINED = "not determined"


@dataclass(frozen=True)
class UnitAnnotations:
    """The human annotations of one unit."""

    layer: str
    unit: int
    summaries: tuple[str, ...]


@dataclass(frozen=True)
class MilanScore:
    """One method's (or the baseline's) score: mean over all evaluated units and over the
    reliable ones (None when no unit is reliable or reliability is not determined);
    ``per_unit`` [n_units] in the order of :class:`MilanResult` ``units``."""

    name: str
    per_unit: np.ndarray
    mean_all: float
    mean_reliable: float | None


@dataclass(frozen=True)
class MilanResult:
    """Scores of a method and of the constant baseline on the same units.

    ``units``: (layer, unit) pairs that have both a description and annotations;
    ``reliable`` [n_units] bool, or None when the embedder has no calibrated threshold and
    none was given (then ``threshold`` is None too); ``rule``: one sentence saying which
    threshold was used and where it comes from; ``n_unlabelled``: annotated units with no
    description.
    """

    units: tuple[tuple[str, int], ...]
    reliable: np.ndarray | None
    threshold: float | None
    rule: str
    method: MilanScore
    baseline: MilanScore
    n_unlabelled: int

    @property
    def layers(self) -> list[str]:
        """Layers of the evaluated units, in natural order (layer2 before layer10)."""
        return sorted({layer for layer, _ in self.units}, key=layer_sort_key)


def layer_sort_key(layer: str) -> tuple:
    """Natural sort key of a layer name: ``conv1 < layer1 < layer2 < layer10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", layer))


def read_annotations(path: str | Path) -> list[UnitAnnotations]:
    """Read a ``layer,unit,summary`` CSV (one annotation per row; header case-insensitive,
    UTF-8 with or without BOM; extra columns ignored), grouped by unit in order of first
    appearance. Empty summaries are dropped."""
    path = Path(path)
    rows = read_csv_rows(path, "annotation file")
    cols = find_columns(path, rows[0], expected="'layer,unit,summary'")
    if cols.layer is None:
        raise LabelFileError(f"{path}: no layer column in {','.join(cols.names)!r}; "
                             f"expected layer,unit,summary")
    groups: dict[tuple[str, int], list[str]] = {}
    for line, row in enumerate(rows[1:], 2):
        if not any(c.strip() for c in row):
            continue
        cell = row[cols.unit].strip() if cols.unit < len(row) else ""
        try:
            key = (row[cols.layer].strip(), int(cell))
        except (ValueError, IndexError):
            raise LabelFileError(f"{path}, row {line}: bad unit {cell!r}") from None
        text = row[cols.labels[0]].strip() if cols.labels[0] < len(row) else ""
        groups.setdefault(key, [])
        if text:
            groups[key].append(text)
    return [UnitAnnotations(layer, unit, tuple(s)) for (layer, unit), s in groups.items()]


def reliable_threshold(embedder: str) -> float | None:
    """The calibrated reliability threshold of a text embedder by name, or None."""
    return RELIABLE_THRESHOLDS.get(embedder)


def _rule(embedder: str, threshold: float | None, given: bool) -> str:
    if threshold is None:
        known = ", ".join(f"{k} {v}" for k, v in RELIABLE_THRESHOLDS.items())
        return (f"Reliable units {NOT_DETERMINED}: no calibrated threshold for text embedder "
                f"{embedder!r} (calibrated: {known}); pass a threshold (--threshold) to set "
                f"one.")
    source = "given by the caller" if given else _THRESHOLD_SOURCE.get(embedder, "calibrated")
    return (f"Reliable units: two annotations with {embedder} cosine similarity > "
            f"{threshold:g} ({source}).")


def best_pair_similarity(annotations: Sequence[UnitAnnotations],
                         embedder: TextEmbedder) -> np.ndarray:
    """float [n_units]: the highest cosine similarity between two annotations of each unit
    (-inf for a unit with fewer than two annotations, which is never reliable)."""
    rows = embed_unique(embedder, [s for a in annotations for s in a.summaries])
    return np.array([_best_pair(a.summaries, rows) for a in annotations])


def _best_pair(summaries: Sequence[str], rows: Mapping[str, np.ndarray]) -> float:
    if len(summaries) < 2:
        return float("-inf")
    emb = np.stack([rows[s] for s in summaries])
    return float(cosine_matrix(emb, emb)[np.triu_indices(len(summaries), k=1)].max())


def reliable_mask(annotations: Sequence[UnitAnnotations], embedder: TextEmbedder,
                  threshold: float | None = None) -> np.ndarray:
    """bool [n_units]: True where some pair of the unit's annotations has cosine similarity
    above ``threshold`` (default: the embedder's calibrated one; ValueError when it has
    none)."""
    if threshold is None:
        threshold = reliable_threshold(embedder.name)
        if threshold is None:
            raise ValueError(_rule(embedder.name, None, False))
    return best_pair_similarity(annotations, embedder) > threshold


def matching_threshold(best_pair: np.ndarray, n_reliable: int) -> float:
    """The threshold that marks exactly ``n_reliable`` units reliable: midway between the
    ``n_reliable``-th and the next highest of ``best_pair`` [n_units] (rank matching; used to
    derive :data:`RELIABLE_THRESHOLDS` for a new encoder)."""
    s = np.sort(np.asarray(best_pair, dtype=float))[::-1]
    if not 0 < n_reliable < len(s):
        raise ValueError(f"n_reliable must be in 1..{len(s) - 1}, got {n_reliable}")
    if s[n_reliable - 1] == s[n_reliable]:
        raise ValueError(f"units {n_reliable} and {n_reliable + 1} tie at {s[n_reliable]:.4f}: "
                         f"no threshold separates them")
    return float((s[n_reliable - 1] + s[n_reliable]) / 2)


def milan_scores(descriptions: Mapping[tuple[str, int], str],
                 annotations: Sequence[UnitAnnotations], embedder: TextEmbedder, *,
                 name: str = "method", threshold: float | None = None,
                 generic_labels: Sequence[str] = GENERIC_LABELS) -> MilanResult:
    """Score ``descriptions`` ((layer, unit) -> text) against ``annotations``.

    ``threshold``: reliability threshold; None takes the embedder's calibrated one
    (:data:`RELIABLE_THRESHOLDS`), and an embedder without one gets no reliable units
    (``reliable`` None, said in ``rule``). The baseline is the one label of
    ``generic_labels`` with the highest mean score over the evaluated units (pass a single
    label for a fixed constant). Picking it on the evaluation units flatters the baseline,
    which is the point: a method should beat even the best constant. Units without a
    description are left out of both scores.
    """
    if not generic_labels:
        raise ValueError("need at least one generic label for the constant baseline")
    given = threshold is not None
    if threshold is None:
        threshold = reliable_threshold(embedder.name)
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
    reliable = (None if threshold is None else
                np.array([_best_pair(a.summaries, rows) > threshold for a in kept], dtype=bool))

    def per_unit(text_of_unit: Sequence[str]) -> np.ndarray:
        return np.array([cosine_matrix(rows[t][None], np.stack([rows[s] for s in a.summaries]))
                         .mean() for t, a in zip(text_of_unit, kept)])

    def score(label: str, values: np.ndarray) -> MilanScore:
        rel = (float(values[reliable].mean()) if reliable is not None and reliable.any()
               else None)
        return MilanScore(label, values, float(values.mean()), rel)

    method = score(name, per_unit(desc))
    candidates = [per_unit([g] * len(kept)) for g in generic_labels]
    best = int(np.argmax([c.mean() for c in candidates]))
    baseline = score(f'constant "{generic_labels[best]}"', candidates[best])
    return MilanResult(tuple((a.layer, a.unit) for a in kept), reliable, threshold,
                       _rule(embedder.name, threshold, given), method, baseline,
                       len(annotated) - len(kept))


MILAN_TABLE_HEADER = ("layer", "description", "all units", "reliable units", "units",
                      "reliable")


def milan_table_rows(results: Sequence[MilanResult], all_label: str = "all layers"
                     ) -> list[list[str]]:
    """Rows of :data:`MILAN_TABLE_HEADER`: per layer, then over all layers, each result's
    method and then the constant baseline (of the first result: all ``results`` must be on
    the same units, e.g. several methods scored with one embedder).

    Cells never hold ``nan``: a layer without reliable unit says "no reliable unit", and an
    embedder without a threshold "not determined".
    """
    first = results[0]
    if any(r.units != first.units for r in results[1:]):
        raise ValueError("results to tabulate together must cover the same units")
    layer_of = np.array([layer for layer, _ in first.units])
    groups = [(layer, layer_of == layer) for layer in first.layers]
    if len(groups) > 1:
        groups.append((all_label, np.ones(len(first.units), dtype=bool)))
    out = []
    for layer, sel in groups:
        if first.reliable is None:
            rel, n_rel = None, NOT_DETERMINED
        else:
            rel = sel & first.reliable
            n_rel = str(int(rel.sum()))
        for s in [*(r.method for r in results), first.baseline]:
            if rel is None:
                rel_cell = NOT_DETERMINED
            else:
                rel_cell = f"{s.per_unit[rel].mean():.4f}" if rel.any() else NO_RELIABLE_UNIT
            out.append([layer, s.name, f"{s.per_unit[sel].mean():.4f}", rel_cell,
                        str(int(sel.sum())), n_rel])
    return out
