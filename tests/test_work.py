"""Work counters (dnd.work): on a small run of the hand-weighted colour network with test
models that count their own calls, every counter equals what the models did; a resumed
run that has nothing left to do counts nothing; work.json adds up the invocations."""

from __future__ import annotations

import json

import pytest
from conftest import colour_target
from test_faults import ColourCaptioner
from test_score_stage import ColourGenerator, MeanColourEncoder

from dnd.api import describe
from dnd.backends.factory import Models
from dnd.backends.llm import ChatReply
from dnd.config import RunConfig
from dnd.loading import count_models
from dnd.work import COUNTS, Work


class SelfCounting:
    """Wraps a test model; counts the items of every call of ``method`` by itself."""

    def __init__(self, inner, method):
        self.inner, self.method, self.items = inner, method, 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        def call(items, *a, **kw):
            out = attr(items, *a, **kw)
            self.items += sum(not isinstance(x, Exception) for x in out)
            return out

        return call


class SteppedGenerator(ColourGenerator):
    identity = {"backend": "colour-painter", "steps": 4}  # a diffusion model's steps


class BilledLLM:
    """Names the red unit's concept; every request costs 7 prompt tokens and 3 per reply."""

    cache_identity = {"backend": "billed"}

    def __init__(self):
        self.requests = 0

    def complete_many(self, requests):
        self.requests += len(requests)
        return [ChatReply(("red thing",) * r.n, prompt_tokens=7, completion_tokens=3 * r.n)
                for r in requests]


def test_counters_equal_what_the_models_did_and_a_resume_costs_nothing(colour_probe,
                                                                        tmp_path):
    folder, _, _ = colour_probe
    target = colour_target()
    forwarded = []
    target.module.register_forward_pre_hook(lambda m, inp: forwarded.append(len(inp[0])))
    captioner = SelfCounting(ColourCaptioner(), "caption")
    generator = SelfCounting(SteppedGenerator(), "generate")
    encoder = MeanColourEncoder()
    texts, images = [], []
    encode_texts, encode_images = encoder.encode_texts, encoder.encode_images
    encoder.encode_texts = lambda t: texts.append(len(t)) or encode_texts(t)
    encoder.encode_images = lambda i: images.append(len(i)) or encode_images(i)
    llm = BilledLLM()
    config = RunConfig.from_dict({"model": "colournet", "layer": "pool", "probe": [str(folder)],
                                  "units": "0-1", "crop": {"top_n": 3},
                                  "summarize": {"num_samples": 2}})
    models = Models(captioner=captioner, llm=llm, generator=generator, encoder=encoder)
    res = describe(config, tmp_path / "run", target=target, models=models, progress=False)
    assert res.failed == {} and res.done_now == [0, 1]

    w = res.work
    # forwarded[0] is the layer's one-image shape probe (num_units), before the run counts;
    # then the 20 probe images, the top images' maps, the crops, the generated images
    assert forwarded[:2] == [1, 20] and w.target_images == sum(forwarded[1:])
    assert w.captioned_images == captioner.items > 0
    # one question per unit, answered num_samples times (n = 2): 2 requests, 2 x 7 prompt
    # tokens, 2 x 2 x 3 completion tokens
    assert (w.llm_requests, w.prompt_tokens, w.completion_tokens) == (2, 14, 12)
    assert w.llm_requests == llm.requests
    # "red thing" and its part "red", x Q = 10 each, for both units
    assert w.generated_images == generator.items == 20
    assert w.denoising_steps == 4 * w.generated_images
    assert (w.encoded_images, w.encoded_texts) == (sum(images), sum(texts))
    assert set(w.seconds) == {"captioner", "llm", "generator", "encoder"}

    again = describe(config, tmp_path / "run", target=target, models=models, progress=False)
    assert again.already_done == [0, 1]
    assert again.work.counts() == dict.fromkeys(COUNTS, 0)  # cached activations, no units

    saved = json.loads((tmp_path / "run" / "work.json").read_text())
    assert [e["units_processed"] for e in saved["invocations"]] == [2, 0]
    assert saved["invocations"][0]["work"]["generated_images"] == 20
    assert saved["invocations"][0]["per_unit"]["llm_requests"] == 1.0
    assert saved["total"] == w.counts()


def test_count_models_keeps_identities_and_rejects_unknown_counts():
    work = Work()
    counted = count_models(Models(captioner=ColourCaptioner(), llm=None,
                                  generator=SteppedGenerator(), encoder=MeanColourEncoder()),
                           work)
    assert counted.llm is None and counted.generator.identity["steps"] == 4
    assert counted.captioner.caption([]) == [] and work.captioned_images == 0
    with pytest.raises(KeyError, match="unknown work count 'images'"):
        work.add(images=1)
    assert work.per_unit(0) == {} and work.per_unit(2)["captioned_images"] == 0
