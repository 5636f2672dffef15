"""Text feature visualization of CLIP units and the multimodal check (dnd.textvis): the toy
CLIP stands in for a real CLIP, a hand-weighted red detector for a unit with a known answer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import colour_target

from dnd.config import RunConfig
from dnd.record import UnitRecord
from dnd.report.featurevis import read_unit_texts, textvis_section
from dnd.store import RunStore
from dnd.target import hook_count, load_clip_for_target, load_target
from dnd.textsearch import (
    LMPenalty,
    TextScorer,
    TextVisConfig,
    search_texts,
    unit_directions,
    word_vocabulary,
)
from dnd.textvis import clip_vocabulary, textvis_run
from dnd.toyworld.multimodal import multimodal_check

FAST = TextVisConfig(steps=8, chains=3, proposals=8, top_images=4)


@pytest.fixture(scope="module")
def toy():
    return load_clip_for_target("toyworld-clip")


@pytest.fixture(scope="module")
def vocab(toy):
    return clip_vocabulary(toy)


@pytest.fixture(scope="module")
def scorer(toy):
    return TextScorer(toy.model, toy.tokenizer)


@pytest.fixture(scope="module")
def renders(toy):
    from dnd.toyworld.render import render_batch

    return torch.stack([toy.target.preprocess(s.image) for s in render_batch(range(6))])


# --- the CLIP behind a target ------------------------------------------------------------

def test_the_clip_of_toyworld_clip_is_the_target_dnd_describes(toy, renders):
    assert toy.target.identity == load_target("toyworld-clip").identity
    with torch.no_grad():
        assert torch.allclose(toy.target.module(renders), toy.model.encode_image(renders),
                              atol=1e-5)


def test_a_target_that_is_not_a_clip_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match="needs a CLIP target: toyworld-clip or open_clip:"):
        load_clip_for_target("toyworld-cnn")
    run = tmp_path / "run"
    RunStore(run).save_config(RunConfig(model="toyworld-cnn", layer="fc",
                                        probe=["toyworld:20"], summarizer="consensus"))
    with pytest.raises(ValueError, match="needs a CLIP target.*'toyworld-cnn'"):
        textvis_run(run, "0", FAST, progress=False)


TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 24, "layers": 1,
                            "head_width": 12},
             "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2,
                          "layers": 1}}


def test_a_folder_without_its_tokenizer_or_text_tower_is_refused(tmp_path):
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    model = CLIP(**TINY_CLIP)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CLIP, "preprocess_cfg": {"size": 32, "mean": [0.5] * 3,
                                                    "std": [0.25] * 3}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "open_clip_model.safetensors"))
    name = f"open_clip:local-dir:{tmp_path}"
    # open_clip falls back to CLIP's own 49,408-token tokenizer: not this text tower's.
    with pytest.raises(ValueError, match="has 49408 tokens, the model's text tower 64"):
        load_clip_for_target(name)
    tower = tmp_path / "visual.safetensors"
    save_file({k: v.contiguous() for k, v in model.visual.state_dict().items()}, str(tower))
    with pytest.raises(ValueError, match="only an image tower.*whole CLIP checkpoint"):
        load_clip_for_target(name, str(tower))


@pytest.mark.slow
def test_an_open_clip_name_gives_its_clip_and_the_describe_target():
    clip = load_clip_for_target("open_clip:RN50/openai", "none")
    assert clip.target.identity == load_target("open_clip:RN50/openai", "none").identity
    words = word_vocabulary(clip.tokenizer)
    assert len(words) > 30000 and {"red", "circle", "dog"} <= set(words)
    assert TextScorer(clip.model, clip.tokenizer).short


def test_the_vocabulary_is_whole_words_the_tower_was_trained_on(toy, vocab):
    words = word_vocabulary(toy.tokenizer)
    # BPE merge pieces are whole-word tokens, but never a word of a training caption.
    assert {"red", "circle", "eaturing"} <= set(words)
    assert {"red", "circle", "crimson", "background"} <= set(vocab)
    assert "eaturing" not in vocab and "plain" not in vocab
    ids = toy.tokenizer(vocab)
    assert ((ids > 1).sum(1) == 1).all()  # one token each (0, 1: start and end of text)


def test_short_texts_are_embedded_as_encode_text_does(toy, scorer):
    texts = ["a red circle", "striped", "a picture of a blue star on a gray background"]
    assert scorer.short
    with torch.no_grad():
        full = toy.model.encode_text(toy.tokenizer(texts), normalize=True)
    assert torch.allclose(scorer.embed(texts), full, atol=1e-5)


# --- directions --------------------------------------------------------------------------

def test_a_unit_of_the_embedding_writes_its_basis_vector(toy, renders):
    d = unit_directions(toy.target, "attnpool", [3, 60], renders, torch.zeros(2, 1))
    assert torch.equal(d, torch.eye(64)[[3, 60]])


def test_a_direction_is_the_units_contribution_to_the_embedding(toy, renders):
    # Central differences of the embedding when unit u's output is scaled by 1 +- eps.
    target, u, eps = toy.target, 17, 1e-2
    top = torch.tensor([[0, 2, 5]])
    d = unit_directions(target, "layer3", [u], renders, top)[0]

    def scaled(s):
        def hook(_m, _i, out):
            out = out.clone()
            out[:, u] *= s
            return out
        h = target.layer("layer3").register_forward_hook(hook)
        with torch.no_grad():
            e = target.module(renders[top[0]])
        h.remove()
        return e

    numeric = ((scaled(1 + eps) - scaled(1 - eps)) / (2 * eps)).mean(0)
    assert torch.allclose(d, numeric, atol=2e-3 * float(numeric.abs().max()) + 1e-5)
    assert hook_count(target.module) == 0
    assert all(p.requires_grad for p in target.module.parameters())


# --- the search --------------------------------------------------------------------------

def test_the_best_objective_never_decreases(scorer, vocab):
    dirs = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    for r in search_texts(scorer, dirs, [0, 1, 2], vocab, FAST):
        assert len(r.history) == FAST.steps + 1
        assert all(b >= a for a, b in zip(r.history, r.history[1:], strict=False))
        assert r.history[0] == pytest.approx(r.seed_score)
        assert r.texts[0][1] == pytest.approx(r.history[-1])
        assert len(r.texts) == FAST.top_k and r.texts == sorted(r.texts, key=lambda t: -t[1])
        assert all(1 <= len(t.split()) <= FAST.max_words for t, _ in r.texts)


def test_the_search_finds_a_prompt_whose_embedding_is_the_direction(scorer, vocab):
    prompt = "a crimson disc"
    target = scorer.embed([prompt])                               # cos(prompt) = 1
    (r,) = search_texts(scorer, target, [0], vocab, TextVisConfig(steps=20, max_words=3))
    best_text, best = r.texts[0]
    assert best > 0.95 and best > r.seed_score + 0.1, r.texts
    # Its reported score is the objective of the text as written.
    assert float(scorer.embed([best_text])[0] @ target[0]) == pytest.approx(best, abs=1e-5)


def test_a_units_texts_do_not_depend_on_the_units_sharing_its_batch(scorer, vocab):
    dirs = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    together = search_texts(scorer, dirs, [5, 6, 7], vocab, FAST)
    alone = search_texts(scorer, dirs[1:2], [6], vocab, FAST)
    assert [t for t, _ in together[1].texts] == [t for t, _ in alone[0].texts]
    np.testing.assert_allclose(together[1].history, alone[0].history, atol=1e-6)


def test_the_language_model_penalty_is_subtracted(toy, scorer, vocab):
    from transformers import GPT2Config, GPT2LMHeadModel

    from dnd.toyworld.clip import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    lm = LMPenalty(GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1,
                                              n_head=2, n_positions=64)), tok)
    cfg = TextVisConfig(steps=3, chains=2, proposals=4, lm_weight=0.5)
    with pytest.raises(ValueError, match="needs a language model"):
        search_texts(scorer, torch.ones(1, 64), [0], vocab, cfg)
    (r,) = search_texts(scorer, torch.ones(1, 64), [0], vocab, cfg, lm=lm)
    texts = [t for t, _ in r.texts]
    cos = (scorer.embed(texts) @ torch.nn.functional.normalize(torch.ones(64), dim=0)).numpy()
    np.testing.assert_allclose([s for _, s in r.texts], cos - 0.5 * lm(texts), atol=1e-5)
    np.testing.assert_allclose(r.cosines, cos, atol=1e-5)


def test_bad_settings_are_refused_naming_the_setting():
    with pytest.raises(ValueError, match="max_words"):
        TextVisConfig(max_words=0)
    with pytest.raises(ValueError, match="explore"):
        TextVisConfig(explore=1.5)


# --- the multimodal check ----------------------------------------------------------------

def test_a_red_detector_responds_to_red_things_not_to_the_word_red():
    # ColourNet's unit 0 fires only on pure red pixels; written words are black or white.
    (r,) = multimodal_check(colour_target(), "pool", [0], {0: "red"}, n=6, n_control=24)
    assert r.concept == "red" and r.object > 0.01
    assert r.control == 0 and r.word == 0 and r.other_word == 0
    assert r.object_z > 1 and r.word_z == 0 and not r.both
    assert r.object_z == pytest.approx((r.object - r.control) / r.spread)


def test_the_multimodal_check_on_the_toy_clip_gives_sane_numbers(toy):
    # layer4 unit 3 detects red (average precision 0.71 over 2,000 probing renders).
    (r, free) = multimodal_check(toy.target, "layer4", [3, 3], {3: "red"}, n=8, n_control=32)
    assert r.concept == "red" and r.spread > 0
    assert all(np.isfinite([r.object, r.word, r.control, r.other_word]))
    assert r.object > r.control and r.object_z > 1
    assert isinstance(r.both, bool)
    assert free.concept == "red"  # given the concept, the unit keeps it


# --- a run's units and the report section -------------------------------------------------

def test_textvis_run_saves_resumes_and_the_section_escapes_text(tmp_path):
    run = tmp_path / "run"
    store = RunStore(run)
    store.save_config(RunConfig(model="toyworld-clip", layer="layer4", probe=["toyworld:40"],
                                summarizer="consensus"))
    cfg = TextVisConfig(steps=2, chains=2, proposals=4, top_images=4)
    with pytest.raises(ValueError, match="no unit records"):
        textvis_run(run, None, cfg, multimodal=False, progress=False)
    store.write_unit(UnitRecord.from_json({"layer": "layer4", "unit": 3,
                                           "model": "toyworld-clip", "stage": "labels",
                                           "labels": ["red things"]}))
    out = textvis_run(run, None, cfg, multimodal=False, progress=False)
    assert (out["done"], out["skipped"]) == (1, 0)
    data = read_unit_texts(run, "layer4", 3)
    assert data["unit"] == 3 and len(data["texts"]) == cfg.top_k and data["multimodal"] is None
    assert textvis_run(run, "3", cfg, multimodal=False, progress=False)["done"] == 0
    assert textvis_run(run, "3-4", cfg, multimodal=False, progress=False)["done"] == 1
    assert textvis_section(run, "layer4", 9) == ""

    data["texts"][0]["text"] = "<script>x</script> & co"
    data["multimodal"] = {"unit": 3, "concept": "<b>red</b>", "object": 1.0, "word": 0.2,
                          "control": 0.1, "other_word": 0.15, "spread": 0.4, "object_z": 2.25,
                          "word_z": 0.12, "both": False}
    (store.featurevis_dir("layer4", "texts") / "3.json").write_text(json.dumps(data))
    html = textvis_section(run, "layer4", 3)
    assert "&lt;script&gt;x&lt;/script&gt; &amp; co" in html and "<script>" not in html
    assert "&lt;b&gt;red&lt;/b&gt;" in html and "does not respond to both" in html


@pytest.mark.slow
def test_smollm2_prefers_a_sentence_to_its_words_shuffled():
    from dnd.textsearch import load_lm_penalty

    lm = load_lm_penalty()
    nll = lm(["a red circle on a white background", "background circle white on a red a"])
    assert nll[0] < nll[1] - 1


@pytest.mark.slow
def test_the_benchmark_judges_top_texts_and_checks_every_unit():
    from dnd.benchmarks.textvis import textvis_bench, textvis_bench_lines

    r = textvis_bench(300, TextVisConfig(steps=4), layers=("attnpool",))
    e = r["layers"]["attnpool"]
    assert e["units"] and all(x["monotone"] for x in e["units"])
    assert sum(x["top1"] for x in e["units"]) > sum(x["chance"] for x in e["units"])
    assert e["multimodal"]["concepts"] == 22
    text = "\n".join(textvis_bench_lines(r, "dnd bench textvis"))
    assert "Regenerate: `dnd bench textvis`" in text and "| attnpool | " in text


def test_dnd_featurevis_options_decide_when_texts_are_computed(tmp_path):
    import argparse

    from dnd.textvis import add_cli_arguments, run_cli

    p = argparse.ArgumentParser()
    for a in ("run_dir", "--units", "--layer", "--device"):
        p.add_argument(a)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    add_cli_arguments(p)
    run = tmp_path / "run"
    RunStore(run).save_config(RunConfig(model="toyworld-cnn", layer="fc",
                                        probe=["toyworld:20"], summarizer="consensus"))
    assert run_cli(p.parse_args([str(run)]), "toyworld-cnn") is None
    with pytest.raises(ValueError, match="needs a CLIP target"):
        run_cli(p.parse_args([str(run), "--texts", "yes"]), "toyworld-cnn")
    args = p.parse_args([str(run), "--text-words", "2", "--lm-weight", "0.5"])
    assert (args.text_words, args.lm_weight, args.no_multimodal) == (2, 0.5, False)


@pytest.mark.slow
def test_a_toyworld_clip_run_checks_the_concept_its_label_names(tmp_path):
    run = tmp_path / "run"
    store = RunStore(run)
    store.save_config(RunConfig(model="toyworld-clip", layer="layer4", probe=["toyworld:40"],
                                summarizer="consensus"))
    store.write_unit(UnitRecord.from_json({"layer": "layer4", "unit": 3,
                                           "model": "toyworld-clip", "stage": "labels",
                                           "labels": ["crimson blobs"]}))
    textvis_run(run, None, TextVisConfig(steps=2, top_images=4), progress=False)
    mm = read_unit_texts(run, "layer4", 3)["multimodal"]
    assert mm["concept"] == "red" and mm["object_z"] > 1
    assert "Multimodal check: red" in textvis_section(run, "layer4", 3)
