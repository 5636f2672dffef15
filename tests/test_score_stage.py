"""Step 3 end to end on the hand-weighted colour network with a colour 'generator', under
the paper's rule (the evidence rule: tests/test_hidden_units.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import colour_target
from PIL import Image

from dnd.backends.base import CannotRender
from dnd.cache import FeatureCache
from dnd.settings import ScoreConfig
from dnd.stages.score import ConceptScorer, UnitInput, secondary_evidence
from dnd.stages.select import select_concept

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def paper_config(**kw) -> ScoreConfig:
    """Step 3 under the paper's rule, which these tests work through by hand."""
    return ScoreConfig(selection="paper", **kw)


class ColourGenerator:
    """Paints a square of the colour named in the prompt on grey; seed moves the square."""

    identity = {"backend": "colour-painter"}

    def __init__(self):
        self.calls = 0

    def generate(self, requests):
        out = []
        for r in requests:
            self.calls += 1
            name = next((c for c in COLOURS if c in r.prompt), None)
            if "blocked" in r.prompt or ("flaky" in r.prompt and r.seed % 2):
                out.append(Image.new("RGB", (64, 64)))  # a safety checker's all-black image
                continue
            if name is None:
                out.append(CannotRender(f"no colour in {r.prompt!r}"))
                continue
            img = np.full((64, 64, 3), 128, np.uint8)
            rng = np.random.default_rng(r.seed)
            x, y = rng.integers(0, 40, size=2)
            size = 8 + r.seed % 16
            img[y:y + size, x:x + size] = COLOURS[name]
            out.append(Image.fromarray(img))
        return out


class MeanColourEncoder:
    """Embeds images by their mean RGB minus grey, texts by the colour they name."""

    identity = {"backend": "mean-colour"}

    def encode_images(self, images):
        v = np.stack([np.asarray(im, np.float32).reshape(-1, 3).mean(0) - 100 for im in images])
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def encode_texts(self, texts):
        v = np.array([[1.0 if c in t else 0.05 for c in COLOURS] for t in texts])
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def _red_images(n=4):
    ims = []
    for i in range(n):
        img = np.full((64, 64, 3), 128, np.uint8)
        img[10 + i:30 + i, 10:30] = (255, 0, 0)
        ims.append(Image.fromarray(img))
    return ims


def test_red_unit_picks_red_and_cache_makes_reruns_free(tmp_path):
    gen = ColourGenerator()
    stage = ConceptScorer(colour_target(), "pool", "mean", gen, MeanColourEncoder(),
                          FeatureCache(tmp_path), paper_config(images_per_concept=4, beta=2))
    units = [UnitInput(0, ["blue", "red square", "green", "banana"], _red_images()),
             UnitInput(2, ["blue", "green"], _red_images(2))]
    out = stage(units)
    r = out[0]
    assert r.labels[0] == "red square"
    assert r.dropped == {"banana": "no colour in 'a realistic photo of banana'"}
    sel = r.selection
    assert sel.candidates == ("blue", "red square", "green")
    # The red images hold the 4 best ranks (the others give exactly 0 on unit 0).
    red = [i for i, c in enumerate(sel.image_candidate) if c == 1]
    assert sorted(sel.ranks[i] for i in red) == [1, 2, 3, 4]
    assert sel.positions[1] == 0 and sel.weights[1] > 0
    # Unit 2 (blue detector) prefers blue.
    assert out[2].labels[0] == "blue"
    # 4 concepts x 4 seeds, "blue"/"green" shared by both units: 16 requests, not 24.
    assert gen.calls == 16
    again = ConceptScorer(colour_target(), "pool", "mean", gen, MeanColourEncoder(),
                          FeatureCache(tmp_path), paper_config(images_per_concept=4, beta=2))(units)
    assert gen.calls == 16 + 4  # only the unrenderable "banana" is asked again
    assert again[0].selection == sel
    assert len(list(tmp_path.glob("*.jpg"))) == 12  # thumbnails of the renderable images


def test_labels_deduplicated_by_text_similarity(tmp_path):
    stage = ConceptScorer(colour_target(), "pool", "mean", ColourGenerator(), MeanColourEncoder(),
                          FeatureCache(tmp_path), paper_config(images_per_concept=3, beta=2))
    out = stage([UnitInput(0, ["red", "red square", "blue", "green"], _red_images())])[0]
    # "red" and "red square" embed identically (similarity 1 > 0.81): only one is kept, and
    # blue and green have no image in the top-k of the red unit: no secondary label at all.
    assert out.labels in (("red",), ("red square",))
    assert out.interpretability == pytest.approx(1.0, abs=1e-6)


def test_secondary_labels_need_evidence_worked_example():
    """Four candidates, two images each, k = 3. Activations (D_gen order):
    alpha 9, 8 | beta 8.5, 6 | gamma 2, 0.5 | delta 1, 0.2.
    Top-3 images: alpha's two and beta's first, so gamma and delta have weight -1.
    Median over D_gen: (2 + 6) / 2 = 4; alpha's mean 8.5, beta's 7.25:
    beta is (7.25 - 4) / (8.5 - 4) = 0.72 of the way to Label 1.
    Captions naming beta: 2 of 3 (0.67); gamma and delta are named too, but have no
    image in the top-k."""
    acts = [[9, 8], [8.5, 6], [2, 0.5], [1, 0.2]]
    sim = np.array([[0.8, 0.8, 0.6, 0.6, 0.1, 0.1, 0.5, 0.5]])
    sel = select_concept(["alpha", "beta", "gamma", "delta"], acts, sim, k=3, beta=1)
    assert sel.order[:2] == (0, 1) and sel.weights[2] == sel.weights[3] == -1
    captions = ["a beta and an alpha", "betas", "gamma delta alpha"]
    assert secondary_evidence(sel, captions) == (0, 1)
    assert secondary_evidence(sel, captions, min_activation=0.8) == (0,)
    assert secondary_evidence(sel, captions, min_captions=0.7) == (0,)
    assert secondary_evidence(sel, [], min_captions=0.0) == (0, 1)
    assert secondary_evidence(sel, []) == (0,)  # no captions: no evidence


def test_unit_with_only_unrenderable_candidates_gets_a_marked_fallback_label(tmp_path):
    stage = ConceptScorer(colour_target(), "pool", "mean", ColourGenerator(), MeanColourEncoder(),
                          FeatureCache(tmp_path), paper_config(images_per_concept=2))
    out = stage([UnitInput(1, ["banana", "blocked red"], _red_images(2))])[1]
    assert out.labels == ("banana",)
    assert "no candidate could be rendered" in out.fallback
    assert "all-black" in out.dropped["blocked red"]
    assert out.selection is None and out.interpretability is not None


def test_blank_images_are_left_out_and_the_rest_scored(tmp_path):
    stage = ConceptScorer(colour_target(), "pool", "mean", ColourGenerator(), MeanColourEncoder(),
                          FeatureCache(tmp_path), paper_config(images_per_concept=4, beta=1))
    out = stage([UnitInput(0, ["flaky red", "blue"], _red_images())])[0]
    assert out.labels[0] == "flaky red"
    assert len(out.generated["flaky red"]) == 2  # seeds 1 and 3 came back black
    assert out.selection.image_candidate.count(0) == 2


def test_adaptive_selection_screens_then_completes_only_the_contenders(tmp_path):
    """screen_images = 2 of Q = 6, one contender: every candidate is screened on images
    0-1, only the unit's best gets images 2-5; the same unit scored alone or beside another
    gets the same result (a unit uses only what its own evaluation asked for)."""
    def scorer(folder, **kw):
        gen = ColourGenerator()
        cfg = paper_config(images_per_concept=6, beta=2, **kw)
        return gen, ConceptScorer(colour_target(), "pool", "mean", gen, MeanColourEncoder(),
                                  FeatureCache(tmp_path / folder), cfg)

    red = UnitInput(0, ["blue", "red square", "green"], _red_images())
    blue = UnitInput(2, ["green", "blue"], _red_images(2))
    gen, adaptive = scorer("a", screen_images=2, contenders=1, contender_margin=0.0)
    both = adaptive([red, blue])
    r = both[0]
    assert r.labels[0] == "red square"
    assert {c: len(keys) for c, keys in r.generated.items()} == {"blue": 2, "red square": 6,
                                                                "green": 2}
    assert both[2].labels[0] == "blue" and len(both[2].generated["blue"]) == 6
    # 3 concepts x 2 screening images, then 4 more for "red square" and for "blue"
    assert gen.calls == 3 * 2 + 2 * 4
    _, alone = scorer("b", screen_images=2, contenders=1, contender_margin=0.0)
    assert alone([red])[0] == r
    # the full evaluation asks for every image of every candidate; same winner here
    gen, full = scorer("c")
    assert full([red, blue])[0].labels[0] == "red square" and gen.calls == 3 * 6
    with pytest.raises(ValueError, match=r"score.screen_images must be in \[0, "
                                         r"images_per_concept = 6\]"):
        paper_config(images_per_concept=6, screen_images=7)


def test_contenders_without_screening_is_an_error_not_ignored():
    with pytest.raises(ValueError, match=r"score.contenders \(3\) applies only to adaptive"):
        ScoreConfig(contenders=3)
    assert ScoreConfig(screen_images=2, contenders=3).contenders == 3


def test_a_second_contender_needs_a_close_screening_score():
    from dnd.record import Selection

    def screened(final):
        n = len(final)
        order = tuple(sorted(range(n), key=lambda i: -final[i]))
        return Selection(candidates=tuple("abcd"[:n]), rank_score_name="mean", beta=1, k=1,
                         image_candidate=tuple(range(n)), activations=(1.0,) * n,
                         ranks=(1.0,) * n, top_k=(0,), rank_scores=(1.0,) * n,
                         positions=tuple(range(n)), weights=(1.0,) * n,
                         final_scores=tuple(final), order=order)

    def contenders(final, **kw):
        cfg = ScoreConfig(screen_images=2, **kw)
        return ConceptScorer(colour_target(), "pool", "mean", ColourGenerator(),
                             MeanColourEncoder(), None, cfg).contenders(screened(final))

    assert contenders([3.0, 2.5, 1.0]) == ["a", "b"]           # 2.5 >= 0.7 x 3
    assert contenders([3.0, 2.0, 1.0]) == []                   # 2.0 < 2.1: decided
    assert contenders([3.0]) == []                             # nothing to compare
    assert contenders([3.0, 2.9, 2.5], contenders=2) == ["a", "b"]  # c close, but 3rd
    assert contenders([3.0, 2.0, 1.0], contender_margin=0.0) == ["a", "b"]
    assert contenders([1.0, 3.0, 2.9], contenders=3) == ["b", "c"]
    assert contenders([-1.0, -1.0]) == ["a"]                   # no positive best: alone
    assert contenders([-1.0, -1.0], contender_margin=0.0) == ["a", "b"]  # plain top 2
    with pytest.raises(ValueError, match=r"score.contender_margin \(0.5\) applies only"):
        ScoreConfig(contender_margin=0.5)
    with pytest.raises(ValueError, match=r"contender_margin must be in \[0, 1\]"):
        ScoreConfig(screen_images=2, contender_margin=1.5)
