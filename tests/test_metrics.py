"""Tests of the evaluation metrics: hand-worked values, brute-force cross-checks and the
Neuron_Eval sanity checks (missing labels and extra labels must both lower a score)."""

import math

import numpy as np
import pytest

from dnd.metrics import (
    CONCEPT_METRICS,
    DEFAULT_ALPHA,
    auprc,
    auroc,
    bootstrap_ci,
    classifier_search_auroc,
    concept_match_scores,
    cosine,
    cosine_matrix,
    f1_at_top,
    iou_at_top,
    pearson,
    top_alpha_mask,
)

# ---------------------------------------------------------------- AUROC / AUPRC


def test_auroc_perfect_reversed_and_tied():
    labels = [0, 0, 1, 1]
    assert auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], labels) == 0.5


def test_auroc_hand_worked_with_a_tie():
    # Positives 3, 2; negatives 2, 1. Pairs: 3>2, 3>1, 2=2 (counts 1/2), 2>1 -> 3.5/4.
    assert auroc([3, 2, 2, 1], [1, 1, 0, 0]) == 0.875


def brute_force_auroc(scores, labels):
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def test_auroc_matches_pairwise_count_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 8, size=60).astype(float)  # few values -> many ties
        labels = rng.integers(0, 2, size=60)
        assert auroc(scores, labels) == pytest.approx(brute_force_auroc(scores, labels), abs=1e-12)


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="one positive and one negative"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="binary"):
        auroc([0.1, 0.2], [0, 2])


def test_auprc_hand_worked():
    # Ranked: pos, neg, pos, neg. Recall steps of 1/2 at depth 1 (precision 1) and depth 3
    # (precision 2/3): AP = 1/2 x 1 + 1/2 x 2/3 = 5/6.
    assert auprc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6, rel=1e-15)
    assert auprc([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 0]) == 1.0
    # Tied scores form one threshold: precision 1/2 at recall 1 -> AP 1/2, whatever the order.
    assert auprc([0.5, 0.5], [1, 0]) == 0.5
    assert auprc([0.5, 0.5], [0, 1]) == 0.5
    # Worst ranking: positive last among 4 -> precision 1/4 at recall 1.
    assert auprc([4, 3, 2, 1], [0, 0, 0, 1]) == 0.25
    with pytest.raises(ValueError, match="positive"):
        auprc([0.1, 0.2], [0, 0])


def test_auprc_and_auroc_agree_with_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for _ in range(10):
        scores = rng.integers(0, 6, size=80).astype(float)
        labels = rng.integers(0, 2, size=80)
        assert auprc(scores, labels) == pytest.approx(
            metrics.average_precision_score(labels, scores), abs=1e-12
        )
        assert auroc(scores, labels) == pytest.approx(
            metrics.roc_auc_score(labels, scores), abs=1e-12
        )


# ---------------------------------------------------------------- concept match metrics


def test_pearson_and_cosine_hand_worked():
    # cos([1, 2, 2], [1, 0, 1]) = (1 + 2) / (3 x sqrt 2) = 1/sqrt 2.
    assert cosine([1, 2, 2], [1, 0, 1]) == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    # Centred: a - 5/3 = [-2/3, 1/3, 1/3], y - 2/3 = [1/3, -2/3, 1/3]:
    # dot = -2/9 - 2/9 + 1/9 = -1/3; norms sqrt(6)/3 each -> -1/3 / (6/9) = -1/2.
    assert pearson([1, 2, 2], [1, 0, 1]) == pytest.approx(-0.5, rel=1e-12)
    assert math.isnan(pearson([1, 1, 1], [1, 0, 1]))  # constant unit: undefined
    rng = np.random.default_rng(2)
    a, y = rng.normal(size=50), rng.integers(0, 2, size=50)
    assert pearson(a, y) == pytest.approx(np.corrcoef(a, y)[0, 1], abs=1e-12)


def test_f1_and_iou_at_top_hand_worked():
    acts = [5, 4, 3, 2, 1, 0]
    labels = [1, 0, 1, 0, 0, 0]
    # alpha = 1/3 of 6 images -> top 2 = images 0, 1: TP 1, predicted 2, positives 2.
    # F1 = 2 x 1 / (2 + 2) = 1/2; IoU = 1 / |{0, 1, 2}| = 1/3.
    assert f1_at_top(acts, labels, alpha=1 / 3) == 0.5
    assert iou_at_top(acts, labels, alpha=1 / 3) == pytest.approx(1 / 3, rel=1e-15)


def test_top_alpha_mask_counts_and_ties():
    # round(0.25 x 4) = 1 image; round(0.5 x 4) = 2 -> threshold is the 2nd highest (2),
    # and the tied 2s are both in: 3 images.
    assert top_alpha_mask([3, 2, 2, 1], 0.25).tolist() == [True, False, False, False]
    assert top_alpha_mask([3, 2, 2, 1], 0.5).tolist() == [True, True, True, False]
    # Tiny set with the default alpha: round(0.005 x 10) = 0 -> at least one image.
    assert top_alpha_mask(np.arange(10.0)).sum() == 1
    with pytest.raises(ValueError, match="alpha"):
        top_alpha_mask([1.0, 2.0], 0.0)


def test_concept_match_scores_selection_by_name():
    acts, labels = [5, 4, 3, 2, 1, 0], [1, 0, 1, 0, 0, 0]
    all_scores = concept_match_scores(acts, labels, alpha=1 / 3)
    assert list(all_scores) == list(CONCEPT_METRICS) == ["pearson", "cosine", "auprc", "f1", "iou"]
    assert all_scores["f1"] == 0.5
    # Positives at depths 1 and 3: AP = 1/2 x 1 + 1/2 x 2/3.
    assert concept_match_scores(acts, labels, "auprc") == {"auprc": pytest.approx(5 / 6)}
    assert list(concept_match_scores(acts, labels, ["iou", "cosine"])) == ["iou", "cosine"]
    with pytest.raises(KeyError, match="unknown concept metric 'aurpc'.*auprc"):
        concept_match_scores(acts, labels, "aurpc")
    assert DEFAULT_ALPHA == 0.005


def _noisy_unit(seed=3, n=2000, n_pos=200):
    """A good but imperfect unit: positives fire ~N(3, 1), negatives ~N(0, 1)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, dtype=int)
    labels[rng.choice(n, n_pos, replace=False)] = 1
    acts = rng.normal(size=n) + 3.0 * labels
    return rng, acts, labels


# alpha = 0.1 makes the unit's predicted set as large as the positive set, so F1 / IoU move
# by large margins (about 0.9 -> 0.6), not by a few images' luck.
@pytest.mark.parametrize("metric", list(CONCEPT_METRICS))
def test_sanity_missing_labels_lower_the_score(metric):
    rng, acts, labels = _noisy_unit()
    missing = labels.copy()
    pos = np.flatnonzero(labels)
    missing[rng.choice(pos, pos.size // 2, replace=False)] = 0
    full = concept_match_scores(acts, labels, metric, alpha=0.1)[metric]
    half = concept_match_scores(acts, missing, metric, alpha=0.1)[metric]
    assert half < full - 0.05


@pytest.mark.parametrize("metric", list(CONCEPT_METRICS))
def test_sanity_extra_labels_lower_the_score(metric):
    rng, acts, labels = _noisy_unit()
    extra = labels.copy()
    neg = np.flatnonzero(labels == 0)
    extra[rng.choice(neg, labels.sum(), replace=False)] = 1  # as many false positives
    full = concept_match_scores(acts, labels, metric, alpha=0.1)[metric]
    noisy = concept_match_scores(acts, extra, metric, alpha=0.1)[metric]
    assert noisy < full - 0.05


# ---------------------------------------------------------------- classifier search

# 4 images: class 0 = images 0, 1; class 1 = images 2, 3. Three units.
UNIT_ACTS = np.array(
    [
        [0.9, 0.1, 0.5],
        [0.8, 0.4, 0.6],
        [0.3, 0.6, 0.55],
        [0.1, 0.2, 0.1],
    ]
)


def test_classifier_search_auroc_hand_worked_with_tie():
    # Class 0 -> unit 0: positives 0.9, 0.8 beat negatives 0.3, 0.1 in all 4 pairs -> 1.0.
    # Class 1 -> units 1 and 2 (tied closest descriptions):
    #   unit 1: positives 0.6, 0.2 vs negatives 0.1, 0.4: 0.6>0.1, 0.6>0.4, 0.2>0.1, 0.2<0.4
    #           -> 3/4
    #   unit 2: positives 0.55, 0.1 vs negatives 0.5, 0.6: only 0.55>0.5 -> 1/4
    #   class 1 = (3/4 + 1/4) / 2 = 1/2.
    # Mean over classes = (1 + 1/2) / 2 = 3/4.
    per_class, mean = classifier_search_auroc(UNIT_ACTS, [0, 0, 1, 1], [[0], [1, 2]])
    assert per_class.tolist() == [1.0, 0.5]
    assert mean == 0.75


def test_classifier_search_auroc_rejects_bad_inputs():
    with pytest.raises(ValueError, match="no matched unit"):
        classifier_search_auroc(UNIT_ACTS, [0, 0, 1, 1], [[0], []])
    with pytest.raises(ValueError, match="n_images"):
        classifier_search_auroc(UNIT_ACTS, [0, 1], [[0], [1]])


# ---------------------------------------------------------------- bootstrap and cosine


def test_bootstrap_ci_two_values():
    # Resampled means of [0, 1] are 0, 1/2, 1 with probability 1/4, 1/2, 1/4, so the 2.5%
    # and 97.5% quantiles of 1000 draws are exactly 0 and 1.
    assert bootstrap_ci([0.0, 1.0]) == (0.5, 0.0, 1.0)


def test_bootstrap_ci_properties():
    assert bootstrap_ci([0.3] * 7) == (0.3, 0.3, 0.3)
    rng = np.random.default_rng(4)
    v = rng.normal(size=400)
    mean, low, high = bootstrap_ci(v, seed=5)
    assert mean == v.mean()
    assert bootstrap_ci(v, seed=5) == (mean, low, high)  # seeded: reproducible
    assert bootstrap_ci(v, seed=6) != (mean, low, high)
    # Close to the normal interval mean +- 1.96 sd / sqrt(n).
    half = 1.96 * v.std(ddof=1) / math.sqrt(v.size)
    assert low == pytest.approx(mean - half, abs=0.2 * half)
    assert high == pytest.approx(mean + half, abs=0.2 * half)
    narrow = bootstrap_ci(v, seed=5, level=0.5)
    assert low < narrow[1] < narrow[2] < high
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(v, level=1.0)


def test_cosine_matrix_hand_worked():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [3.0, 0.0]])
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(cosine_matrix(a, b), [[0.0, 1.0], [r, r]], rtol=0, atol=1e-15)
    assert cosine_matrix(a, b).shape == (2, 2)
    with pytest.raises(ValueError, match="zero vector"):
        cosine_matrix(np.zeros((1, 2)), b)
    with pytest.raises(ValueError, match=r"a \[n, d\]"):
        cosine_matrix(a, np.ones((2, 3)))
