"""`dnd bench dictionary`'s judging on hand-made data: which features read a neuron, when a
polysemantic neuron counts as split, per-basis counts and the table. No model is run."""

from __future__ import annotations

import numpy as np

from dnd.benchmarks.dictionary import (
    Candidate,
    basis_row,
    by_correlation,
    by_decoder,
    dictionary_bench_lines,
    split_of,
)
from dnd.toyworld.groundtruth import UnitTruth

CONCEPTS = ("circle", "striped")


def _cand(unit, truth, aps, label, clear=True):
    return Candidate(unit, 0.5, truth, max(aps), clear, aps, label)


def test_a_neuron_is_split_only_by_features_that_carry_one_concept_alone():
    circle = _cand(1, "circle", (0.9, 0.2), "a blue circle")
    stripes = _cand(2, "striped", (0.3, 0.95), "stripes")
    # Best concept striped, but it also detects circles (AP 0.6): the neuron again.
    both = _cand(3, "striped", (0.6, 0.9), "circle on a striped background")
    unclear = _cand(4, "circle", (0.45, 0.2), "circle", clear=False)
    split = split_of(CONCEPTS, [both, circle, stripes])
    assert split.by_truth and split.by_label
    assert split.truth_carriers == ((1,), (2,))
    assert split.label_carriers == ((1,), (2,))  # "circle on ... striped" names both
    not_split = split_of(CONCEPTS, [both, circle, unclear])
    assert not not_split.by_truth and not_split.truth_carriers == ((1,), ())
    assert not not_split.by_label
    # Labels alone can split where ground truth does not, and the other way round.
    mislabelled = _cand(5, "striped", (0.2, 0.9), "red square")
    only_truth = split_of(CONCEPTS, [circle, mislabelled])
    assert only_truth.by_truth and not only_truth.by_label


def test_features_reading_a_channel_by_unit_decoder_weight_and_by_correlation():
    # Feature 0 has the larger raw weight on channel 0, feature 1 the larger share of its
    # direction: the rows are scaled to unit length first.
    rows = np.array([[10.0, 10.0, 0.0], [1.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 0.0]])
    picked = by_decoder(rows, 0, k=3)
    assert [f for f, _ in picked] == [1, 0, 2]
    assert np.allclose([w for _, w in picked], [1.0, 1 / np.sqrt(2), 0.0])
    neuron = np.array([0.0, 1.0, 2.0, 3.0, 0.5])
    feats = np.stack([-neuron, np.ones(5), neuron * 2 + 1, neuron ** 2], 1)
    order = by_correlation(feats, neuron, k=4)
    assert [f for f, _ in order] == [2, 3, 1, 0]
    assert np.isclose(order[0][1], 1.0) and order[2][1] == 0.0 and np.isclose(order[3][1], -1)


def test_basis_row_counts_clear_units_and_label_agreement():
    acts = np.array([[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]])
    truths = [UnitTruth(0, "red", 0.2, False), UnitTruth(1, "striped", 0.8, True),
              UnitTruth(2, "text", 0.7, True)]
    labels = {1: ("stripes", "red"), 2: ("blue square", "lettering")}
    row = basis_row("SAE", acts, truths, labels)
    assert (row.units, row.dead, row.clear, row.concepts) == (3, 1, 2, 2)
    assert (row.label1, row.top3) == (1, 2)


def _result(splits):
    row = {"units": 4, "dead": 0, "clear": 2, "concepts": 2, "label1": 1, "top3": 2}
    cand = {"unit": 7, "score": 0.9, "truth": "circle", "truth_ap": 0.8, "clear": True,
            "aps": [0.8, 0.2], "label": "circle"}
    fit = {"positions": 100, "features": 4, "fraction_of_variance_unexplained": 0.1,
           "seconds": 0.5}
    return {"n_probe": 50, "layer": "conv4", "machine": "test", "seconds": {"nmf": 1, "sae": 2},
            "rows": {"neurons": row, "NMF": row, "SAE": row}, "fits": {"NMF": fit, "SAE": fit},
            "neurons": [{"unit": u, "concepts": list(CONCEPTS), "truth": "circle",
                         "truth_ap": 0.6, "aps": [0.6, 0.55], "label": "circle",
                         "splits": {"SAE/correlation": {
                             "by_truth": ok, "by_label": False, "candidates": [cand],
                             "truth_carriers": [[7], [7] if ok else []],
                             "label_carriers": [[7], []]}},
                         "anywhere": {"SAE": {"truth_carriers": [[7], [7] if ok else []],
                                              "label_carriers": [[7], [9]]}}}
                        for u, ok in enumerate(splits)]}


def test_table_states_the_command_the_split_rate_and_the_missed_goal():
    lines = dictionary_bench_lines(_result([True, False, False, True]), "dnd bench dictionary")
    text = "\n".join(lines)
    assert lines[2] == "Regenerate: `dnd bench dictionary`"
    assert "| SAE | correlation | 2/4 (50%) | 0/4 (0%) | **no** |" in text
    assert "Not split by ground truth: #1 (striped: no feature of the dictionary carries it " \
        "alone); #2 (striped: " in text
    assert "Not split by labels: #0 (striped: named alone by the Label 1 of #9, not among " \
        "the top 3)" in text
    assert "| SAE | 2/4 (50%) | 4/4 (100%) |" in text  # some feature anywhere
    met = "\n".join(dictionary_bench_lines(_result([True, True, True, False]), "x"))
    assert "| SAE | correlation | 3/4 (75%) | 0/4 (0%) | yes |" in met


def test_a_split_by_labels_alone_names_the_feature_that_detects_both_concepts():
    r = _result([False])
    split = r["neurons"][0]["splits"]["SAE/correlation"]
    split["candidates"].append({"unit": 8, "score": 0.5, "truth": "striped", "truth_ap": 0.9,
                                "clear": True, "aps": [0.7, 0.9], "label": "stripes"})
    split.update(by_label=True, label_carriers=[[7], [8]])
    text = "\n".join(dictionary_bench_lines(r, "x"))
    assert ("Split by labels only, a label naming one concept where the feature detects "
            "both: #0's feature #8, \u201cstripes\u201d, also detects circle (AP 0.70).") in text
