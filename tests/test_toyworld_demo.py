"""The demo's ground-truth judge: keyword match with the world's synonyms."""

from __future__ import annotations

from dnd.toyworld.demo import LayerAgreement, _agreement, mentions


def test_mentions_needs_every_word_through_any_synonym():
    assert mentions("crimson disc", "red circle")
    assert mentions("a large red circle on stripes", "red circle")
    assert not mentions("red", "red circle")
    assert not mentions("reddish circle", "red circle")  # whole words only
    assert mentions("polka dots", "dotted") and not mentions("dot", "dotted")


def test_agreement_counts_only_units_with_clear_truth():
    records = [{"unit": 0, "labels": ["scarlet disc", "x"]},
               {"unit": 1, "labels": ["blue", "blue square"]},
               {"unit": 2, "labels": ["stripes"]}]
    agreement, rows = _agreement("fc", records, {0: "red circle", 1: "blue square", 2: None})
    assert agreement == LayerAgreement("fc", units=3, judged=2, label1=1, top3=2)
    assert [r["label1_agrees"] for r in rows] == [True, False, False]


def test_benchmark_scoring_and_concept_set():
    from dnd.toyworld.benchmark import _score, concept_set

    concepts = concept_set()
    assert "red circle" in concepts and "striped background" in concepts and "text" in concepts
    assert len(concepts) == len(set(concepts))
    labels = {0: "a scarlet disc", 1: "stripes", 2: "blue"}
    assert _score(labels, {0: "red circle", 1: "striped", 2: None, 3: "dotted"}) == (2, 3)
