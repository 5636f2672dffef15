"""Classifier search for unseen classes (ALGORITHM.md, Evaluation protocols).

For each class (e.g. of CIFAR-10), the unit whose description is closest to the class name
in a text-embedding space (mean of several embedders' cosine matrices) becomes a one-vs-rest
detector: its summary activation scores every probe image, and the class's AUROC is
averaged over units tied for closest. Mean over classes by
:func:`dnd.metrics.classifier_search_auroc`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dnd.evaluation.embedders import TextEmbedder, embedder_needs
from dnd.evaluation.labels import UnitLabels
from dnd.evaluation.similarity import ensemble_similarity
from dnd.metrics import classifier_search_auroc

if TYPE_CHECKING:
    from dnd.preflight import Need

# Similarities within this of the best count as tied: exact duplicates of a description are
# embedded once and tie exactly, this only absorbs float noise of the ensemble mean.
# Where the evaluation suites keep activations between runs (`dnd evaluate`, `dnd tables`).
DEFAULT_CACHE_DIR = Path("runs") / "eval-cache"
TIE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ClassifierSearchResult:
    """Per class: matched unit ids, their descriptions, the similarity of the match and
    the AUROC [n_classes]; ``mean_auroc`` over classes."""

    class_names: tuple[str, ...]
    units: tuple[tuple[int, ...], ...]
    descriptions: tuple[tuple[str, ...], ...]
    similarity: np.ndarray
    per_class: np.ndarray
    mean_auroc: float
    n_images: int


def match_units(descriptions: Sequence[str], class_names: Sequence[str],
                embedders: Sequence[TextEmbedder]) -> tuple[list[list[int]], np.ndarray]:
    """For each class, the indices of the descriptions closest to its name (all tied ones)
    and that best similarity [n_classes]."""
    sims = ensemble_similarity(embedders, list(class_names), list(descriptions))
    best = sims.max(axis=1)
    matches = [np.flatnonzero(row >= b - TIE_TOLERANCE).tolist() for row, b in zip(sims, best)]
    return matches, best


def classifier_search(labels: Sequence[UnitLabels], class_names: Sequence[str],
                      unit_acts: np.ndarray, class_labels: np.ndarray | Sequence[int],
                      embedders: Sequence[TextEmbedder]) -> ClassifierSearchResult:
    """Run the protocol on precomputed activations.

    labels: described units (``unit`` indexes the columns of ``unit_acts``);
    unit_acts [n_images, n_units]: summary activations; class_labels [n_images]: ids into
    ``class_names``.
    """
    acts = np.asarray(unit_acts)
    if not labels:
        raise ValueError("no described unit")
    bad = [u.unit for u in labels if u.unit >= acts.shape[1]]
    if bad:
        raise ValueError(f"unit(s) {bad[:5]} out of range: the layer has {acts.shape[1]} units")
    matches, best = match_units([u.description for u in labels], class_names, embedders)
    units = [[labels[k].unit for k in m] for m in matches]
    per_class, mean = classifier_search_auroc(acts, class_labels, units)
    return ClassifierSearchResult(
        tuple(class_names), tuple(tuple(u) for u in units),
        tuple(tuple(labels[k].description for k in m) for m in matches), best, per_class,
        mean, int(acts.shape[0]))


def classifier_search_needs(model: str, weights: str, embedders: Sequence[str]) -> list[Need]:
    """The models :func:`run_classifier_search` loads (target weights, text embedders by
    name), for :func:`dnd.preflight.check` before any is loaded."""
    from dnd.target import target_needs

    return target_needs(model, weights) + embedder_needs(embedders)


def run_classifier_search(labels: Sequence[UnitLabels], model: str, layer: str,
                          probe: str | Sequence[str], embedders: Sequence[TextEmbedder],
                          cache_dir: str | Path, *, weights: str = "DEFAULT",
                          summary: str = "mean", batch_size: int = 64, workers: int = 0,
                          progress: bool = True) -> ClassifierSearchResult:
    """Load ``model``, compute the ``layer``'s summary activations on the labelled probing
    set ``probe`` (cached under ``cache_dir``), then :func:`classifier_search`.

    The probing set must carry class labels and names (CIFAR, or a folder with class
    subfolders). Images that failed to load are left out.
    """
    from dnd.activations import compute_activations
    from dnd.preflight import check
    from dnd.probe import open_probe
    from dnd.target import load_target, target_needs

    check(target_needs(model, weights))  # weights that are missing here fail in seconds
    probe_set = open_probe(probe)
    if probe_set.labels is None or probe_set.class_names is None:
        raise ValueError(f"probing set {probe_set.name!r} has no class labels; classifier "
                         f"search needs e.g. cifar10:PATH or a folder with class subfolders")
    target = load_target(model, weights=weights)
    acts = compute_activations(target, probe_set, [layer], cache_dir, summary=summary,
                               batch_size=batch_size, workers=workers,
                               progress=progress)[layer]
    valid = np.asarray(acts.valid)
    values = np.asarray(acts.values, dtype=np.float32)[valid]
    y = np.asarray(probe_set.labels)[valid]
    return classifier_search(labels, probe_set.class_names, values, y, embedders)
