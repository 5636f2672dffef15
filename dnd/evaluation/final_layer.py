"""Final-layer ground truth (ALGORITHM.md, Evaluation protocols): unit i of a classifier's
output layer should be described as class i. Score = cosine similarity of the description
with the class name, per text-embedding space, with its mean and a bootstrap 95% CI."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dnd.evaluation.embedders import TextEmbedder, embedder_needs
from dnd.evaluation.labels import UnitLabels
from dnd.evaluation.similarity import paired_similarity
from dnd.metrics import bootstrap_ci

if TYPE_CHECKING:
    from dnd.preflight import Need


@dataclass(frozen=True)
class SimilarityScore:
    """Per-unit similarities [n_units] in one embedding space, their mean and 95% CI."""

    embedder: str
    per_unit: np.ndarray
    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class FinalLayerResult:
    """Evaluated units (in input order), their descriptions and class names, one score per
    embedder."""

    units: tuple[int, ...]
    descriptions: tuple[str, ...]
    class_names: tuple[str, ...]
    scores: tuple[SimilarityScore, ...]


def final_layer_similarity(labels: Sequence[UnitLabels], class_names: Sequence[str],
                           embedders: Sequence[TextEmbedder], *, n_boot: int = 1000,
                           seed: int = 0) -> FinalLayerResult:
    """Score each unit's description (``labels[k].description``) against
    ``class_names[labels[k].unit]`` in every embedder's space.

    The CI is :func:`dnd.metrics.bootstrap_ci` over units (``n_boot`` resamples, ``seed``).
    Raises ValueError for a unit id with no class name.
    """
    if not labels:
        raise ValueError("no unit to evaluate: the label file is empty")
    bad = [u.unit for u in labels if u.unit >= len(class_names)]
    if bad:
        raise ValueError(f"unit(s) {bad[:5]} out of range: the layer has "
                         f"{len(class_names)} class names")
    desc = [u.description for u in labels]
    names = [class_names[u.unit] for u in labels]
    scores = []
    for emb in embedders:
        sims = paired_similarity(emb, desc, names)
        mean, low, high = bootstrap_ci(sims, n_boot=n_boot, seed=seed)
        scores.append(SimilarityScore(emb.name, sims, mean, low, high))
    return FinalLayerResult(tuple(u.unit for u in labels), tuple(desc), tuple(names),
                            tuple(scores))


def constant_labels(units: Sequence[int], text: str) -> list[UnitLabels]:
    """The same label ``text`` for every unit: the generic-label baseline."""
    return [UnitLabels(None, int(u), (text,)) for u in units]


def final_layer_needs(model: str | None, embedders: Sequence[str]) -> list[Need]:
    """The models the final-layer protocol loads: the text embedders by name, and for
    ``model``'s class names only its code (no weights), for :func:`dnd.preflight.check`."""
    from dnd.target import target_needs

    return (target_needs(model, "none") if model else []) + embedder_needs(embedders)


def model_class_names(model: str) -> list[str]:
    """The class names a model's output units stand for, from its registry adapter
    (ImageNet names for torchvision classifiers and efficientnet-lite0; no weights loaded)."""
    from dnd.target import load_target

    names = load_target(model, weights="none").class_names
    if not names:
        raise ValueError(f"model {model!r} carries no class names: pass them as a list "
                         f"(--class-names FILE)")
    return names
