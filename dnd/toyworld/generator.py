"""Text-to-image for the toy world: render scenes that contain the concepts a text names.

The text is grounded in the world's vocabulary (``world.SYNONYMS``): colours, shapes,
background kinds and colours, sizes, the rendered words and "text". Attributes the text
does not name are random. Text that cannot be grounded raises ``CannotRender``; a random
image is never returned in its place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from dnd.backends.base import CannotRender  # raised when the text names nothing drawable
from dnd.toyworld.render import Scene, render_request
from dnd.toyworld.world import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    COLOURS,
    SHAPES,
    SYNONYMS,
    WORDS,
    ObjectRequest,
    SceneRequest,
    pick,
)

# Words that carry no concept: templates ("a realistic image of"), generic nouns, counts.
STOPWORDS = frozenset(
    """a an the of on in at with and or its it is are there this that some several many
    multiple one two three single realistic image images photo photos picture pictures
    drawing rendering render showing shows featuring containing shape shapes object objects
    geometric geometry pattern patterns design designs graphic graphics background
    backgrounds colored coloured color colour colors colours front against inside over
    simple bright dark light""".split()
)
SIZE_WORDS = {"small": "small", "tiny": "small", "little": "small", "medium": "medium",
              "large": "large", "big": "large", "huge": "large"}
MAX_OBJECTS = 3
RENDER_TRIES = 20


@dataclass(frozen=True)
class _Token:
    kind: str  # "colour", "shape", "kind", "bgcolour", "size", "word", "text", "background"
    value: str


def _phrase_table() -> dict[tuple[str, ...], _Token]:
    table: dict[tuple[str, ...], _Token] = {}
    for concept, synonyms in SYNONYMS.items():
        if concept in COLOURS:
            kind = "colour"
        elif concept in SHAPES:
            kind = "shape"
        elif concept in BACKGROUND_KINDS:
            kind = "kind"
        else:
            kind = "text"
        for phrase in synonyms:
            table[tuple(phrase.split())] = _Token(kind, concept)
    for colour in BACKGROUND_COLOURS:
        table[(colour,)] = _Token("bgcolour", colour)
    table[("grey",)] = _Token("bgcolour", "gray")
    for word, size in SIZE_WORDS.items():
        table[(word,)] = _Token("size", size)
    for word in WORDS:
        table[(word,)] = _Token("word", word)
    table[("background",)] = _Token("background", "")
    return table


_PHRASES = _phrase_table()
_LONGEST = max(len(phrase) for phrase in _PHRASES)


def _singular(token: str) -> str:
    for suffix in ("es", "s"):
        if token.endswith(suffix) and (token[: -len(suffix)],) in _PHRASES:
            return token[: -len(suffix)]
    return token


def tokenize(prompt: str) -> tuple[list[_Token], list[str]]:
    """Grounded tokens of ``prompt`` (longest phrase first) and its ungrounded words."""
    words = [_singular(w) for w in re.findall(r"[a-z]+", prompt.lower())]
    tokens, unknown, i = [], [], 0
    while i < len(words):
        for length in range(min(_LONGEST, len(words) - i), 0, -1):
            token = _PHRASES.get(tuple(words[i : i + length]))
            if token is not None:
                if token.kind != "background":
                    tokens.append(token)
                elif tokens and tokens[-1].kind == "colour":
                    # "a red background": object colours are never background colours.
                    raise CannotRender(f"the toy world has no {tokens[-1].value} backgrounds")
                i += length
                break
        else:
            if words[i] not in STOPWORDS:
                unknown.append(words[i])
            i += 1
    return tokens, unknown


def parse_prompt(prompt: str, strict: bool = True) -> tuple[SceneRequest, bool]:
    """Ground ``prompt`` into a scene request; also whether it asks for text without naming
    a word. ``strict``: any ungrounded content word raises ``CannotRender``."""
    tokens, unknown = tokenize(prompt)
    if unknown and (strict or not tokens):
        raise CannotRender(f"cannot ground {', '.join(map(repr, unknown))} in {prompt!r}")
    if not tokens:
        raise CannotRender(f"{prompt!r} names nothing the toy world can draw")

    objects: list[ObjectRequest] = []
    kinds, bg_colours, words = set(), set(), set()
    wants_text = False
    pending = ObjectRequest()  # attributes seen but not yet closed by a shape
    for token, following in zip(tokens, [*tokens[1:], None], strict=True):
        if token.kind == "kind":
            kinds.add(token.value)
        elif token.kind == "bgcolour":
            if following is not None and following.kind == "shape":
                raise CannotRender(f"the toy world has no {token.value} objects")
            bg_colours.add(token.value)
        elif token.kind == "word":
            words.add(token.value)
        elif token.kind == "text":
            wants_text = True
        elif token.kind in ("colour", "size"):
            field = "colour" if token.kind == "colour" else "size"
            if getattr(pending, field) is not None:  # "red blue" = two objects
                objects.append(pending)
                pending = ObjectRequest()
            pending = replace(pending, **{field: token.value})
        else:  # a shape closes the object being described
            objects.append(replace(pending, shape=token.value))
            pending = ObjectRequest()
    if pending != ObjectRequest():
        objects.append(pending)

    for name, found in (("background kinds", kinds), ("background colours", bg_colours),
                        ("words", words)):
        if len(found) > 1:
            raise CannotRender(f"one scene, one of the {name}; {prompt!r} asks {sorted(found)}")
    if len(objects) > MAX_OBJECTS:
        raise CannotRender(f"a scene has at most {MAX_OBJECTS} objects, {prompt!r} names more")
    request = SceneRequest(
        objects=tuple(objects),
        background_kind=next(iter(kinds), None),
        background_colour=next(iter(bg_colours), None),
        text=next(iter(words), None),
    )
    return request, wants_text and not words


class ToyRenderer:
    """Text-to-image backend of the toy world (no model: a grounded renderer).

    ``strict``: raise on any word outside the vocabulary (else ignore such words as long
    as at least one concept is grounded).
    """

    def __init__(self, size: int = 64, strict: bool = True):
        self.size = size
        self.strict = strict

    def generate_scenes(self, prompt: str, n: int, seed: int) -> list[Scene]:
        """``n`` scenes containing what ``prompt`` names; deterministic in (prompt, n, seed)."""
        request, random_word = parse_prompt(prompt, self.strict)
        scenes = []
        for child in np.random.SeedSequence(seed).spawn(n):
            rng = np.random.default_rng(child)
            for _ in range(RENDER_TRIES):
                image_request = replace(request, text=pick(rng, WORDS)) if random_word else request
                scene_seed = int(rng.integers(2**63))
                try:
                    scenes.append(render_request(image_request, scene_seed, self.size))
                    break
                except RuntimeError:  # the requested objects did not fit; other positions
                    continue
            else:
                raise CannotRender(f"cannot fit everything {prompt!r} asks for in one scene")
        return scenes

    def generate(self, prompt: str, n: int, seed: int) -> list[Image.Image]:
        """``n`` RGB images of ``size`` px for ``prompt`` (see ``generate_scenes``)."""
        return [scene.image for scene in self.generate_scenes(prompt, n, seed)]

