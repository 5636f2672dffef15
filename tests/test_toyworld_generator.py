"""Toy-world text-to-image: renders what the text names, refuses what it cannot ground."""

import numpy as np
import pytest

from dnd.toyworld.generator import CannotRender, ToyRenderer, parse_prompt
from dnd.toyworld.world import concept_vocabulary


@pytest.fixture(scope="module")
def renderer():
    return ToyRenderer()


def _labels(scene):
    return [obj.label for obj in scene.description.objects]


def test_renders_the_named_object(renderer):
    scenes = renderer.generate_scenes("a realistic image of a red circle", n=10, seed=0)
    assert len(scenes) == 10
    for scene in scenes:
        assert scene.description.main_object.label == "red circle"
    # Unnamed attributes vary between images.
    assert len({scene.description.background for scene in scenes}) > 1


def test_renders_a_composed_scene(renderer):
    prompt = "a large blue star and a small green ring on a dotted white background"
    for scene in renderer.generate_scenes(prompt, n=5, seed=1):
        spec = scene.description
        assert _labels(scene)[:2] == ["blue star", "green ring"]
        assert spec.main_object.size == "large"
        assert (spec.background.kind, spec.background.colour) == ("dotted", "white")


def test_renders_backgrounds_and_text(renderer):
    for scene in renderer.generate_scenes("striped background", n=5, seed=2):
        assert scene.description.background.kind == "striped"
    for scene in renderer.generate_scenes('the word "hello"', n=5, seed=3):
        assert scene.description.text.word == "hello" and scene.masks["text"].any()
    for scene in renderer.generate_scenes("images with text", n=5, seed=4):
        assert scene.masks["text"].any()


def test_every_synonym_renders_its_concept(renderer):
    for concept, synonyms in concept_vocabulary().items():
        for synonym in synonyms:
            (scene,) = renderer.generate_scenes(f"a realistic image of {synonym}", n=1, seed=5)
            assert scene.masks[concept].any(), (concept, synonym)


def test_plurals_and_colour_lists(renderer):
    request, _ = parse_prompt("red and blue geometric shapes")
    assert [o.colour for o in request.objects] == ["red", "blue"]
    request, _ = parse_prompt("crimson crosses")
    assert (request.objects[0].colour, request.objects[0].shape) == ("red", "cross")


@pytest.mark.parametrize(
    "prompt",
    ["a photo of a banana", "a red banana", "a red background", "a white circle",
     "striped and dotted background", "", "a realistic image of"],
)
def test_cannot_render_raises(renderer, prompt):
    with pytest.raises(CannotRender):
        renderer.generate(prompt, n=2, seed=0)


def test_lenient_mode_ignores_unknown_words_but_not_empty_grounding():
    lenient = ToyRenderer(strict=False)
    (scene,) = lenient.generate_scenes("a red banana", n=1, seed=0)
    assert scene.description.main_object.colour == "red"
    with pytest.raises(CannotRender):
        lenient.generate("a photo of a banana", n=1, seed=0)


def test_generation_is_deterministic_by_seed(renderer):
    a = renderer.generate("a purple hexagon", n=3, seed=11)
    b = renderer.generate("a purple hexagon", n=3, seed=11)
    c = renderer.generate("a purple hexagon", n=3, seed=12)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    assert a[0].size == (64, 64)
