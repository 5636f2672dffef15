"""Step 2.2-2.4: prompts, reply normalisation, the LLM summariser and the consensus one."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest
from fake_openai import FakeOpenAI, Reply

from dnd.backends.llm import CachedChat, ChatRequest, LLMError, OpenAIChat, OpenAIChatConfig
from dnd.cache import JsonCache
from dnd.stages.summarize import (
    VAGUE_LAST_WORDS,
    Candidates,
    ConsensusConfig,
    ConsensusSummarizer,
    SummarizeConfig,
    Summarizer,
    clean_concept,
    load_prompt,
    prompt_dirs,
    split_concepts,
    with_background_variants,
)

# Nothing here may reach the hub (conftest sets this too; kept in case it moves).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ScriptedLLM:
    """An in-process ChatLLM: ``answer(kind, last_user_text, request)`` makes each reply."""

    cache_identity = {"backend": "scripted"}

    def __init__(self, answer: Callable[[str, str, ChatRequest], str]):
        self.answer = answer
        self.batches: list[list[ChatRequest]] = []

    def complete(self, messages, *, temperature, sample=0):
        raise AssertionError("the summariser must batch through complete_many")

    def complete_many(self, requests):
        self.batches.append(list(requests))
        out = []
        for r in requests:
            kind = r.prompt_version.split(".")[0]
            try:
                out.append(self.answer(kind, r.messages[-1]["content"], r))
            except LLMError as exc:
                out.append(exc)
        return out

    def requests(self, kind: str) -> list[ChatRequest]:
        return [r for b in self.batches for r in b if r.prompt_version.startswith(kind)]


def listed(text: str) -> list[str]:
    """The labels in a concept request, in the order sent."""
    return [line[2:] for line in text.splitlines() if line.startswith("- ")]


def shout(kind: str, text: str, request: ChatRequest) -> str:
    """Simplify = the caption in capitals with a full stop; concept = the first label."""
    if kind == "simplify_caption":
        return f'"{text.removeprefix("Caption: ").upper()}."'
    if kind == "summarize_concept":
        return listed(text)[0]
    return "merged"


# ----------------------------------------------------------------- normalising


@pytest.mark.parametrize(
    "raw, clean",
    [
        ('"Red Circles."', "red circles"),
        ("1. Concept: 'dogs'", "dogs"),
        ("(2) \u201cFloral designs\u201d", "floral designs"),
        ("- Stripes!", "stripes"),
        ("* bullet  point ", "bullet point"),
        ("\u2022 Label: Zebra crossing...", "zebra crossing"),
        ("  Shared concept:  Pizza slices.  ", "pizza slices"),
        ("1.5 mm screws", "1.5 mm screws"),
        ("dog's toy", "dog's toy"),
        ("3D shapes", "3d shapes"),
        ("'.'", ""),
        ("", ""),
    ],
)
def test_clean_concept(raw, clean):
    assert clean_concept(raw) == clean


def test_split_concepts():
    assert split_concepts("Dogs, puppies;\n2. Cats.") == ["dogs", "puppies", "cats"]
    assert split_concepts("  pizza ") == ["pizza"]
    assert split_concepts(" , \n") == []


def test_background_variant_for_vague_last_word():
    assert VAGUE_LAST_WORDS == {"design", "designs", "graphic", "graphics"}
    assert with_background_variants(["floral design", "dogs", "text graphics"], 6) == (
        "floral design", "dogs", "text graphics", "floral design background",
        "text graphics background",
    )
    assert with_background_variants(["zigzag pattern"], 6) == ("zigzag pattern",)
    # The concepts themselves are kept before any variant when the list must be cut.
    many = [f"design {i} design" for i in range(5)]
    assert with_background_variants(many, 6) == (*many, "design 0 design background")


# --------------------------------------------------------------------- prompts


def test_shipped_prompts_load_and_render():
    assert any((d / "summarize_concept.v1.yaml").is_file() for d in prompt_dirs())
    for name, field in [("simplify_caption.v1", "caption"), ("summarize_concept.v1", "captions"),
                        ("merge_concepts.v1", "concepts")]:
        prompt = load_prompt(name)
        assert prompt.id == name and prompt.version == 1 and prompt.fields == {field}
        chat = prompt.messages(**{field: "XYZ {not a field}"})
        assert chat[0]["role"] == "system" and len(prompt.examples) >= 2
        assert [m["role"] for m in chat[1:-1]] == ["user", "assistant"] * len(prompt.examples)
        assert chat[-1]["role"] == "user" and "XYZ {not a field}" in chat[-1]["content"]
        with pytest.raises(ValueError, match="takes fields"):
            prompt.messages(wrong="x")


def test_prompt_loading_errors(tmp_path):
    with pytest.raises(ValueError, match="look like"):
        load_prompt("summarize_concept")
    with pytest.raises(FileNotFoundError):
        load_prompt("nonexistent.v1", tmp_path)
    (tmp_path / "sneaky.v1.yaml").write_text("version: 1\nsystem: s\nuser: '{x.__class__}'\n")
    with pytest.raises(ValueError, match="placeholder"):
        load_prompt("sneaky.v1", tmp_path)
    (tmp_path / "mislabelled.v2.yaml").write_text("version: 1\nsystem: s\nuser: u\n")
    with pytest.raises(ValueError, match="version: 2"):
        load_prompt("mislabelled.v2", tmp_path)


# ------------------------------------------------------------------ summariser

UNITS = {
    0: ["a red circle", "a red ball", "a red apple", "a stop sign"],
    1: ["a red circle", "a red ball", "a blue sky", "a blue car"],
    2: ["a dog", "a puppy"],
}


def test_one_batch_per_round_and_captions_deduplicated():
    llm = ScriptedLLM(shout)
    results = Summarizer(llm, SummarizeConfig(num_samples=5)).summarize(UNITS)
    distinct = {c for caps in UNITS.values() for c in caps}
    assert len(llm.batches) == 2  # simplify, concepts (no reply listed several)
    assert len(llm.batches[0]) == len(distinct) == 8
    assert len(llm.batches[1]) == 5 * len(UNITS)
    assert [r.sample for r in llm.batches[1][:5]] == [0, 1, 2, 3, 4]
    assert all(r.temperature == 0.3 for r in llm.batches[1])
    r0 = results[0]
    assert r0.ok and r0.simplified == ("a red circle", "a red ball", "a red apple", "a stop sign")
    assert 1 <= len(r0.concepts) <= 6 and set(r0.concepts) <= set(r0.simplified)
    assert r0.prompt_versions == ("simplify_caption.v1", "summarize_concept.v1",
                                  "merge_concepts.v1")


def test_shuffles_are_seeded_per_unit_and_deterministic():
    def orders(seed: int) -> dict[int, list[list[str]]]:
        llm = ScriptedLLM(shout)
        Summarizer(llm, SummarizeConfig(seed=seed)).summarize(UNITS)
        out: dict[int, list[list[str]]] = {}
        for r in llm.requests("summarize_concept"):
            owner = next(u for u, caps in UNITS.items()
                         if sorted(listed(r.messages[-1]["content"])) == sorted(caps))
            out.setdefault(owner, []).append(listed(r.messages[-1]["content"]))
        return out

    first, again, other = orders(0), orders(0), orders(1)
    assert first == again
    assert first != other
    assert len({tuple(o) for o in first[0]}) > 1  # the T requests really differ
    assert first[0] != first[1]  # units shuffle independently
    summarizer = Summarizer(ScriptedLLM(shout))
    a, b = summarizer.shuffled_orders(7, 10), Summarizer(ScriptedLLM(shout)).shuffled_orders(7, 10)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(sorted(x) == list(range(10)) for x in a)


def test_comma_list_reply_is_merged():
    def answer(kind, text, request):
        if kind == "simplify_caption":
            return text.removeprefix("Caption: ")
        if kind == "summarize_concept":
            return "Dogs, puppies" if request.sample < 3 else "Dogs."
        return "Concept: Young Dogs."

    llm = ScriptedLLM(answer)
    result = Summarizer(llm).summarize({2: UNITS[2]})[2]
    merges = llm.requests("merge_concepts")
    assert len(merges) == 3 and len(llm.batches) == 3
    assert merges[0].messages[-1]["content"] == "Concepts: dogs, puppies"
    assert result.concepts == ("young dogs", "dogs")  # 3 votes before 2
    assert result.replies.count("Dogs, puppies") == 3


def test_vague_concepts_get_a_background_variant():
    def answer(kind, text, request):
        return "a doodle" if kind == "simplify_caption" else "1. Floral Design."

    result = Summarizer(ScriptedLLM(answer)).summarize({0: ["x", "y"]})[0]
    assert result.concepts == ("floral design", "floral design background")


def test_over_long_and_failed_replies():
    long_reply = "this reply is far too long to be one short concept label"

    def answer(kind, text, request):
        if kind == "simplify_caption":
            if "bad" in text:
                raise LLMError("gave up after 6 tries; last error: HTTP 503")
            return long_reply if "ramble" in text else "short label"
        if "- ramble caption" in text:
            return long_reply
        return "good concept" if request.sample == 0 else long_reply

    results = Summarizer(ScriptedLLM(answer)).summarize(
        {0: ["fine caption"], 1: ["bad caption", "fine caption"], 2: ["ramble caption"], 3: []}
    )
    assert results[0].concepts == ("good concept",) and results[0].ok
    assert not results[1].ok and "HTTP 503" in results[1].error and results[1].concepts == ()
    # An over-long label falls back to the caption; over-long concepts are malformed.
    assert results[2].simplified == ("ramble caption",)
    assert not results[2].ok and "malformed" in results[2].error
    assert results[3].error == "no captions"


def test_concepts_ranked_by_votes():
    votes = ["cats", "dogs", "Dogs.", "birds", "dogs"]

    def answer(kind, text, request):
        return "label" if kind == "simplify_caption" else votes[request.sample]

    result = Summarizer(ScriptedLLM(answer)).summarize({5: ["c"]})[5]
    assert result.concepts == ("dogs", "cats", "birds")


def test_candidates_and_config_round_trip():
    c = Candidates(3, ("a", "b"), ("x",), ("A",), ("p.v1",), None)
    assert Candidates.from_dict(c.to_dict()) == c
    cfg = SummarizeConfig(num_samples=3, seed=4)
    assert SummarizeConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        SummarizeConfig(num_samples=0)
    with pytest.raises(ValueError):
        SummarizeConfig(concept_prompt="no-version")
    with pytest.raises(ValueError):
        Summarizer(ScriptedLLM(shout)).summarize({-1: ["x"]})


def test_rerun_through_cached_server_makes_no_requests(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")

    def script(body, n):
        text = body["messages"][-1]["content"]
        if text.startswith("Caption: "):
            return Reply(content=text.removeprefix("Caption: "))
        return Reply(content=listed(text)[0])

    with FakeOpenAI(script) as server:
        def run() -> dict[int, Candidates]:
            llm = OpenAIChat(OpenAIChatConfig(model="m", base_url=server.base_url))
            return Summarizer(CachedChat(llm, JsonCache(tmp_path))).summarize(UNITS)

        first = run()
        sent = server.count
        assert sent == 8 + 5 * len(UNITS)  # distinct captions + T per unit
        assert run() == first and server.count == sent


# ------------------------------------------------------------------- consensus

RED = [
    "a red circle on a white background",
    "a close up of a red circle",
    "red circle painted on a wall",
    "there is a red circle in the middle of the picture",
    "a large red circle with a black border",
    "a photo of a red circle and a blue square",
    "an image of a red circle on paper",
    "a blue square on a table",
    "a green triangle",
    "a white background with black text",
]


def test_consensus_finds_the_shared_phrase():
    result = ConsensusSummarizer().summarize({0: RED})[0]
    assert result.ok and result.concepts[0] == "red circle"
    assert "red" not in result.concepts and "circle" not in result.concepts  # subsumed
    assert {"white background", "blue square"} <= set(result.concepts)
    assert len(result.concepts) == 6
    assert ConsensusSummarizer().summarize({0: RED})[0] == result


def test_consensus_embedder_orders_equally_supported_phrases():
    captions = ["cat sofa", "dog sofa", "cat rug", "dog rug"]
    assert ConsensusSummarizer().summarize({0: captions})[0].concepts[:4] == (
        "cat", "dog", "rug", "sofa")
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return np.array([[3.0 * ("sofa" in t) + 0.1, "cat" in t, "dog" in t, "rug" in t]
                         for t in texts])

    summarizer = ConsensusSummarizer(ConsensusConfig(max_candidates=2), embed=embed)
    results = summarizer.summarize({0: captions, 1: RED})
    assert results[0].concepts[0] == "sofa" and len(results[0].concepts) == 2
    assert results[1].concepts[0] == "red circle"  # support still comes first
    assert len(calls) == 1  # one embedding call for all units


def test_consensus_with_only_stopwords_fails_cleanly():
    result = ConsensusSummarizer().summarize({0: ["a photo of the", "an image"]})[0]
    assert not result.ok and result.concepts == ()
