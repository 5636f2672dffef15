"""Deterministic renderer of toy-world scenes with exact per-concept masks.

Every object and glyph is drawn by painting a boolean numpy mask with one flat colour (no
anti-aliasing), so the masks returned with a scene are exactly the pixels that were painted
and every pixel outside them is background.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dnd.toyworld.world import (
    BACKGROUND_COLOURS,
    COLOURS,
    SHAPES,
    TEXT_CONCEPT,
    TEXT_PROBABILITY,
    WORDS,
    Background,
    ObjectRequest,
    SceneObject,
    SceneRequest,
    SceneSpec,
    SceneText,
    concept_names,
    pick,
    radius_range,
    sample_background,
    size_word,
)

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive
PLACEMENT_TRIES = 200
MARGIN = 2  # free pixels kept between objects so their masks never touch


@dataclass(frozen=True, eq=False)
class Scene:
    """A rendered scene.

    ``image``: PIL RGB, ``size`` x ``size``. ``description``: what was drawn (objects[0] is
    the main object). ``masks``: concept name -> bool array [H, W] for every name of
    ``concept_names()`` (all-False when absent). ``object_masks``: one bool [H, W] per
    object, same order as ``description.objects``.
    """

    image: Image.Image
    description: SceneSpec
    masks: dict[str, np.ndarray]
    object_masks: tuple[np.ndarray, ...]
    caption: str


# ---------------------------------------------------------------------------- masks


def _convex_polygon(dx: np.ndarray, dy: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Pixels inside a convex polygon (vertices counter-clockwise in image coordinates)."""
    inside = np.ones(dx.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        inside &= (x1 - x0) * (dy - y0) - (y1 - y0) * (dx - x0) >= 0
    return inside


def _regular_vertices(n: int, radius: float, start_deg: float) -> np.ndarray:
    angles = np.deg2rad(start_deg + 360.0 / n * np.arange(n))
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def shape_mask(shape: str, center: tuple[int, int], radius: int, size: int) -> np.ndarray:
    """Bool [size, size] mask of ``shape`` centred at ``center`` (x, y) with ``radius`` px."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy, r = xx - center[0], yy - center[1], float(radius)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        arm = 0.3 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "triangle":  # pointing up
        return _convex_polygon(dx, dy, _regular_vertices(3, r, -90.0))
    if shape == "hexagon":
        return _convex_polygon(dx, dy, _regular_vertices(6, r, 0.0))
    if shape == "star":
        # Five-pointed star = inner pentagon + one triangle per spike (all convex).
        outer = _regular_vertices(5, r, -90.0)
        inner = _regular_vertices(5, 0.45 * r, -54.0)
        mask = _convex_polygon(dx, dy, inner)
        for k in range(5):
            spike = np.stack([inner[k - 1], outer[k], inner[k]])
            mask |= _convex_polygon(dx, dy, spike)
        return mask
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


@functools.lru_cache(maxsize=64)
def _glyph_mask(word: str, scale: int) -> np.ndarray:
    """Bool [h, w] pixels of ``word`` in PIL's bitmap font, upscaled by ``scale``."""
    font = ImageFont.load_default_imagefont()  # a bitmap font: glyphs are exact 0/255
    x0, y0, x1, y1 = font.getbbox(word)
    canvas = Image.new("L", (x1, y1))
    ImageDraw.Draw(canvas).text((0, 0), word, fill=255, font=font)
    mask = np.asarray(canvas)[y0:, x0:] > 0
    return np.kron(mask, np.ones((scale, scale), dtype=bool))


def _bbox(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _grow(box: Box, margin: int, size: int) -> Box:
    x0, y0, x1, y1 = box
    return max(0, x0 - margin), max(0, y0 - margin), min(size, x1 + margin), min(size, y1 + margin)


# ---------------------------------------------------------------------------- sampling


def _place_object(
    rng: np.random.Generator, size: int, request: ObjectRequest, is_main: bool,
    occupied: np.ndarray,
) -> tuple[SceneObject, np.ndarray] | None:
    """Sample an object honouring ``request`` whose box avoids ``occupied``; None if no fit."""
    shape = request.shape or pick(rng, SHAPES)
    colour = request.colour or pick(rng, COLOURS)
    lo, hi = radius_range(request.size, is_main)
    fraction = float(rng.uniform(lo, hi))
    radius = max(2, round(fraction * size))
    for _ in range(PLACEMENT_TRIES):
        center = (int(rng.integers(radius, size - radius)),
                  int(rng.integers(radius, size - radius)))
        mask = shape_mask(shape, center, radius, size)
        bbox = _bbox(mask)
        x0, y0, x1, y1 = _grow(bbox, MARGIN, size)
        if not occupied[y0:y1, x0:x1].any():
            obj = SceneObject(shape, colour, size_word(fraction, is_main), center, radius, bbox)
            return obj, mask
    return None


def _place_text(
    rng: np.random.Generator, size: int, word: str, background: Background,
    occupied: np.ndarray,
) -> SceneText | None:
    scale = max(1, size // 64)
    glyphs = _glyph_mask(word, scale)
    h, w = glyphs.shape
    if h >= size or w >= size:
        return None
    # Dark text on light backgrounds and vice versa, so the word is always legible.
    luminance = float(np.mean(BACKGROUND_COLOURS[background.colour][0]))
    colour = (10, 10, 10) if luminance > 100 else (245, 245, 245)
    for _ in range(PLACEMENT_TRIES):
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        x0, y0, x1, y1 = _grow((x, y, x + w, y + h), MARGIN, size)
        if not occupied[y0:y1, x0:x1].any():
            return SceneText(word, colour, (x, y), scale, (x, y, x + w, y + h))
    return None


def sample_spec(
    rng: np.random.Generator, size: int = 64, request: SceneRequest | None = None
) -> SceneSpec:
    """Draw a scene description from ``rng``, honouring ``request`` (None: unconstrained).

    Raises RuntimeError when a requested object or word cannot be placed.
    """
    request = request or SceneRequest()
    background = sample_background(rng, size, request)
    n_objects = max(len(request.objects), 1 + int(rng.integers(3)))
    occupied = np.zeros((size, size), dtype=bool)
    objects = []
    for i in range(n_objects):
        wanted = i < len(request.objects)
        placed = _place_object(
            rng, size, request.objects[i] if wanted else ObjectRequest(), i == 0, occupied
        )
        if placed is None:
            if wanted:
                raise RuntimeError(f"could not place requested object {request.objects[i]}")
            continue  # a random distractor that does not fit is simply left out
        obj, _ = placed
        x0, y0, x1, y1 = obj.bbox
        occupied[y0:y1, x0:x1] = True
        objects.append(obj)

    if request.text is None:
        word = pick(rng, WORDS) if rng.random() < TEXT_PROBABILITY else ""
    else:
        word = request.text
    text = _place_text(rng, size, word, background, occupied) if word else None
    if request.text and text is None:
        raise RuntimeError(f"could not place requested word {request.text!r}")
    return SceneSpec(size, background, tuple(objects), text)


# ---------------------------------------------------------------------------- drawing


def draw_background(background: Background, size: int) -> np.ndarray:
    """uint8 [size, size, 3] background pixels (deterministic given ``background``)."""
    a, b = (np.array(c, dtype=np.float64) for c in BACKGROUND_COLOURS[background.colour])
    yy, xx = np.mgrid[0:size, 0:size]
    p = background.period
    kind = background.kind
    if kind == "plain":
        second = np.zeros((size, size), dtype=bool)
    elif kind == "striped":
        t = {"horizontal": yy, "vertical": xx, "diagonal": xx + yy, "antidiagonal": xx - yy}
        second = (t[background.variant] // (p // 2)) % 2 == 1
    elif kind == "dotted":
        cy, cx = (yy % p) - p / 2 + 0.5, (xx % p) - p / 2 + 0.5
        second = cx**2 + cy**2 <= (0.3 * p) ** 2
    elif kind == "checkered":
        second = ((xx // (p // 2)) + (yy // (p // 2))) % 2 == 1
    elif kind == "gradient":
        t = (xx / (size - 1))[..., None]
        return np.round(a * (1 - t) + b * t).astype(np.uint8)
    elif kind == "noisy":
        noise = np.random.default_rng(background.noise_seed).normal(0.0, 25.0, (size, size, 1))
        return np.clip(np.round(a + noise), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    return np.where(second[..., None], b, a).astype(np.uint8)


def draw(spec: SceneSpec, caption: str = "") -> Scene:
    """Paint ``spec`` and build its concept masks (see ``Scene``)."""
    size = spec.size
    pixels = draw_background(spec.background, size)
    masks = {name: np.zeros((size, size), dtype=bool) for name in concept_names()}
    object_masks = []
    for obj in spec.objects:
        mask = shape_mask(obj.shape, obj.center, obj.radius, size)
        pixels[mask] = COLOURS[obj.colour]
        masks[obj.shape] |= mask
        masks[obj.colour] |= mask
        object_masks.append(mask)
    if spec.text is not None:
        glyphs = _glyph_mask(spec.text.word, spec.text.scale)
        x, y = spec.text.origin
        h, w = glyphs.shape
        masks[TEXT_CONCEPT][y : y + h, x : x + w] = glyphs
        pixels[masks[TEXT_CONCEPT]] = spec.text.colour
    foreground = masks[TEXT_CONCEPT].copy()
    for mask in object_masks:
        foreground |= mask
    masks[spec.background.kind] = ~foreground
    return Scene(Image.fromarray(pixels, "RGB"), spec, masks, tuple(object_masks), caption)


# ---------------------------------------------------------------------------- captions

_TEMPLATES = (
    "{objects} on {background}",
    "a picture of {objects} on {background}",
    "{objects} in front of {background}",
    "there is {objects} on {background}",
)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_phrase(obj: SceneObject, with_size: bool) -> str:
    return _article(f"{obj.size} {obj.label}" if with_size else obj.label)


def _background_phrase(background: Background) -> str:
    if background.kind == "plain":
        return _article(f"{background.colour} background")
    return _article(f"{background.kind} {background.colour} background")


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def compose_caption(
    objects: Iterable[SceneObject], background: Background, word: str | None,
    template: int = 0, with_size: bool = False,
) -> str:
    """Caption from annotations, e.g. 'a red circle and a blue star on a striped gray
    background with the word "cat"'. ``template`` indexes the grammar's sentence forms."""
    phrases = [_object_phrase(obj, with_size) for obj in objects]
    background_phrase = _background_phrase(background)
    if not phrases:
        caption = background_phrase
    else:
        caption = _TEMPLATES[template].format(objects=_join(phrases), background=background_phrase)
    if word:
        caption += f' with the word "{word}"'
    return caption


def caption_region(scene: Scene, box: Box, min_inside: float = 0.5) -> str:
    """Caption of the crop ``box`` = (x0, y0, x1, y1) px (x1/y1 exclusive): the objects
    (and word) with at least ``min_inside`` of their pixels in the box, plus the
    background."""
    x0, y0, x1, y1 = box

    def mostly_inside(mask: np.ndarray) -> bool:
        total = int(mask.sum())
        return total > 0 and mask[y0:y1, x0:x1].sum() >= min_inside * total

    objects = [
        obj
        for obj, mask in zip(scene.description.objects, scene.object_masks, strict=True)
        if mostly_inside(mask)
    ]
    text = scene.description.text
    word = text.word if text is not None and mostly_inside(scene.masks[TEXT_CONCEPT]) else None
    return compose_caption(objects, scene.description.background, word)


# ---------------------------------------------------------------------------- entry points


def render_request(request: SceneRequest | None, seed: int, size: int = 64) -> Scene:
    """Render a random scene honouring ``request``; deterministic in (request, seed, size)."""
    rng = np.random.default_rng(seed)
    spec = sample_spec(rng, size, request)
    # The main object's size word is said in some captions, for variety.
    caption = compose_caption(
        spec.objects,
        spec.background,
        spec.text.word if spec.text else None,
        template=int(rng.integers(len(_TEMPLATES))),
        with_size=bool(rng.random() < 0.5),
    )
    return draw(spec, caption)


def render_scene(seed: int, size: int = 64) -> Scene:
    """Render the toy-world scene of ``seed`` at ``size`` x ``size`` pixels."""
    return render_request(None, seed, size)


def render_batch(seeds: Iterable[int], size: int = 64) -> list[Scene]:
    """``render_scene`` for each seed, in order."""
    return [render_scene(int(seed), size) for seed in seeds]


def images_array(scenes: Iterable[Scene]) -> np.ndarray:
    """uint8 [n, H, W, 3] stack of the scenes' images."""
    return np.stack([np.asarray(scene.image) for scene in scenes])
