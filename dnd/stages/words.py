"""Words of captions and concepts: what a caption names, and how often a unit's do.

Shared by the candidate stage (which ranks candidates by how many of a unit's captions
name them) and by best-concept selection (where that share is the concept's coverage).
Matching is on content words: function words and captioners' boilerplate are ignored, a
plural 's' is dropped, and a concept is named by a caption when every content word of the
concept occurs in it, in any order ("red ... noisy background" is named by "a red ring on
a noisy black background").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# Function words, plus the boilerplate image captioners put around every subject.
CAPTION_STOPWORDS = frozenset(
    """a an the and or of on in at to for with without from by near over under into onto
    is are was were be being been has have it its this that these those there their his
    her some two three several many other next up down out off top front back side
    image images picture pictures photo photos photograph view close closeup shot
    showing shows shown made looking sitting standing laying lying arafed araffe""".split()
)

WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def stem(word: str) -> str:
    """``word`` without a plural 's' (words of more than 3 letters)."""
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


def content_words(text: str) -> frozenset[str]:
    """The stemmed words of ``text`` that are not :data:`CAPTION_STOPWORDS`."""
    return frozenset(stem(w) for w in WORD.findall(text.lower()) if w not in CAPTION_STOPWORDS)


def said_in(concept: str, texts: Sequence[str]) -> bool:
    """Whether every word of ``concept`` occurs in ``texts`` (a plural 's' aside)."""
    def stems(text: str) -> set[str]:
        return {stem(w) for w in re.findall(r"[a-z]+", text.lower())}

    return stems(concept) <= stems(" ".join(texts))


def coverage(concept: str, captions: Sequence[str]) -> float:
    """The share of ``captions`` that name ``concept`` (every content word of it; 0 for a
    concept without content words, or no captions)."""
    words = content_words(concept)
    if not words or not captions:
        return 0.0
    return sum(words <= content_words(c) for c in captions) / len(captions)


def more_general(general: str, specific: str) -> bool:
    """Whether ``general``'s content words are a proper subset of ``specific``'s ("red" of
    "red star", "red star" of "red star on a noisy background")."""
    g, s = content_words(general), content_words(specific)
    return bool(g) and g < s


# ------------------------------------------------------------------ candidates at levels

# Nouns that name where something is rather than what: they finish a phrase ("noisy
# background") but are no concept alone, nor a part of a conjunction by themselves.
HEAD_NOUNS = frozenset({"background", "backgrounds", "scene", "setting"})


def _words(caption: str) -> list[str]:
    return WORD.findall(caption.lower())


_QUOTED = re.compile(r"[\"\u201c\u201d][^\"\u201c\u201d]*[\"\u201c\u201d]")


def unquoted(caption: str) -> str:
    """The caption without what it quotes: a quoted word is what some text reads ('with the
    word "dog"'), an instance of the text the caption names, not a concept of its own."""
    return _QUOTED.sub(" ", caption)


def _unquoted_words(caption: str) -> list[str]:
    return _words(unquoted(caption))


def _is_content(word: str) -> bool:
    return word not in CAPTION_STOPWORDS


def shared_words(captions: Sequence[str], min_share: float) -> dict[str, int]:
    """Content words (not :data:`HEAD_NOUNS`, not quoted) named by at least ``min_share``
    of ``captions``, with their support (how many captions name them); plural 's' kept as
    the captions write it (the most common form)."""
    support: dict[str, int] = {}
    forms: dict[str, dict[str, int]] = {}
    for caption in captions:
        seen: dict[str, str] = {}
        for w in _unquoted_words(caption):
            if _is_content(w) and w not in HEAD_NOUNS:
                seen.setdefault(stem(w), w)
        for s, w in seen.items():
            support[s] = support.get(s, 0) + 1
            forms.setdefault(s, {})
            forms[s][w] = forms[s].get(w, 0) + 1
    need = max(1, int(np.ceil(min_share * len(captions) - 1e-9)))
    return {max(forms[s], key=lambda w: (forms[s][w], w)): n for s, n in support.items()
            if n >= need}


def conjunction_text(caption: str, first: str, second: str, shared: set[str]) -> str | None:
    """How ``caption`` says ``first`` ... ``second`` (two shared words it names, in its
    order) with the words it names in between that not every caption shares left out:
    ``first``, the shared words between, the last function words before ``second``,
    ``second``, and a head noun that follows it ("a red ring on a noisy black background" ->
    "red on a noisy background"). None when the caption does not name both."""
    words = _words(caption)
    stems = [stem(w) for w in words]
    try:
        i, j = stems.index(stem(first)), stems.index(stem(second))
    except ValueError:
        return None
    if i > j:
        return None
    span = words[i + 1:j]
    between = [w for w in span if stem(w) in shared or w in HEAD_NOUNS]
    # The function words that link to ``second``: the last run of them in the span.
    end = max((k + 1 for k, w in enumerate(span) if not _is_content(w)), default=0)
    start = end
    while start > 0 and not _is_content(span[start - 1]):
        start -= 1
    before = span[start:end]
    tail = next((w for w in words[j + 1:j + 4] if w in HEAD_NOUNS), None)
    out = [words[i], *between, *before, words[j], *([tail] if tail else [])]
    return " ".join(out)


def conjunctions(captions: Sequence[str], shared: Sequence[str], min_share: float
                 ) -> dict[str, int]:
    """Conjunctions of two ``shared`` words that at least ``min_share`` of ``captions``
    name together but not side by side ("red ... noisy": "red on a noisy background"),
    with their support; each worded as most captions word it (:func:`conjunction_text`)."""
    need = max(1, int(np.ceil(min_share * len(captions) - 1e-9)))
    stems = {stem(w) for w in shared}
    out: dict[str, int] = {}
    for a in shared:
        for b in shared:
            if a == b:
                continue
            texts = [t for c in captions
                     if (t := conjunction_text(c, a, b, stems)) is not None]
            if len(texts) < need:
                continue
            adjacent = sum(f" {a} {b} " in f" {' '.join(_words(c))} " for c in captions)
            if adjacent >= need:  # a phrase the captions say as it is, not a conjunction
                continue
            counts: dict[str, int] = {}
            for t in texts:
                counts[t] = counts.get(t, 0) + 1
            best = max(counts, key=lambda t: (counts[t], -len(t), t))
            out[best] = len(texts)
    return out


def parts(concept: str) -> list[str]:
    """The concepts inside a multi-word ``concept``: each content word that is not a head
    noun ("red circle" -> "red", "circle"), and each pair of them as the concept says it
    (:func:`conjunction_text`: "blue square on a striped background" -> "blue square",
    "blue on a striped background", "square on a striped background"). Empty for one
    word; the concept itself is not among them."""
    words = _words(concept)
    content = [w for w in dict.fromkeys(words) if _is_content(w) and w not in HEAD_NOUNS]
    if len(content) + sum(w in HEAD_NOUNS for w in words) < 2:
        return []
    out = list(content)
    for i, a in enumerate(content):
        for b in content[i + 1:]:
            text = conjunction_text(concept, a, b, set())
            if text:
                out.append(text)
    return [p for p in dict.fromkeys(out) if p != " ".join(words)]
