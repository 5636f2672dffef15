"""Numeric metrics for the evaluation suites (pure numpy; callers pass arrays).

- Ranking quality of a score against binary labels: ``auroc`` and ``auprc``.
- Neuron_Eval-style agreement between one unit's activations and one concept's labels:
  ``concept_match_scores`` (Pearson, cosine, AUPRC, F1 / IoU at a top-alpha threshold).
- DnD's classifier-search protocol on CIFAR: ``classifier_search_auroc``.
- ``bootstrap_ci`` for confidence intervals and ``cosine_matrix`` for embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import rankdata

from dnd.registry import unknown_name_message

# Top 0.5% of the probe set counts as "the unit fires": 250 images of ImageNet val, 50 of
# CIFAR val. Neuron_Eval uses fractions of this order for its threshold-based metrics.
DEFAULT_ALPHA = 0.005

# Caps the bootstrap index matrix at about 8 MB (int64) per chunk whatever the sample size.
_BOOT_CHUNK_ELEMENTS = 1 << 20


def _binary(labels: np.ndarray | Sequence, n: int) -> np.ndarray:
    """``labels`` as a bool vector of length ``n``; only 0/1 (or bool) values are accepted."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.size != n:
        raise ValueError(f"labels must have shape ({n},), got {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be binary (0/1 or bool)")
    return y.astype(bool)


def _scores_1d(scores: np.ndarray | Sequence) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return s


def _both_classes(y: np.ndarray) -> tuple[int, int]:
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("need at least one positive and one negative label")
    return n_pos, n_neg


def auroc(scores: np.ndarray | Sequence, labels: np.ndarray | Sequence) -> float:
    """Area under the ROC curve of ``scores`` [n] for binary ``labels`` [n].

    Computed as the Mann-Whitney statistic: the fraction of (positive, negative) pairs in
    which the positive scores higher, a tied pair counting 1/2 (average ranks give this
    exactly). Needs both classes present.
    """
    s = _scores_1d(scores)
    y = _binary(labels, s.size)
    n_pos, n_neg = _both_classes(y)
    rank_sum = rankdata(s, method="average")[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(scores: np.ndarray | Sequence, labels: np.ndarray | Sequence) -> float:
    """Average precision of ``scores`` [n] for binary ``labels`` [n].

    AP = sum over thresholds of (recall gain) x precision, one threshold per distinct
    score, so tied scores enter together and the result does not depend on image order
    (the definition of ``sklearn.metrics.average_precision_score``). Needs a positive.
    """
    s = _scores_1d(scores)
    y = _binary(labels, s.size)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("average precision needs at least one positive label")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    # Last position of each run of equal scores: the cut points of distinct thresholds.
    cuts = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[cuts]
    precision = tp / (cuts + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def pearson(acts: np.ndarray | Sequence, labels: np.ndarray | Sequence) -> float:
    """Pearson correlation of activations [n] with binary labels [n]; nan if either is
    constant (the correlation is undefined, and a silent 0 would hide a dead unit)."""
    a = _scores_1d(acts)
    y = _binary(labels, a.size).astype(np.float64)
    a, y = a - a.mean(), y - y.mean()
    denom = np.linalg.norm(a) * np.linalg.norm(y)
    return float(a @ y / denom) if denom > 0 else float("nan")


def cosine(acts: np.ndarray | Sequence, labels: np.ndarray | Sequence) -> float:
    """Cosine similarity of activations [n] with binary labels [n] (uncentred); nan if
    either vector is all zeros."""
    a = _scores_1d(acts)
    y = _binary(labels, a.size).astype(np.float64)
    denom = np.linalg.norm(a) * np.linalg.norm(y)
    return float(a @ y / denom) if denom > 0 else float("nan")


def top_alpha_mask(acts: np.ndarray | Sequence, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Bool mask [n] of the unit's top ``alpha`` fraction of images.

    m = round(alpha * n) images (at least 1). Images tied with the m-th highest activation
    are all included, so the mask never depends on image order (it may exceed m).
    """
    a = _scores_1d(acts)
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    m = max(1, round(alpha * a.size))
    threshold = np.partition(a, a.size - m)[a.size - m]
    return a >= threshold


def f1_at_top(
    acts: np.ndarray | Sequence, labels: np.ndarray | Sequence, alpha: float = DEFAULT_ALPHA
) -> float:
    """F1 of "in the unit's top-alpha images" (see ``top_alpha_mask``) vs labels [n]."""
    pred = top_alpha_mask(acts, alpha)
    y = _binary(labels, pred.size)
    return float(2 * np.sum(pred & y) / (pred.sum() + y.sum()))


def iou_at_top(
    acts: np.ndarray | Sequence, labels: np.ndarray | Sequence, alpha: float = DEFAULT_ALPHA
) -> float:
    """IoU of the unit's top-alpha image set (see ``top_alpha_mask``) with the positives."""
    pred = top_alpha_mask(acts, alpha)
    y = _binary(labels, pred.size)
    return float(np.sum(pred & y) / np.sum(pred | y))


# name -> fn(acts [n], labels [n], alpha). Only the threshold metrics use alpha.
CONCEPT_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, float], float]] = {
    "pearson": lambda a, y, alpha: pearson(a, y),
    "cosine": lambda a, y, alpha: cosine(a, y),
    "auprc": lambda a, y, alpha: auprc(a, y),
    "f1": f1_at_top,
    "iou": iou_at_top,
}


def concept_match_scores(
    acts: np.ndarray | Sequence,
    labels: np.ndarray | Sequence,
    metric: str | Sequence[str] | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> dict[str, float]:
    """How well a concept's binary labels [n] match one unit's activations [n].

    ``metric``: one name of ``CONCEPT_METRICS``, a list of names, or None for all of them.
    Returns {name: value}, higher = better match, in the order asked for. ``alpha`` is the
    top fraction used by "f1" and "iou".
    """
    if metric is None:
        names = list(CONCEPT_METRICS)
    elif isinstance(metric, str):
        names = [metric]
    else:
        names = list(metric)
    for name in names:
        if name not in CONCEPT_METRICS:
            raise KeyError(unknown_name_message("concept metric", name, list(CONCEPT_METRICS)))
    a = _scores_1d(acts)
    y = _binary(labels, a.size)
    return {name: CONCEPT_METRICS[name](a, y, alpha) for name in names}


def classifier_search_auroc(
    unit_acts: np.ndarray,
    class_labels: np.ndarray | Sequence,
    class_to_units: Sequence[Sequence[int]],
) -> tuple[np.ndarray, float]:
    """DnD's classifier search: can the unit described as class c detect class c?

    unit_acts [n_images, n_units]: summary activations; class_labels [n_images]: integer
    class ids 0..n_classes-1; class_to_units[c]: the units whose description is closest to
    class c's name (several when tied). Each unit's activation is a one-vs-rest score for
    its class; a class's AUROC is the mean over its tied units.
    Returns (per-class AUROC [n_classes], mean over classes).
    """
    acts = np.asarray(unit_acts, dtype=np.float64)
    y = np.asarray(class_labels)
    if acts.ndim != 2 or y.shape != (acts.shape[0],):
        raise ValueError(
            f"need unit_acts [n_images, n_units] and class_labels [n_images], "
            f"got {acts.shape} and {y.shape}"
        )
    per_class = np.empty(len(class_to_units))
    for c, units in enumerate(class_to_units):
        if len(units) == 0:
            raise ValueError(f"class {c} has no matched unit")
        per_class[c] = np.mean([auroc(acts[:, u], y == c) for u in units])
    return per_class, float(per_class.mean())


def bootstrap_ci(
    values: np.ndarray | Sequence, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Percentile bootstrap CI of the mean of ``values`` [n].

    Resamples n values with replacement ``n_boot`` times (numpy Generator seeded with
    ``seed``) and returns (sample mean, lower, upper) with the interval covering ``level``.
    """
    v = _scores_1d(values)
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    step = max(1, _BOOT_CHUNK_ELEMENTS // v.size)
    for start in range(0, n_boot, step):
        stop = min(start + step, n_boot)
        means[start:stop] = v[rng.integers(0, v.size, size=(stop - start, v.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(v.mean()), float(low), float(high)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of a [n, d] with every row of b [m, d] -> [n, m].

    Zero rows raise: their similarity is undefined and usually means a failed embedding.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need a [n, d] and b [m, d], got {a.shape} and {b.shape}")
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    if (na == 0).any() or (nb == 0).any():
        raise ValueError("cosine similarity of a zero vector is undefined")
    return (a / na) @ (b / nb).T
