"""The toy world's vocabulary and its scene descriptions (what to draw, not how).

A scene is a background (a kind such as "striped" plus a colour) with 1-3 objects (shape,
colour, size) and, sometimes, one short rendered word. Object colours and background
colours come from disjoint palettes, so an object never vanishes into its background and a
colour concept always means "object pixels of that colour".

Sampling is split from drawing (``render.py``) so that the same sampler serves both random
scenes (``render_scene(seed)``) and scenes constrained by text (``generator.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Object colours: saturated RGB, far from every background tone (checked by a test).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 210),
    "blue": (40, 70, 220),
    "purple": (140, 50, 190),
    "pink": (245, 120, 190),
}
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon",
)
# Background colours: (main tone, second tone used by patterned kinds).
BACKGROUND_COLOURS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "white": ((235, 235, 235), (175, 175, 175)),
    "black": ((20, 20, 20), (85, 85, 85)),
    "gray": ((128, 128, 128), (80, 80, 80)),
    "brown": ((120, 80, 40), (170, 125, 80)),
    "beige": ((220, 200, 160), (165, 145, 110)),
}
BACKGROUND_KINDS: tuple[str, ...] = (
    "plain", "striped", "dotted", "checkered", "gradient", "noisy",
)
STRIPE_ORIENTATIONS: tuple[str, ...] = ("horizontal", "vertical", "diagonal", "antidiagonal")
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "hello", "toy")
TEXT_CONCEPT = "text"

# Object radius as a fraction of the image side. The main object is always clearly the
# largest (the target CNN classifies it), the others are small distractors.
MAIN_RADIUS = (0.19, 0.32)
SMALL_RADIUS = (0.08, 0.13)
LARGE_ABOVE = 0.26  # main objects with radius fraction >= this are called "large"
TEXT_PROBABILITY = 0.3

# Synonyms per concept, the concept's own name first. Used by the text-to-image parser and
# by evaluation code that must recognise a concept in a free-text description.
SYNONYMS: dict[str, list[str]] = {
    "red": ["red", "crimson", "scarlet"],
    "orange": ["orange", "amber", "tangerine"],
    "yellow": ["yellow", "golden", "lemon"],
    "green": ["green", "emerald", "lime"],
    "cyan": ["cyan", "turquoise", "teal", "aqua"],
    "blue": ["blue", "azure", "cobalt"],
    "purple": ["purple", "violet", "lavender"],
    "pink": ["pink", "rose", "magenta"],
    "circle": ["circle", "disc", "disk", "round disc", "round shape", "circular"],
    "square": ["square", "block", "rectangle", "square shape"],
    "triangle": ["triangle", "triangular", "pyramid shape"],
    "star": ["star", "pentagram", "star shape"],
    "cross": ["cross", "plus sign", "plus"],
    "ring": ["ring", "donut", "doughnut", "hoop", "annulus"],
    "diamond": ["diamond", "rhombus", "lozenge"],
    "hexagon": ["hexagon", "hexagonal", "honeycomb cell"],
    "plain": ["plain", "solid", "uniform", "flat"],
    "striped": ["striped", "stripes", "stripy", "lines", "lined"],
    "dotted": ["dotted", "dots", "polka dots", "spotted", "spots"],
    "checkered": ["checkered", "checkerboard", "chequered", "checks", "grid"],
    "gradient": ["gradient", "fading", "shaded"],
    "noisy": ["noisy", "noise", "grainy", "speckled", "textured"],
    TEXT_CONCEPT: ["text", "word", "letters", "writing", "lettering"],
}


def concept_names() -> list[str]:
    """Every concept that has a mask in a rendered scene: shapes, colours, kinds, "text"."""
    return [*SHAPES, *COLOURS, *BACKGROUND_KINDS, TEXT_CONCEPT]


def concept_vocabulary() -> dict[str, list[str]]:
    """Concept name -> synonyms (name first), for every concept of ``concept_names()``."""
    return {name: list(SYNONYMS[name]) for name in concept_names()}


@dataclass(frozen=True)
class Background:
    """Background kind and colour; ``variant`` is the stripe orientation (else "")."""

    kind: str
    colour: str
    variant: str = ""
    period: int = 8  # pattern period in pixels (stripes, dots, checks)
    noise_seed: int = 0  # seeds the "noisy" texture so a scene renders identically twice


@dataclass(frozen=True)
class SceneObject:
    """One drawn object. ``center``/``radius`` in pixels; ``bbox`` = (x0, y0, x1, y1), x1/y1
    exclusive, of its exact mask; ``size`` is "small", "medium" or "large"."""

    shape: str
    colour: str
    size: str
    center: tuple[int, int]
    radius: int
    bbox: tuple[int, int, int, int]

    @property
    def label(self) -> str:
        """"red circle"-style name, the target CNN's class name for a main object."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class SceneText:
    """A rendered word; ``origin`` is the top-left corner given to the font, in pixels."""

    word: str
    colour: tuple[int, int, int]
    origin: tuple[int, int]
    scale: int
    bbox: tuple[int, int, int, int]


@dataclass(frozen=True)
class SceneSpec:
    """A full scene description: everything needed to draw it, and its annotations.

    ``objects[0]`` is the main (largest) object.
    """

    size: int
    background: Background
    objects: tuple[SceneObject, ...]
    text: SceneText | None = None

    @property
    def main_object(self) -> SceneObject:
        return self.objects[0]


@dataclass(frozen=True)
class ObjectRequest:
    """Constraints on one object; ``None`` fields are sampled."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None  # "small" / "medium" / "large"


@dataclass(frozen=True)
class SceneRequest:
    """Constraints on a scene; ``None`` fields and missing objects are sampled.

    ``objects[0]`` constrains the main object. ``text`` is None (random), "" (no text), or
    a word to render.
    """

    objects: tuple[ObjectRequest, ...] = field(default_factory=tuple)
    background_kind: str | None = None
    background_colour: str | None = None
    text: str | None = None


def size_word(radius_fraction: float, is_main: bool) -> str:
    """Name of an object's size from its radius as a fraction of the image side."""
    if not is_main:
        return "small"
    return "large" if radius_fraction >= LARGE_ABOVE else "medium"


def radius_range(size: str | None, is_main: bool) -> tuple[float, float]:
    """Radius fraction range for a requested size word (None: the default range)."""
    if not is_main:
        return SMALL_RADIUS
    lo, hi = MAIN_RADIUS
    if size == "large":
        return (LARGE_ABOVE, hi)
    if size in ("medium", "small"):  # a main object is never "small"; medium is closest
        return (lo, LARGE_ABOVE - 1e-6)
    return (lo, hi)


def pick(rng: np.random.Generator, options) -> str:
    """One uniformly drawn element of ``options`` (a sequence or dict keys)."""
    options = list(options)
    return options[int(rng.integers(len(options)))]


def sample_background(rng: np.random.Generator, size: int, request: SceneRequest) -> Background:
    """A random background honouring the request's kind/colour."""
    kind = request.background_kind or pick(rng, BACKGROUND_KINDS)
    colour = request.background_colour or pick(rng, BACKGROUND_COLOURS)
    variant = pick(rng, STRIPE_ORIENTATIONS) if kind == "striped" else ""
    # Periods scale with the image so a 128-px scene looks like an upsampled 64-px one.
    period = int(rng.choice([6, 8, 10])) * max(1, size // 64)
    return Background(kind, colour, variant, period, int(rng.integers(2**31)))
