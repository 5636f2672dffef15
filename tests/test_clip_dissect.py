"""CLIP-Dissect baseline on a synthetic image-text space with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from dnd.baselines.clip_dissect import ClipDissectConfig, clip_dissect, concept_probabilities


def _world(seed=0, n=400, common=0.5):
    """Images show one of 4 concepts (embedding = concept axis + noise); unit u fires on
    images of concept u, unit 3 fires at random; concept 'common' is in every image with
    weight ``common``."""
    rng = np.random.default_rng(seed)
    which = rng.integers(0, 4, size=n)
    d = 8
    text = np.eye(d)[:5]              # concepts 0..3 and 'common' (axis 4)
    img = np.eye(d)[which] * 1.0 + common * np.eye(d)[4] + 0.1 * rng.normal(size=(n, d))
    acts = np.stack([(which == u) + 0.1 * rng.random(n) for u in range(3)]
                    + [rng.random(n)], axis=1)
    return acts, img, text, which


def test_units_get_their_concept_and_the_base_rate_term_removes_common_ones():
    acts, img, text, _ = _world()
    names = ["dog", "cat", "car", "tree", "common"]
    res = clip_dissect(acts, img, names, text, ClipDissectConfig(top_k=50))
    assert [labels[0] for labels in res.labels(1)[:3]] == ["dog", "cat", "car"]
    assert res.scores.shape == (4, 5)
    # When every image shows 'common' a little more than its own concept, only the
    # base-rate term (lam) keeps 'common' from labelling every unit.
    acts, img, text, _ = _world(common=1.1)
    with_base = clip_dissect(acts, img, names, text, ClipDissectConfig(top_k=50))
    no_base = clip_dissect(acts, img, names, text, ClipDissectConfig(top_k=50, lam=0.0))
    assert [labels[0] for labels in no_base.labels(1)[:3]] == ["common"] * 3
    assert [labels[0] for labels in with_base.labels(1)[:3]] == ["dog", "cat", "car"]


def test_concept_probabilities_are_a_distribution():
    _, img, text, which = _world(n=20)
    p = concept_probabilities(img, text, a=10.0)
    assert p.shape == (20, 5) and np.allclose(p.sum(1), 1.0)
    assert (p[:, :4].argmax(1) == which).all()


def test_bad_shapes_and_settings_raise():
    acts, img, text, _ = _world(n=10)
    with pytest.raises(ValueError, match="shapes disagree"):
        clip_dissect(acts[:5], img, ["a"] * 5, text)
    with pytest.raises(ValueError):
        ClipDissectConfig(p_start=0.9, p_end=0.95)
