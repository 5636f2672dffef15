"""Toy-world renderer: exact masks, determinism, captions, vocabulary."""

import numpy as np
import pytest

from dnd.toyworld.render import caption_region, draw_background, render_batch, render_scene
from dnd.toyworld.world import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    COLOURS,
    SHAPES,
    TEXT_CONCEPT,
    WORDS,
    concept_names,
    concept_vocabulary,
)

SEEDS = range(200)


@pytest.fixture(scope="module")
def scenes():
    return render_batch(SEEDS)


def test_world_is_as_large_as_promised(scenes):
    assert len(SHAPES) >= 8 and len(COLOURS) >= 8 and 3 <= len(WORDS) <= 5
    seen_kinds = {s.description.background.kind for s in scenes}
    seen_counts = {len(s.description.objects) for s in scenes}
    assert seen_kinds == set(BACKGROUND_KINDS)
    assert seen_counts == {1, 2, 3}
    assert any(s.description.text is not None for s in scenes)
    assert {s.description.background.variant for s in scenes} >= {"horizontal", "vertical"}


def test_masks_are_exactly_the_painted_pixels(scenes):
    for scene in scenes:
        pixels = np.asarray(scene.image)
        spec = scene.description
        objects = np.zeros(pixels.shape[:2], dtype=bool)
        for obj, mask in zip(spec.objects, scene.object_masks, strict=True):
            assert mask.any()
            assert (pixels[mask] == COLOURS[obj.colour]).all()
            ys, xs = np.nonzero(mask)
            assert obj.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert not (objects & mask).any(), "objects must not overlap"
            objects |= mask
        text = scene.masks[TEXT_CONCEPT]
        assert text.any() == (spec.text is not None)
        if spec.text is not None:
            assert (pixels[text] == spec.text.colour).all()
        # Everything outside the objects and the word is the background, pixel for pixel.
        background = draw_background(spec.background, spec.size)
        outside = ~(objects | text)
        assert (pixels[outside] == background[outside]).all()
        assert (scene.masks[spec.background.kind] == outside).all()
        # A colour's mask is exactly the pixels of that colour: backgrounds never produce it.
        for colour, rgb in COLOURS.items():
            assert (scene.masks[colour] == (pixels == rgb).all(-1)).all(), colour
        for shape in SHAPES:
            expected = np.zeros_like(objects)
            for obj, mask in zip(spec.objects, scene.object_masks, strict=True):
                if obj.shape == shape:
                    expected |= mask
            assert (scene.masks[shape] == expected).all()
        assert set(scene.masks) == set(concept_names())


def test_main_object_is_the_largest(scenes):
    for scene in scenes:
        areas = [int(m.sum()) for m in scene.object_masks]
        assert areas[0] == max(areas)
        assert scene.description.main_object.size in ("medium", "large")


def test_circle_mask_has_the_area_of_a_disc():
    scene = next(s for s in render_batch(range(100)) if s.description.main_object.shape == "circle")
    radius = scene.description.main_object.radius
    assert scene.object_masks[0].sum() == pytest.approx(np.pi * radius**2, rel=0.05)


def test_render_is_deterministic_by_seed():
    a, b, c = render_scene(7), render_scene(7), render_scene(8)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.caption == b.caption and a.description == b.description
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_larger_renders_show_the_same_scene():
    small, large = render_scene(3), render_scene(3, size=128)
    assert large.image.size == (128, 128)
    assert [o.label for o in small.description.objects] == [
        o.label for o in large.description.objects
    ]


def test_caption_names_the_main_object_and_background(scenes):
    for scene in scenes:
        main = scene.description.main_object
        assert main.label in scene.caption
        assert scene.description.background.colour in scene.caption
    assert len({s.caption.split(" ")[0] for s in scenes}) > 1, "captions should vary"


def test_caption_region_describes_what_the_crop_contains(scenes):
    for scene in scenes[:50]:
        main = scene.description.main_object
        caption = caption_region(scene, main.bbox)
        assert caption.startswith(f"a {main.label}") or caption.startswith(f"an {main.label}")
        others = [o for o in scene.description.objects[1:] if o.label != main.label]
        for obj in others:
            assert obj.label not in caption
    scene = scenes[0]
    assert caption_region(scene, (0, 0, 0, 0)).endswith(
        f"{scene.description.background.colour} background"
    )
    assert caption_region(scene, (0, 0, 64, 64)).count(scene.description.main_object.label) >= 1


def test_background_palette_is_disjoint_from_object_colours():
    tones = {tone for pair in BACKGROUND_COLOURS.values() for tone in pair}
    assert not tones & set(COLOURS.values())


def test_vocabulary_lists_every_concept_with_synonyms():
    vocabulary = concept_vocabulary()
    assert list(vocabulary) == concept_names()
    for name, synonyms in vocabulary.items():
        assert synonyms[0] == name and len(synonyms) >= 2
    assert "crimson" in vocabulary["red"] and "stripes" in vocabulary["striped"]
