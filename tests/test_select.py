"""Hand-worked tests of concept selection (DnD Step 3). Every expected number is derived in
the comments; sims are multiples of 1/4 so products and means are exact in binary."""

import json
import math

import numpy as np
import pytest

from dnd.stages.select import (
    RANK_SCORES,
    Selection,
    deduplicate_labels,
    interpretability_score,
    rank_images,
    select_concept,
)

# Three candidates, three generated images each. D_gen indices:
#   cat: 0 (9), 1 (6), 2 (1)    dog: 3 (8), 4 (6), 5 (2)    car: 6 (7), 7 (3), 8 (0)
# Activations sorted high -> low: 9 8 7 6 6 3 2 1 0; the two 6s tie for ranks 4 and 5 and
# share 4.5. Ranks per image: [1, 4.5, 8, 2, 4.5, 7, 3, 6, 9].
CANDS = ["cat", "dog", "car"]
ACTS = np.array([[9.0, 6.0, 1.0], [8.0, 6.0, 2.0], [7.0, 3.0, 0.0]])
RANKS = (1.0, 4.5, 8.0, 2.0, 4.5, 7.0, 3.0, 6.0, 9.0)
# k = 3: the overall top-3 is images 0 (cat), 3 (dog), 6 (car), one per candidate.
# K = 2 activating images. Weight = mean of the candidate's top-k column:
#   cat col 0: (0 + 0.5)/2 = 0.25; dog col 3: (0.25 + 0.75)/2 = 0.5; car col 6: (0.5 + 1)/2
#   = 0.75. Every other column is 0.9375 and must be ignored (not in the top-k).
SIM = np.full((2, 9), 0.9375)
SIM[:, 0] = [0.0, 0.5]
SIM[:, 3] = [0.25, 0.75]
SIM[:, 6] = [0.5, 1.0]
WEIGHTS = (0.25, 0.5, 0.75)


def test_rank_images_averages_ties():
    assert tuple(rank_images(ACTS.ravel())) == RANKS


def test_topk_squared_worked_example_weight_flips_winner():
    sel = select_concept(CANDS, ACTS, SIM, k=3, beta=2)
    assert sel.ranks == RANKS
    assert sel.image_candidate == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    assert sel.top_k == (0, 3, 6)
    # beta = 2 best ranks: cat {1, 4.5} -> (1 + 20.25)/2 = 10.625; dog {2, 4.5} ->
    # (4 + 20.25)/2 = 12.125; car {3, 6} -> (9 + 36)/2 = 22.5. Positions cat 0, dog 1, car 2.
    assert sel.rank_scores == (10.625, 12.125, 22.5)
    assert sel.positions == (0, 1, 2)
    assert sel.weights == WEIGHTS
    # Final = (3 - position) x weight: cat 3 x 0.25 = 0.75, dog 2 x 0.5 = 1.0, car 1 x 0.75
    # = 0.75. Rank score alone picks cat; the image-product weight flips the winner to dog.
    # cat and car tie at 0.75: cat comes first because of its better position (0 < 2).
    assert sel.final_scores == (0.75, 1.0, 0.75)
    assert sel.order == (1, 0, 2)
    assert sel.label == "dog"
    assert sel.labels == ("dog", "cat", "car")


@pytest.mark.parametrize(
    "name, rank_scores, positions, final_scores, order",
    [
        # Same numbers as the test above.
        ("topk_squared", (10.625, 12.125, 22.5), (0, 1, 2), (0.75, 1.0, 0.75), (1, 0, 2)),
        # Mean ranks: cat (1 + 4.5 + 8)/3 = 4.5, dog (2 + 4.5 + 7)/3 = 4.5, car (3+6+9)/3 = 6.
        # cat and dog tie: stable order by candidate index gives cat 0, dog 1.
        # Final: cat 3 x 0.25 = 0.75, dog 2 x 0.5 = 1.0, car 1 x 0.75 = 0.75.
        ("mean", (4.5, 4.5, 6.0), (0, 1, 2), (0.75, 1.0, 0.75), (1, 0, 2)),
        # Mean squared ranks: cat (1 + 20.25 + 64)/3 = 85.25/3, dog (4 + 20.25 + 49)/3 =
        # 73.25/3, car (9 + 36 + 81)/3 = 42. Positions dog 0, cat 1, car 2.
        # Final: cat 2 x 0.25 = 0.5, dog 3 x 0.5 = 1.5, car 1 x 0.75 = 0.75 -> dog, car, cat.
        ("squared_mean", (85.25 / 3, 73.25 / 3, 42.0), (1, 0, 2), (0.5, 1.5, 0.75), (1, 2, 0)),
    ],
)
def test_all_rank_score_names(name, rank_scores, positions, final_scores, order):
    sel = select_concept(CANDS, ACTS, SIM, k=3, beta=2, rank_score=name)
    assert sel.rank_score_name == name
    assert sel.rank_scores == pytest.approx(rank_scores, rel=1e-15)
    assert sel.positions == positions
    assert sel.final_scores == final_scores
    assert sel.order == order


def test_registry_lists_the_three_scores_and_rejects_unknown():
    assert RANK_SCORES.names() == ["mean", "squared_mean", "topk_squared"]
    with pytest.raises(KeyError, match="unknown rank score 'topk_sqared'.*topk_squared"):
        select_concept(CANDS, ACTS, SIM, rank_score="topk_sqared")


def test_candidate_without_top_k_image_gets_weight_minus_one():
    # A: images 0 (10), 1 (1); B: images 2 (9), 3 (8). Ranks: [1, 4, 2, 3].
    # beta = 2: A (1 + 16)/2 = 8.5, B (4 + 9)/2 = 6.5 -> B has the better rank score
    # (position 0), A position 1.
    # k = 1: the top-1 of D_gen is image 0 (A). A's weight = sim[0, 0] = 0.5; B has no image
    # there -> weight -1.
    # Final: A (2 - 1) x 0.5 = 0.5; B (2 - 0) x -1 = -2. The rank-score winner sinks to last.
    sel = select_concept(
        ["A", "B"], [[10.0, 1.0], [9.0, 8.0]], [[0.5, 0.25, 0.25, 0.25]], k=1, beta=2
    )
    assert sel.ranks == (1.0, 4.0, 2.0, 3.0)
    assert sel.rank_scores == (8.5, 6.5)
    assert sel.positions == (1, 0)
    assert sel.top_k == (0,)
    assert sel.weights == (0.5, -1.0)
    assert sel.final_scores == (0.5, -2.0)
    assert sel.labels == ("A", "B")


def test_top_k_cut_through_tied_activations_takes_lower_index():
    # Images 0 (A, 5), 1 (B, 5): tied for the single top-1 slot -> image 0 (lower index).
    # Both rank 1.5, so rank scores tie (2.25) and positions follow candidate order: A 0, B 1.
    # Weights: A = sim[0, 0] = 0.5, B = -1. Final: A 2 x 0.5 = 1.0, B 1 x -1 = -1.
    sel = select_concept(["A", "B"], [[5.0], [5.0]], [[0.5, 0.75]], k=1)
    assert sel.ranks == (1.5, 1.5)
    assert sel.rank_scores == (2.25, 2.25)
    assert sel.positions == (0, 1)
    assert sel.top_k == (0,)
    assert sel.weights == (0.5, -1.0)
    assert sel.final_scores == (1.0, -1.0)


def test_top_k_ties_are_cut_by_generated_image_order():
    # A and B both get activations 2, 1, 2, 1, ... (20 images each): 20 images tie at 2 for
    # 10 top-k slots. They go to the lowest indices, A's 0, 2, ..., 18, so B's weight is -1.
    # (An unstable sort would hand some slots to B.)
    acts = np.tile([2.0, 1.0], (2, 10))
    sel = select_concept(["A", "B"], acts, np.full((1, 40), 0.5))
    assert sel.top_k == tuple(range(0, 20, 2))
    assert sel.weights == (0.5, -1.0)


def test_single_candidate_unit():
    # Activations [0.3, 0.1, 0.2] -> ranks [1, 3, 2]. beta = 5 > 3 images: all used,
    # (1 + 9 + 4)/3 = 14/3. k = 10 > 3 images: all are in the top-k, ordered 0, 2, 1.
    # Weight = mean of the whole sim = (0.25 + 0.5 + 0.75 + 0.5 + 0.5 + 0.5)/6 = 0.5.
    # Final = (1 - 0) x 0.5.
    sel = select_concept(["sky"], [[0.3, 0.1, 0.2]], [[0.25, 0.5, 0.75], [0.5, 0.5, 0.5]])
    assert sel.ranks == (1.0, 3.0, 2.0)
    assert sel.rank_scores == (14 / 3,)
    assert sel.positions == (0,)
    assert sel.top_k == (0, 2, 1)
    assert sel.weights == (0.5,)
    assert sel.final_scores == (0.5,)
    assert sel.labels == ("sky",)


def test_ragged_candidates_map_to_concatenated_sim_columns():
    # A has 1 image (index 0), B has 3 (indices 1, 2, 3). Activations 1, 4, 3, 2 ->
    # ranks [4, 1, 2, 3]. k = 2: top-2 = images 1, 2, both B's -> A weight -1, B weight =
    # mean(sim[:, [1, 2]]) = (0.5 + 0.75)/2 = 0.625.
    # topk_squared (beta 5): A 16, B (1 + 4 + 9)/3 = 14/3 -> B position 0, A position 1.
    # Final: A 1 x -1 = -1, B 2 x 0.625 = 1.25.
    sel = select_concept(
        ["A", "B"], [np.array([1.0]), np.array([4.0, 3.0, 2.0])], [[0.0, 0.5, 0.75, 1.0]], k=2
    )
    assert sel.image_candidate == (0, 1, 1, 1)
    assert sel.ranks == (4.0, 1.0, 2.0, 3.0)
    assert sel.weights == (-1.0, 0.625)
    assert sel.final_scores == (-1.0, 1.25)
    assert sel.labels == ("B", "A")


def test_selection_round_trips_through_json():
    sel = select_concept(CANDS, ACTS, SIM, k=3, beta=2)
    d = json.loads(json.dumps(sel.to_json()))
    assert d["labels"] == ["dog", "cat", "car"]
    assert d["weights"] == [0.25, 0.5, 0.75]
    assert Selection.from_json(d) == sel
    with pytest.raises(AttributeError):
        sel.order = (0, 1, 2)  # frozen


@pytest.mark.parametrize(
    "cands, acts, sim, match",
    [
        ([], [], np.zeros((1, 0)), "at least one candidate"),
        (["a", "b"], [[1.0]], [[0.5]], "2 candidates but 1"),
        (["a"], [[]], np.zeros((1, 0)), "non-empty"),
        (["a"], [[np.nan]], [[0.5]], "finite"),
        (["a"], [[1.0, 2.0]], [[0.5]], "sim must have shape"),
    ],
)
def test_bad_inputs_raise(cands, acts, sim, match):
    with pytest.raises(ValueError, match=match):
        select_concept(cands, acts, sim)


# Candidates in final-score order 2, 0, 3, 1 with text similarities:
#   sim(2, 0) = 0.90 > 0.81 -> 0 is dropped (near-duplicate of the kept 2)
#   sim(2, 3) = 0.81, not above 0.81 -> 3 kept
#   sim(2, 1) = 0.30, sim(3, 1) = 0.50 -> 1 kept; sim(0, .) never matters once 0 is dropped.
TEXT_SIM = np.array(
    [
        [1.00, 0.95, 0.90, 0.20],
        [0.95, 1.00, 0.30, 0.50],
        [0.90, 0.30, 1.00, 0.81],
        [0.20, 0.50, 0.81, 1.00],
    ]
)


def test_deduplicate_labels_threshold_081():
    assert deduplicate_labels([2, 0, 3, 1], TEXT_SIM) == (2, 3, 1)


def test_deduplicate_labels_threshold_and_cap_are_parameters():
    # 0.80: now sim(2, 3) = 0.81 exceeds it too -> only 2 and 1 survive.
    assert deduplicate_labels([2, 0, 3, 1], TEXT_SIM, threshold=0.80) == (2, 1)
    # Nothing similar enough: the first three in order are kept, the fourth is cut.
    assert deduplicate_labels([2, 0, 3, 1], TEXT_SIM, threshold=0.99) == (2, 0, 3)
    assert deduplicate_labels([2, 0, 3, 1], TEXT_SIM, max_labels=1) == (2,)


def test_interpretability_score_off_diagonal_mean():
    # Unit vectors along [1,0], [0,1], [1,1]/sqrt(2): pairwise cosines 0, 1/sqrt(2),
    # 1/sqrt(2) -> mean sqrt(2)/3. Scaling a row must not matter (cosine).
    emb = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    assert interpretability_score(emb) == pytest.approx(math.sqrt(2) / 3, rel=1e-12)
    assert interpretability_score(np.ones((4, 5))) == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="K >= 2"):
        interpretability_score(np.ones((1, 5)))
