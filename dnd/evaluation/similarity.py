"""Text-to-text similarities shared by the suites (embeds each distinct text once)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dnd.evaluation.embedders import TextEmbedder
from dnd.metrics import cosine_matrix


def embed_unique(embedder: TextEmbedder, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """text -> embedding row [d], each distinct text embedded once."""
    uniq = list(dict.fromkeys(texts))
    emb = np.asarray(embedder.encode(uniq))
    if emb.shape[0] != len(uniq):
        raise ValueError(f"embedder {embedder.name!r} returned {emb.shape[0]} rows for "
                         f"{len(uniq)} texts")
    return dict(zip(uniq, emb))


def similarity_matrix(embedder: TextEmbedder, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """Cosine similarity of every text of ``a`` with every text of ``b`` -> [len(a), len(b)].

    Each distinct text is embedded once, so equal texts get exactly equal rows (ties in
    classifier search stay exact ties, and a label equal to its class name scores its
    self-similarity).
    """
    rows = embed_unique(embedder, [*a, *b])
    return cosine_matrix(np.stack([rows[t] for t in a]), np.stack([rows[t] for t in b]))


def ensemble_similarity(embedders: Sequence[TextEmbedder], a: Sequence[str],
                        b: Sequence[str]) -> np.ndarray:
    """Mean over ``embedders`` of their similarity matrices -> [len(a), len(b)]."""
    if not embedders:
        raise ValueError("need at least one text embedder")
    return np.mean([similarity_matrix(e, a, b) for e in embedders], axis=0)


def paired_similarity(embedder: TextEmbedder, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """Cosine similarity of ``a[i]`` with ``b[i]`` -> [n]."""
    if len(a) != len(b):
        raise ValueError(f"need texts of equal count, got {len(a)} and {len(b)}")
    ua, ub = list(dict.fromkeys(a)), list(dict.fromkeys(b))
    sims = similarity_matrix(embedder, ua, ub)
    ia, ib = {t: i for i, t in enumerate(ua)}, {t: i for i, t in enumerate(ub)}
    return sims[[ia[t] for t in a], [ib[t] for t in b]]
