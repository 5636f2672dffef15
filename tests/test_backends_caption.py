"""Captioners: a tiny real BLIP taught two captions, the caption stage's dedupe and cache,
and the vision-chat captioner against the local fake server."""

from __future__ import annotations

import pytest
from PIL import Image
from tiny_blip import teach, tiny_blip

from dnd.backends.caption import ChatCaptioner, TransformersCaptioner
from dnd.cache import JsonCache
from dnd.stages.caption import BatchCaptioner, image_hash

RED, BLUE = Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))
CAPTIONS = ["a red square on a green background", "a blue circle"]


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    model, proc = tiny_blip(tmp_path_factory.mktemp("blip"),
                            "a red square on green background blue circle".split())
    loss = teach(model, proc, [RED, BLUE], CAPTIONS, steps=40)
    assert loss < 0.5
    return TransformersCaptioner("tiny-blip", model=model, processor=proc, max_new_tokens=12,
                                 min_length=2, batch_size=2)


def test_blip_captions_what_it_was_taught_in_any_batch_order(blip):
    assert blip.caption([RED, BLUE]) == CAPTIONS
    assert blip.caption([BLUE, RED, RED]) == [CAPTIONS[1], CAPTIONS[0], CAPTIONS[0]]
    assert blip.identity["max_new_tokens"] == 12 and blip.identity["model"] == "tiny-blip"


def test_min_length_forces_longer_captions(blip):
    longer = TransformersCaptioner("tiny-blip", model=blip.model, processor=blip.processor,
                                   max_new_tokens=12, min_length=9)
    assert len(longer.caption([BLUE])[0].split()) > len(CAPTIONS[1].split())


def test_bad_settings_are_clear_errors(blip):
    with pytest.raises(ValueError, match="min_length"):
        TransformersCaptioner("x", model=blip.model, processor=blip.processor,
                              max_new_tokens=3, min_length=5)


class CountingCaptioner:
    identity = {"backend": "count"}

    def __init__(self):
        self.seen = 0

    def caption(self, images):
        self.seen += len(images)
        return [f"{im.getpixel((0, 0))}" for im in images]


def test_caption_stage_dedupes_across_units_and_caches(tmp_path):
    cap = CountingCaptioner()
    stage = BatchCaptioner(cap, JsonCache(tmp_path))
    red_copy = Image.new("RGB", (40, 40), (255, 0, 0))
    out = stage({0: [RED, BLUE], 1: [red_copy, RED]})
    assert out == {0: ["(255, 0, 0)", "(0, 0, 255)"], 1: ["(255, 0, 0)", "(255, 0, 0)"]}
    assert cap.seen == 2  # two distinct images among four
    assert image_hash(RED) == image_hash(red_copy) != image_hash(BLUE)
    again = BatchCaptioner(cap, JsonCache(tmp_path))({5: [BLUE]})
    assert again == {5: ["(0, 0, 255)"]} and cap.seen == 2  # served from the cache


def test_chat_captioner_sends_images_inline(monkeypatch):
    from fake_openai import FakeOpenAI, Reply

    from dnd.backends.openai_chat import OpenAIChat, OpenAIChatConfig

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")

    def script(body, n):
        parts = body["messages"][-1]["content"]
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        return Reply(content=f"  an image of {len(url)} chars\n")

    with FakeOpenAI(script) as server:
        llm = OpenAIChat(OpenAIChatConfig(model="vision", base_url=server.base_url,
                                          max_retries=0))
        caps = ChatCaptioner(llm).caption([RED, BLUE])
        assert len(server.requests) == 2
        body = server.requests[0]
    assert all(c.startswith("an image of ") for c in caps)
    parts = body["messages"][-1]["content"]
    assert parts[0]["type"] == "text" and "Caption" in parts[0]["text"]
    assert parts[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_blip2_returns_only_new_tokens_and_is_batch_independent(tmp_path):
    from tiny_blip import tiny_blip2

    words = "a red square on green background blue circle".split()
    model, proc = tiny_blip2(tmp_path, words)
    # A random model mostly repeats BOS; forbid special tokens so it must emit words.
    model.language_model.generation_config.suppress_tokens = list(range(6))
    cap = TransformersCaptioner("tiny-blip2", kind="blip2", model=model, processor=proc,
                                max_new_tokens=5, min_length=1)
    both = cap.caption([RED, BLUE])
    assert both == [cap.caption([RED])[0], cap.caption([BLUE])[0]]
    for c in both:
        assert "<image>" not in c and 0 < len(c.split()) <= 5
        assert set(c.split()) <= set(words) | {"[UNK]", "[MASK]"}
    assert cap.identity["backend"] == "blip2"
