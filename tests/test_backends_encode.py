"""CLIP encoders (open_clip, transformers) on tiny random-weight models: identities, loading
paths and the empty-tokenizer guard. The contract every registered encoder keeps (shapes,
norms, batched equals single) is in tests/test_contracts.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from tiny_models import tiny_hf_clip, tiny_hf_clip_dir, tiny_open_clip, tiny_open_clip_dir

from dnd.backends.base import ENCODERS
from dnd.backends.encode import HFClipEncoder, OpenClipEncoder

TEXTS = ["a red dog", "a realistic image of blue stripes on a green background", "cat"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> ready components of a tiny model for that encoder."""
    return {"open_clip": tiny_open_clip(tmp_path_factory.mktemp("oc")),
            "hf_clip": tiny_hf_clip(tmp_path_factory.mktemp("hf"))}


def make_encoder(name, built, batch_size=8):
    return ENCODERS.create(name, components=built[name], device="cpu", batch_size=batch_size)


def images() -> list[Image.Image]:
    """Four different images of assorted sizes and modes (the encoders resize and convert)."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), mode="L")
    return [noise, Image.new("RGB", (64, 48), (255, 0, 0)), grey,
            Image.new("RGB", (32, 32), (0, 0, 255))]


def test_identity(built):
    oc = OpenClipEncoder("tiny", None, components=built["open_clip"], device="cpu")
    hf = HFClipEncoder("tiny-hf", components=built["hf_clip"], device="cpu")
    assert oc.identity == {"backend": "open_clip", "model": "tiny", "pretrained": None}
    assert hf.identity == {"backend": "hf_clip", "model": "tiny-hf"}


def test_open_clip_loads_by_name(tmp_path):
    enc = OpenClipEncoder(f"local-dir:{tiny_open_clip_dir(tmp_path)}", None, device="cpu")
    assert enc.encode_texts(TEXTS).shape == (3, 24)
    assert enc.encode_images(images()).shape == (4, 24)


def test_open_clip_unknown_name_lists_close_ones():
    with pytest.raises(ValueError, match="did you mean.*ViT-B-16"):
        OpenClipEncoder("ViT-B-166", device="cpu")


def test_hf_clip_loads_from_a_folder(tmp_path, built):
    loaded = HFClipEncoder(str(tiny_hf_clip_dir(tmp_path)), device="cpu")
    # The builder is seeded, so the saved model equals the fixture's.
    ready = make_encoder("hf_clip", built)
    np.testing.assert_allclose(loaded.encode_texts(TEXTS), ready.encode_texts(TEXTS), atol=1e-5)
    np.testing.assert_allclose(loaded.encode_images(images()), ready.encode_images(images()),
                               atol=1e-5)


def test_empty_tokenizer_is_refused(built):
    from transformers import CLIPTokenizer

    empty = CLIPTokenizer()  # no vocabulary: what an offline load of an uncached id gives
    assert len(empty) < 10
    model, image_processor, _ = built["hf_clip"]
    with pytest.raises(ValueError, match="only .* tokens"):
        HFClipEncoder("x", components=(model, image_processor, empty), device="cpu")
    model, preprocess, _ = built["open_clip"]
    for tok in (SimpleNamespace(tokenizer=empty), SimpleNamespace(vocab_size=2)):
        with pytest.raises(ValueError, match="only .* tokens"):
            OpenClipEncoder("x", components=(model, preprocess, tok), device="cpu")


def test_uncached_hub_id_fails_clearly():
    # HF_HUB_OFFLINE=1 (conftest): the tokenizer of an unknown id "loads" with 2 tokens.
    with pytest.raises(ValueError, match="dnd-tests/no-such-clip"):
        HFClipEncoder("dnd-tests/no-such-clip", device="cpu")
