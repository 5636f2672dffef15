"""A generated image's features do not depend on which other images were computed with it.

Batched kernels round differently with a batch's size and contents. Under the Ray executor
which actor draws a concept's images first depends on timing, and the local executor's
chunks decide which concepts are drawn together, so the scorer runs every generated image
through the target and the encoder in a batch fixed by its own key, its block
(``ConceptScorer.feature_block``). Here on the toy world's CNN and CLIP: one chunk's
concepts drawn together, one concept alone, and one concept whose block another process
had half cached give bit-identical features.
"""

from __future__ import annotations

import numpy as np
import pytest

from dnd.backends.base import ENCODERS, GENERATORS, GenRequest
from dnd.cache import FeatureCache
from dnd.settings import ScoreConfig
from dnd.stages.score import ConceptScorer
from dnd.target import load_target

CONCEPTS = ["red circle", "blue square", "green triangle", "yellow star"]


@pytest.fixture(scope="module")
def parts():
    return (load_target("toyworld-cnn"), GENERATORS.create("toyworld"),
            ENCODERS.create("toyworld", device="cpu"))


def _scorer(parts, cache, **config) -> ConceptScorer:
    target, generator, encoder = parts
    return ConceptScorer(target, "fc", "mean", generator, encoder, FeatureCache(cache),
                         ScoreConfig(images_per_concept=4, **config))


def _features(scorer: ConceptScorer, concepts, first=0, stop=None) -> dict:
    reqs = [r for c in concepts for r in scorer.requests(c, first, stop)]
    feats = scorer._features(reqs)
    return {scorer.request_key(r): feats[scorer.request_key(r)] for r in reqs}


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        for part in ("acts", "emb"):
            assert np.array_equal(a[k][part], b[k][part]), (k, part)


def test_features_do_not_depend_on_batch_neighbours_or_a_half_cached_block(parts, tmp_path):
    together = _features(_scorer(parts, tmp_path / "a"), CONCEPTS)  # one chunk's concepts
    alone = _features(_scorer(parts, tmp_path / "b"), CONCEPTS[:1])
    _assert_bit_identical({k: together[k] for k in alone}, alone)
    # Another process has cached images 0-2 of "blue square", not yet image 3: image 3 is
    # computed with the other three again, not alone.
    half = _scorer(parts, tmp_path / "c")
    for req in half.requests(CONCEPTS[1])[:3]:
        k = half.request_key(req)
        half.features.put(k, together[k]["acts"], together[k]["emb"],
                          parts[1].generate([req])[0])
    rest = _features(half, CONCEPTS[1:2])
    _assert_bit_identical({k: together[k] for k in rest}, rest)


def test_blocks_follow_the_screening_requests():
    scorer = ConceptScorer.__new__(ConceptScorer)
    scorer.config = ScoreConfig(images_per_concept=10, screen_images=2, seed=5)
    blocks = [scorer.feature_block(GenRequest("p", 5 + j)) for j in range(12)]
    assert blocks[:2] == [("p", 5, 7)] * 2 and blocks[2:10] == [("p", 7, 15)] * 8
    assert blocks[10:] == [("p", 15, 25)] * 2
    scorer.config = ScoreConfig(images_per_concept=4)
    assert {scorer.feature_block(GenRequest("p", j)) for j in range(4)} == {("p", 0, 4)}
