"""CLIP-Dissect (Oikarinen & Weng, ICLR 2023) as a baseline: label each unit with the concept
from a fixed concept set that best explains its top images, by soft-WPMI in an image-text
space.

Our formulation (written from the method's description):

- ``p(c | x) = softmax_c(a * cos(x, c))``: how much image ``x`` shows concept ``c``.
- A unit's top-k probe images ``x_1..x_k`` (by summary activation) each belong to the unit's
  "example set" with a probability ``w_i`` falling linearly from ``p_start`` to ``p_end``, so
  lower-ranked images count a little less.
- ``log p(c | examples) = sum_i log(1 - w_i + w_i * p(c | x_i))``: the concept is shown by the
  example set as a whole.
- ``log p(c)``: the same quantity for a random example set, every image showing ``c`` with
  the probe's base rate ``mean_x p(c | x)``; on the same scale as the first term, so a
  concept present everywhere scores about zero whatever its probability.
- ``soft-WPMI(c) = log p(c | examples) - lam * log p(c)``; the label is its argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dnd.metrics import cosine_matrix


@dataclass(frozen=True)
class ClipDissectConfig:
    """Settings (defaults follow the method's published choices)."""

    top_k: int = 100        # example images per unit
    a: float = 10.0         # softmax sharpness over concepts
    lam: float = 1.0        # weight of the base-rate term
    p_start: float = 0.998  # inclusion probability of the top image ...
    p_end: float = 0.97     # ... falling linearly to this for the k-th
    eps: float = 1e-7       # keeps logarithms finite

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.a <= 0:
            raise ValueError("top_k must be >= 1 and a > 0")
        if not 0 < self.p_end <= self.p_start <= 1:
            raise ValueError("need 0 < p_end <= p_start <= 1")


@dataclass(frozen=True)
class ClipDissectResult:
    """Per unit: the chosen concept index and the soft-WPMI of every concept [units, C]."""

    concepts: tuple[str, ...]
    scores: np.ndarray

    def labels(self, n: int = 3) -> list[list[str]]:
        """The ``n`` best concepts per unit, best first."""
        order = np.argsort(-self.scores, axis=1, kind="stable")[:, :n]
        return [[self.concepts[j] for j in row] for row in order]


def concept_probabilities(image_emb: np.ndarray, text_emb: np.ndarray, a: float) -> np.ndarray:
    """``p(c | x)`` [n_images, C] from image [n, d] and concept [C, d] embeddings."""
    logits = a * cosine_matrix(image_emb, text_emb)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def clip_dissect(acts: np.ndarray, image_emb: np.ndarray, concepts: Sequence[str],
                 text_emb: np.ndarray, config: ClipDissectConfig | None = None
                 ) -> ClipDissectResult:
    """Label every unit of ``acts`` [n_images, units] with a concept from ``concepts``.

    ``image_emb`` [n_images, d] embeds the probe images, ``text_emb`` [C, d] the concepts,
    in the same image-text space (any ``ImageTextEncoder``).
    """
    cfg = config or ClipDissectConfig()
    acts = np.asarray(acts, dtype=np.float64)
    if acts.shape[0] != image_emb.shape[0] or len(concepts) != text_emb.shape[0]:
        raise ValueError(f"shapes disagree: acts {acts.shape}, images {image_emb.shape}, "
                         f"{len(concepts)} concepts, text {text_emb.shape}")
    p = concept_probabilities(image_emb, text_emb, cfg.a)          # [n, C]
    k = min(cfg.top_k, acts.shape[0])
    w = cfg.p_start - np.arange(k) / k * (cfg.p_start - cfg.p_end)   # [k]
    base = p.mean(axis=0)                                            # [C]
    log_base = np.log(1.0 - w[:, None] + w[:, None] * base + cfg.eps).sum(axis=0)
    top = np.argsort(-acts, axis=0, kind="stable")[:k]               # [k, units]
    scores = np.empty((acts.shape[1], len(concepts)))
    for u in range(acts.shape[1]):
        pu = p[top[:, u]]                                            # [k, C]
        log_given = np.log(1.0 - w[:, None] + w[:, None] * pu + cfg.eps).sum(axis=0)
        scores[u] = log_given - cfg.lam * log_base
    return ClipDissectResult(tuple(concepts), scores)
