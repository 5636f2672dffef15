"""Tiny toy-world BLIP: vocabulary, committed weights' caption accuracy, training script."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dnd.toyworld import blip  # noqa: E402
from dnd.toyworld.render import render_batch  # noqa: E402

FRESH_SEED = 10_500_000  # held out from training, and not the seeds training.json reports


@pytest.fixture(scope="module")
def captioner():
    return blip.toy_captioner()


@pytest.fixture(scope="module")
def heldout(captioner):
    metrics = blip.caption_accuracy(captioner, 100, FRESH_SEED)
    print(json.dumps(metrics, indent=1))
    return metrics


def test_vocabulary_covers_every_caption_and_loads_whole():
    vocab = blip.build_vocabulary()
    assert (blip.WEIGHTS / "vocab.txt").read_text().split("\n")[:-1] == vocab
    model, processor = blip.load_toy_blip()
    tokenizer = processor.tokenizer
    assert len(tokenizer) == len(vocab) == model.config.text_config.vocab_size
    assert tokenizer.bos_token == "[DEC]"
    assert model.config.text_config.bos_token_id == tokenizer.bos_token_id
    assert model.config.text_config.sep_token_id == tokenizer.sep_token_id
    # Captions of real renders and of crops never fall back to [UNK].
    rng = np.random.default_rng(0)
    for scene in render_batch(range(200)):
        caption = blip.training_sample(scene, rng)[1]
        for text in (scene.caption, caption):
            assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text


def test_parse_caption_reads_first_object_and_background_kind():
    parsed = blip.parse_caption('a large red circle, a small blue star on a striped gray '
                                'background with the word "cat"')
    assert parsed == {"colour": "red", "shape": "circle", "kind": "striped"}
    assert blip.parse_caption("there is an orange ring on a beige background") == {
        "colour": "orange", "shape": "ring", "kind": "plain"}
    assert blip.parse_caption("a red a circle") == {"colour": None, "shape": None, "kind": None}


def test_committed_weights_caption_heldout_renders(heldout):
    # Floors a little under what the committed weights measured (training.json: 0.972
    # images, 0.952 crops, 1.0 background on 500 renders; these 100: 0.92 and 0.93);
    # colour is always right, the misses are shapes (hexagon/circle, square/diamond).
    assert heldout["attribute_accuracy"] >= 0.85, heldout
    assert heldout["background_kind_accuracy"] >= 0.95, heldout
    assert heldout["n_crops"] >= 50
    assert heldout["crop_attribute_accuracy"] >= 0.85, heldout
    trained = json.loads((blip.WEIGHTS / "training.json").read_text())
    assert trained["caption_accuracy"]["attribute_accuracy"] >= 0.95


def test_committed_weights_reach_the_attribute_bar(captioner):
    """The issue's bar: main-object colour + shape named in >= 95% of captions, on the 500
    held-out renders fixed before training (``blip.HELDOUT_START``, the set training.json
    reports)."""
    metrics = blip.caption_accuracy(captioner, 500)
    assert metrics["attribute_accuracy"] >= 0.95, metrics
    assert metrics["background_kind_accuracy"] == 1.0, metrics


def test_captions_identical_batched_and_alone(captioner):
    scenes = render_batch(range(FRESH_SEED, FRESH_SEED + 3))
    # Whole scenes and crops of other sizes: the processor resizes them all to 64 px.
    images = [s.image for s in scenes] + [scenes[0].image.crop((5, 7, 40, 30)),
                                          scenes[1].image.crop((0, 0, 20, 20))]
    batched = captioner.caption(images)
    assert batched == [captioner.caption([im])[0] for im in images]
    assert all(len(c.split()) >= 3 for c in batched), batched


def test_train_blip_two_steps_saves_a_loadable_model(tmp_path):
    out = tmp_path / "toy_blip"
    metrics = blip.train_blip(out, steps=2, seed=1, batch_size=4, n_eval=0)
    assert metrics["steps"] == 2 and np.isfinite(metrics["final_loss"])
    assert (out / "model.safetensors").exists() and (out / "vocab.txt").exists()
    assert json.loads((out / "training.json").read_text())["steps"] == 2
    model, processor = blip.load_toy_blip(out)
    assert len(processor.tokenizer) == model.config.text_config.vocab_size
    # Two steps teach nothing: the accuracy metric must tell this model from a trained one.
    untrained = blip.caption_accuracy(blip.toy_captioner(path=out), 20, FRESH_SEED)
    assert untrained["attribute_accuracy"] < 0.5
    # A continued run starts from the saved weights and renders new scenes.
    more = blip.train_blip(tmp_path / "more", steps=1, batch_size=4, n_eval=0, init=out)
    assert more["train_scene_seeds"] == [8, 12] and more["previous"]["steps"] == 2
