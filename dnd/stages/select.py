"""Step 3 of DnD, points 2-5: choose the unit's description among its candidate concepts.

Pure numpy: the caller has already generated images for every candidate, run them through
the target network (``gen_acts``) and computed CLIP image similarities (``sim``).

Two rules order the candidates (``ScoreConfig.selection``):

- ``paper`` (:func:`select_concept`): rank score x image-product weight, ALGORITHM.md
  Step 3. The weight rewards generated images that look like the unit's top images, so it
  favours concepts that describe whole scenes over the part the unit responds to.
- ``evidence`` (:func:`evidence_order`, the default): a candidate must be both
  *sufficient* and *shown*. Its **response** R is how strongly its generated images fire
  the unit, on the unit's own scale (0 at its median probe image, 1 at its top images; see
  :func:`normalized_response`), at the scale the unit looks at; its **coverage** S is the
  share of the unit's activating images (and crops) whose captions name it. Score = R x S:
  an estimate of precision times recall of the concept as a detector of the unit, like the
  IoU of Network Dissection. A specific concept ("red star") has at most the coverage of a
  general one ("red"), so the general one wins whenever its images fire the unit about as
  well; ``margin`` makes "about" explicit.

Generated-image layout used throughout: D_gen is the concatenation of the candidates'
images in candidate order, so ``gen_acts[0]`` covers columns ``0 .. len(gen_acts[0]) - 1``
of ``sim``, ``gen_acts[1]`` the next ones, and so on. ``gen_acts`` may be a [C, Q] array or
a list of C 1-D arrays of different lengths (a candidate with fewer images).

Tie rules (all deterministic):
- equal activations share the average of their ranks (``rankdata(-acts, "average")``);
- the overall top-k of D_gen takes exactly min(k, n_generated) images, ties at the cut
  going to the lower generated-image index (stable sort);
- equal rank scores get consecutive positions in candidate order (stable sort);
- equal final scores are ordered by position, i.e. the better rank score first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from dnd.metrics import cosine_matrix
from dnd.record import Selection
from dnd.registry import Registry

# name -> fn(ranks of one candidate's images [n_c], beta) -> score; lower is better.
RANK_SCORES = Registry("rank score")


@RANK_SCORES.register("topk_squared")
def topk_squared(ranks: np.ndarray, beta: int) -> float:
    """Mean squared rank of the candidate's ``beta`` best-ranked images (DnD default)."""
    return float(np.mean(np.sort(ranks)[:beta] ** 2))


@RANK_SCORES.register("mean")
def mean_rank(ranks: np.ndarray, beta: int) -> float:
    """Plain mean rank of all the candidate's images (``beta`` unused)."""
    return float(np.mean(ranks))


@RANK_SCORES.register("squared_mean")
def squared_mean_rank(ranks: np.ndarray, beta: int) -> float:
    """Mean squared rank of all the candidate's images (``beta`` unused)."""
    return float(np.mean(ranks**2))


def select_concept(
    candidates: Sequence[str],
    gen_acts: np.ndarray | Sequence[np.ndarray],
    sim: np.ndarray,
    *,
    k: int = 10,
    beta: int = 5,
    rank_score: str = "topk_squared",
) -> Selection:
    """Score every candidate concept of one unit and order them, best first.

    candidates: C >= 1 concept strings. gen_acts: per candidate, the unit's activations on
    its generated images ([C, Q] or C ragged 1-D arrays, each non-empty). sim [K, n_gen]:
    CLIP image-space cosine similarity of the unit's K activating images to every generated
    image. k: size of the overall top-k of D_gen used by the weight (paper: k = K = 10).
    beta: images per candidate used by "topk_squared". rank_score: a ``RANK_SCORES`` name.
    Ties (activations, top-k cut, rank scores, final scores): see the module docstring.
    """
    score_fn = RANK_SCORES.get(rank_score)
    if k < 1 or beta < 1:
        raise ValueError(f"k and beta must be >= 1, got k={k}, beta={beta}")
    acts, owner = _flatten(candidates, gen_acts)
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[1] != acts.size:
        raise ValueError(f"sim must have shape [K >= 1, {acts.size}], got {sim.shape}")
    n_cand = len(candidates)

    # 1. Rank all of D_gen by activation.
    ranks = rank_images(acts)
    # 2. Rank score per candidate and its position in the rank-score order.
    rank_scores = np.array([score_fn(ranks[owner == c], beta) for c in range(n_cand)])
    positions = np.empty(n_cand, dtype=int)
    positions[np.argsort(rank_scores, kind="stable")] = np.arange(n_cand)
    # 3. Image-product weight from the candidate's images in the overall top-k.
    top = np.argsort(-acts, kind="stable")[:k]
    weights = _image_product_weights(sim, owner, top, n_cand)
    # 4. Final score; order by it, position breaking ties.
    final = (n_cand - positions) * weights
    order = np.lexsort((positions, -final))

    return Selection(
        candidates=tuple(candidates),
        rank_score_name=rank_score,
        beta=beta,
        k=k,
        image_candidate=tuple(owner.tolist()),
        activations=tuple(acts.tolist()),
        ranks=tuple(ranks.tolist()),
        top_k=tuple(top.tolist()),
        rank_scores=tuple(rank_scores.tolist()),
        positions=tuple(positions.tolist()),
        weights=tuple(weights.tolist()),
        final_scores=tuple(final.tolist()),
        order=tuple(order.tolist()),
    )


def normalized_response(acts: np.ndarray, median: float, top: float) -> np.ndarray:
    """Activations [n] on the unit's own scale, clipped to [0, 1]: 0 at or below its
    ``median`` activation over the probing set, 1 at or above ``top`` (the mean of its top
    activating probe images). All 0 when ``top <= median`` (a unit that never fires)."""
    acts = np.asarray(acts, dtype=np.float64)
    if not top > median:
        return np.zeros_like(acts)
    return np.clip((acts - median) / (top - median), 0.0, 1.0)


def evidence_order(candidates: Sequence[str], responses: Sequence[float],
                   coverage: Sequence[float], margin: float = 0.1
                   ) -> tuple[np.ndarray, tuple[int, ...]]:
    """The ``evidence`` rule (module docstring): scores [C] = responses x coverage and the
    candidate order, best first.

    Label 1 is the best score, replaced by a more general candidate (its content words a
    proper subset: "red" for "red star") whose score is at least ``1 - margin`` of it, the
    most general such first; the rest follow by score. Ties keep candidate order.
    """
    from dnd.stages.words import more_general

    resp = np.asarray(responses, dtype=np.float64)
    cov = np.asarray(coverage, dtype=np.float64)
    if resp.shape != (len(candidates),) or cov.shape != resp.shape:
        raise ValueError(f"need one response and one coverage per candidate ({len(candidates)}), "
                         f"got {resp.shape} and {cov.shape}")
    scores = resp * cov
    by_score = [int(i) for i in np.argsort(-scores, kind="stable")]
    best = by_score[0]
    while True:
        general = [i for i in by_score if more_general(candidates[i], candidates[best])
                   and scores[i] >= (1 - margin) * scores[best] and scores[i] > 0]
        if not general:
            break
        best = general[0]
    return scores, (best, *(i for i in by_score if i != best))


def rank_images(acts: np.ndarray) -> np.ndarray:
    """Ranks [n] of activations [n]: 1 = highest; tied activations share their mean rank."""
    return rankdata(-np.asarray(acts, dtype=np.float64), method="average")


def deduplicate_labels(
    order: Sequence[int],
    text_sim: np.ndarray,
    *,
    max_labels: int = 3,
    threshold: float = 0.81,
) -> tuple[int, ...]:
    """Multiple labels for polysemantic units: walk candidates best first (``order``, e.g.
    ``Selection.order``) and keep up to ``max_labels``, skipping one whose text similarity
    (``text_sim`` [C, C], candidate-indexed) to an already kept label exceeds ``threshold``.
    Returns the kept candidate indices, best first.
    """
    text_sim = np.asarray(text_sim, dtype=np.float64)
    if text_sim.ndim != 2 or text_sim.shape[0] != text_sim.shape[1]:
        raise ValueError(f"text_sim must be a square [C, C] matrix, got {text_sim.shape}")
    kept: list[int] = []
    for c in order:
        if len(kept) == max_labels:
            break
        if all(text_sim[c, j] <= threshold for j in kept):
            kept.append(int(c))
    return tuple(kept)


def interpretability_score(embeddings: np.ndarray) -> float:
    """Mean pairwise cosine similarity of the unit's top activating images' embeddings
    [K >= 2, d] (off-diagonal mean). Low values flag descriptions not to trust."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise ValueError(f"need embeddings [K >= 2, d], got shape {emb.shape}")
    sims = cosine_matrix(emb, emb)
    n = sims.shape[0]
    # The diagonal is all ones (self-similarity); drop it from the mean.
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


def _flatten(
    candidates: Sequence[str], gen_acts: np.ndarray | Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-candidate activations -> (acts [n_gen], owner candidate [n_gen])."""
    if len(candidates) == 0:
        raise ValueError("need at least one candidate concept")
    if len(gen_acts) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates but {len(gen_acts)} activation rows")
    rows = [np.asarray(row, dtype=np.float64) for row in gen_acts]
    for c, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"candidate {c}: need a non-empty 1-D activation array")
        if not np.isfinite(row).all():
            raise ValueError(f"candidate {c}: activations must be finite")
    owner = np.repeat(np.arange(len(rows)), [row.size for row in rows])
    return np.concatenate(rows), owner


def _image_product_weights(
    sim: np.ndarray, owner: np.ndarray, top: np.ndarray, n_cand: int
) -> np.ndarray:
    """Per candidate: mean of sim[:, its images in ``top``]; -1 when it has none there."""
    weights = np.full(n_cand, -1.0)
    for c in range(n_cand):
        cols = top[owner[top] == c]
        if cols.size:
            weights[c] = sim[:, cols].mean()
    return weights
