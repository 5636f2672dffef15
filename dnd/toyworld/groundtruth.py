"""Ground-truth concepts of units, measured against the toy world's exact annotations.

Two metrics, both of which drop when half of a concept's positive labels are removed or
when as many random false positives are added (the sanity checks of Neuron_Eval; tested):

- summary activations [n_images, n_units]: average precision (area under the
  precision-recall curve) of the unit's activation as a detector of "the concept is in the
  image", for every concept;
- spatial maps [n_images, n_units, h, w]: Network-Dissection IoU: the maps are upsampled to
  the image size, binarised at the unit's top-``alpha`` quantile over all images, and
  compared with the concept's pixel masks summed over the data set.

A unit's ground truth is its best-scoring concept; a unit whose best score is below the
metric's threshold has no clear concept and is flagged ``clear=False``.

A label is judged against a concept by :func:`mentions`: a keyword match with synonyms
("crimson disc" names "red circle").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from dnd.toyworld.render import Scene
from dnd.toyworld.target import CLASS_NAMES
from dnd.toyworld.world import SYNONYMS, concept_names


def mentions(label: str, concept: str) -> bool:
    """True if ``label`` names every word of ``concept`` (synonyms allowed, whole words)."""
    text = f" {' '.join(re.findall(r'[a-z]+', label.lower()))} "
    for word in concept.split():
        names = SYNONYMS.get(word, [word])
        if not any(f" {n} " in text for n in names):
            return False
    return True


MIN_AP = 0.5  # AP of a clear detector (chance level is the concept's prevalence)
MIN_IOU = 0.04  # Network Dissection's threshold for a unit to count as a detector
MIN_POSITIVES = 5  # concepts present in fewer images are not scored (AP would be noise)


@dataclass(frozen=True)
class UnitTruth:
    """A unit's best-matching concept. ``score`` is AP (summary acts) or IoU (maps);
    ``clear`` is False when it is below the metric's threshold."""

    unit: int
    concept: str
    score: float
    clear: bool


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve of ``scores`` [n] for bool ``labels`` [n].

    Tied scores are one threshold (as in scikit-learn); NaN when there is no positive.
    """
    labels = np.asarray(labels, dtype=bool)
    if not labels.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ranked, hits = np.asarray(scores)[order], labels[order]
    tp = np.cumsum(hits)
    fp = np.cumsum(~hits)
    last_of_tie = np.r_[np.nonzero(np.diff(ranked))[0], len(ranked) - 1]
    tp, fp = tp[last_of_tie], fp[last_of_tie]
    recall_gain = np.diff(np.r_[0, tp]) / tp[-1]
    return float(np.sum(recall_gain * tp / (tp + fp)))


def dissection_iou(active: np.ndarray, concept: np.ndarray) -> float:
    """IoU of two bool pixel sets of the same shape (e.g. [n, H, W]) summed over images."""
    union = np.count_nonzero(active | concept)
    return float(np.count_nonzero(active & concept) / union) if union else 0.0


def image_labels(scenes: Sequence[Scene]) -> tuple[list[str], np.ndarray]:
    """Concept names and bool presence [n_images, n_concepts]: every mask concept (shapes,
    colours, background kinds, text) plus every "colour shape" object name."""
    names = [*concept_names(), *CLASS_NAMES]
    index = {name: i for i, name in enumerate(names)}
    labels = np.zeros((len(scenes), len(names)), dtype=bool)
    for row, scene in enumerate(scenes):
        for name, mask in scene.masks.items():
            labels[row, index[name]] = mask.any()
        for obj in scene.description.objects:
            labels[row, index[obj.label]] = True
    return names, labels


def _best(unit: int, names: list[str], scores: np.ndarray, threshold: float) -> UnitTruth:
    best = int(np.nanargmax(scores))
    score = float(scores[best])
    return UnitTruth(unit, names[best], score, score >= threshold)


def summary_ground_truth(
    acts: np.ndarray, scenes: Sequence[Scene], min_ap: float = MIN_AP,
    min_positives: int = MIN_POSITIVES,
) -> list[UnitTruth]:
    """Best concept by average precision for each unit of ``acts`` [n_images, n_units]."""
    names, labels = image_labels(scenes)
    keep = labels.sum(0) >= min_positives
    names, labels = [n for n, k in zip(names, keep, strict=True) if k], labels[:, keep]
    truths = []
    for unit in range(acts.shape[1]):
        scores = np.array([average_precision(acts[:, unit], column) for column in labels.T])
        truths.append(_best(unit, names, scores, min_ap))
    return truths


def spatial_ground_truth(
    maps: np.ndarray, scenes: Sequence[Scene], alpha: float = 0.005, min_iou: float = MIN_IOU,
) -> list[UnitTruth]:
    """Best concept by top-``alpha`` IoU for each unit of ``maps`` [n_images, n_units, h, w]."""
    names = concept_names()
    masks = np.stack([np.stack([scene.masks[name] for name in names]) for scene in scenes], 1)
    size = masks.shape[-2:]
    truths = []
    for unit in range(maps.shape[1]):
        unit_maps = torch.as_tensor(maps[:, unit : unit + 1], dtype=torch.float32)
        up = F.interpolate(unit_maps, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
        active = up > np.quantile(up, 1.0 - alpha)
        scores = np.array([dissection_iou(active, masks[c]) for c in range(len(names))])
        truths.append(_best(unit, names, scores, min_iou))
    return truths


def unit_ground_truth(acts: np.ndarray, scenes: Sequence[Scene], **kwargs) -> list[UnitTruth]:
    """Ground truth of every unit: ``acts`` [n_images, n_units] (AP, see
    ``summary_ground_truth``) or [n_images, n_units, h, w] (IoU, ``spatial_ground_truth``)."""
    acts = np.asarray(acts)
    if len(acts) != len(scenes):
        raise ValueError(f"{len(acts)} activation rows for {len(scenes)} scenes")
    if acts.ndim == 2:
        return summary_ground_truth(acts, scenes, **kwargs)
    if acts.ndim == 4:
        return spatial_ground_truth(acts, scenes, **kwargs)
    raise ValueError(f"acts must be [n, units] or [n, units, h, w], got shape {acts.shape}")


def fc_ground_truth(
    logits: np.ndarray, scenes: Sequence[Scene], min_ap: float = MIN_AP
) -> list[UnitTruth]:
    """Final-layer ground truth: unit i is ``CLASS_NAMES[i]`` by definition; ``score`` is the
    AP of its logit [n_images] for "the main object is class i" (NaN if never present)."""
    main = np.array([CLASS_NAMES.index(s.description.main_object.label) for s in scenes])
    truths = []
    for unit, name in enumerate(CLASS_NAMES):
        score = average_precision(np.asarray(logits)[:, unit], main == unit)
        truths.append(UnitTruth(unit, name, score, bool(score >= min_ap)))
    return truths
