"""Step 2: prompts, reply normalisation and validation, the LLM summariser, the consensus
one and the candidate pool."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import numpy as np
import pytest
from fake_openai import FakeOpenAI, Reply

from dnd.backends.llm import CachedChat, ChatReply, ChatRequest, LLMError
from dnd.backends.openai_chat import OpenAIChat, OpenAIChatConfig
from dnd.cache import JsonCache
from dnd.prompting import load_prompt, prompt_dirs
from dnd.settings import SummarizeConfig
from dnd.stages.summarize import (
    VAGUE_LAST_WORDS,
    Candidates,
    ConsensusSummarizer,
    LLMUsage,
    Rejection,
    Summarizer,
    clean_concept,
    concept_problem,
    concepts_in_reply,
    join_candidates,
    split_concepts,
    with_background_variants,
)

# Nothing here may reach the hub (conftest sets this too; kept in case it moves).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

Answer = Callable[[str, str, ChatRequest, int], str]


class ScriptedLLM:
    """An in-process ChatLLM: ``answer(kind, last_user_text, request, j)`` makes reply j of
    each request (kind: the prompt's name, e.g. "summarize_concept")."""

    cache_identity = {"backend": "scripted"}

    def __init__(self, answer: Answer):
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
                texts = [self.answer(kind, r.messages[-1]["content"], r, j) for j in range(r.n)]
                out.append(ChatReply(tuple(texts), prompt_tokens=10, completion_tokens=2 * r.n))
            except LLMError as exc:
                out.append(exc)
        return out

    def requests(self, kind: str) -> list[ChatRequest]:
        return [r for b in self.batches for r in b if r.prompt_version.startswith(kind)]


def listed(text: str) -> list[str]:
    """The captions in a concept request, in the order sent ("1. a red circle")."""
    return [line.split(". ", 1)[1] for line in text.splitlines()[1:]
            if re.match(r"\d+\. ", line)]


def first_caption(kind: str, text: str, request: ChatRequest, j: int) -> str:
    """Concept = the first listed caption; merge = 'merged'."""
    return listed(text)[0] if kind == "summarize_concept" else "merged"


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
        ("A red circle", "red circle"),
        ("The object that appears in almost every image is a red circle.", "red circle"),
        ("Most of the captions mention a green star", "green star"),
        ("All images show striped backgrounds", "striped backgrounds"),
        ("the kitchen sink", "kitchen sink"),
    ],
)
def test_clean_concept(raw, clean):
    assert clean_concept(raw) == clean


@pytest.mark.parametrize(
    "concept, problem",
    [
        ("red circle", None),
        ("ivy-covered brick wall", None),
        ("stripes and dots and rings", None),
        ("black-and-white stripes", None),
        ("pink-white-white-white", "a repeated word"),
        ("green-domed-orange-red-green-red", "a repeated word"),
        ("cyan-blue-green-red", "a hyphen chain"),
        ("blue blue ring", "a repeated word"),
        ("one two three four five six", "more than 5 words"),
        ("42", "no words"),
    ],
)
def test_concept_problem(concept, problem):
    assert concept_problem(concept, max_words=5) == problem


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
    assert any((d / "summarize_concept.v2.yaml").is_file() for d in prompt_dirs())
    for name, field in [("summarize_concept.v2", "captions"), ("merge_concepts.v2", "concepts")]:
        prompt = load_prompt(name)
        assert prompt.id == name and prompt.version == 2 and prompt.fields == {field}
        chat = prompt.messages(**{field: "XYZ {not a field}"})
        assert chat[0]["role"] == "system"
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


def test_one_request_per_unit_answered_t_times():
    llm = ScriptedLLM(first_caption)
    results = Summarizer(llm, SummarizeConfig(num_samples=5)).summarize(UNITS)
    assert len(llm.batches) == 1 and len(llm.batches[0]) == len(UNITS)
    request = llm.batches[0][0]
    assert (request.n, request.temperature, request.sample) == (5, 0.3, 0)
    assert request.stop == ("\n",) and request.max_tokens == 40
    assert request.answer_prefix == "" and request.schema is None  # a plain-reply backend
    assert listed(request.messages[-1]["content"]) == UNITS[0]  # captions whole, numbered
    r0 = results[0]
    assert r0.ok and r0.concepts == ("red circle",) and r0.sources == (("llm",),)
    assert r0.replies == ("a red circle",) * 5 and r0.rejected == ()
    assert r0.usage == LLMUsage(requests=1, prompt_tokens=10, completion_tokens=10, cached=0)
    assert r0.prompt_versions == ("summarize_concept.v3", "merge_concepts.v2")


DEGENERATE = ["pink-white-white-white-white", "cyan-blue-green-red", "blue blue ring",
              "I'm ready to help you with the captions", "beach"]


def test_degenerate_replies_are_rejected_recorded_and_reasked():
    def answer(kind, text, request, j):
        return DEGENERATE[j] if request.sample == 0 else ["Blue ring.", "a blue ring"][j % 2]

    llm = ScriptedLLM(answer)
    result = Summarizer(llm).summarize({4: ["a blue ring on a white background"]})[4]
    first, again = llm.requests("summarize_concept")
    assert again.sample == 1 and again.temperature == 0.7  # a new seed, a warmer draw
    assert result.ok and result.concepts == ("blue ring",)
    assert [r.reason for r in result.rejected] == [
        "a repeated word", "a hyphen chain", "a repeated word",
        "about the task, not the images", "an echo of a prompt example"]
    assert [r.reply for r in result.rejected] == DEGENERATE
    assert result.usage.requests == 2 and len(result.replies) == 10


def test_an_example_answer_is_fine_when_the_captions_say_it():
    def answer(kind, text, request, j):
        return "beach"

    llm = ScriptedLLM(answer)
    result = Summarizer(llm).summarize({0: ["a sandy beach", "people on a beach"]})[0]
    assert result.concepts == ("beach",) and len(llm.batches) == 1


def test_reasks_are_bounded_and_leave_no_candidate():
    llm = ScriptedLLM(lambda kind, text, request, j: "white-white-white")
    result = Summarizer(llm, SummarizeConfig(max_reasks=2)).summarize({0: ["a white wall"]})[0]
    assert [r.sample for r in llm.requests("summarize_concept")] == [0, 1, 2]
    assert result.ok and result.concepts == () and len(result.rejected) == 15
    assert result.usage.requests == 3


def test_comma_list_replies_are_merged_in_one_request():
    def answer(kind, text, request, j):
        if kind == "summarize_concept":
            return "Dogs, puppies" if j < 3 else "Dogs."
        return "Concept: Young Dogs."

    llm = ScriptedLLM(answer)
    result = Summarizer(llm).summarize({2: UNITS[2]})[2]
    (merge,) = llm.requests("merge_concepts")
    assert merge.messages[-1]["content"] == "Concepts: dogs, puppies"
    assert merge.n == 1 and merge.temperature == 0.0
    assert result.concepts == ("young dogs", "dogs")  # 3 votes before 2
    assert result.usage.requests == 2


def test_a_degenerate_merge_reply_counts_the_listed_concepts():
    def answer(kind, text, request, j):
        return "cats, dogs" if kind == "summarize_concept" else "dogs dogs dogs"

    result = Summarizer(ScriptedLLM(answer)).summarize({0: ["a cat and a dog"]})[0]
    assert result.concepts == ("cats",)
    assert result.rejected == (Rejection("dogs dogs dogs", "merge: a repeated word"),)


def test_vague_concepts_get_a_background_variant():
    result = Summarizer(ScriptedLLM(lambda *a: "1. Floral Design.")).summarize({0: ["x"]})[0]
    assert result.concepts == ("floral design", "floral design background")
    assert result.sources == (("llm",), ("background-variant",))


def test_failed_request_fails_the_unit_and_no_captions_is_an_error():
    def answer(kind, text, request, j):
        if "bad" in text:
            raise LLMError("gave up after 6 tries; last error: HTTP 503")
        return "good concept"

    results = Summarizer(ScriptedLLM(answer)).summarize(
        {0: ["fine caption"], 1: ["bad caption"], 3: []})
    assert results[0].concepts == ("good concept",) and results[0].ok
    assert not results[1].ok and "HTTP 503" in results[1].error and results[1].concepts == ()
    assert results[3].error == "no captions"


def test_concepts_ranked_by_votes():
    votes = ["cats", "cows", "Cows.", "birds", "cows"]
    result = Summarizer(ScriptedLLM(lambda k, t, r, j: votes[j])).summarize({5: ["c"]})[5]
    assert result.concepts == ("cows", "cats", "birds")


def test_candidates_and_config_round_trip():
    c = Candidates(3, ("a", "b"), (("llm",), ("consensus",)), ("A",),
                   (Rejection("x x", "a repeated word"),), ("p.v1",), LLMUsage(2, 30, 4, 1),
                   "because", None)
    assert Candidates.from_json(c.to_json()) == c
    cfg = SummarizeConfig(num_samples=3, seed=4)
    assert SummarizeConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        SummarizeConfig(num_samples=0)
    with pytest.raises(ValueError):
        SummarizeConfig(concept_prompt="no-version")
    with pytest.raises(ValueError):
        Summarizer(ScriptedLLM(first_caption)).summarize({-1: ["x"]})


def test_join_candidates_pools_and_names_sources():
    llm = Candidates(0, ("red circle", "circle"), (("llm",), ("llm",)))
    phrases = Candidates(0, ("circle", "red", "background", "dotted"),
                         (("consensus",),) * 4)
    joined = join_candidates(llm, phrases, extra=2)
    assert joined.concepts == ("red circle", "circle", "red", "background")
    assert joined.sources == (("llm",), ("llm", "consensus"), ("consensus",), ("consensus",))
    assert join_candidates(llm, phrases, extra=0).concepts == llm.concepts


def test_rerun_through_cached_server_makes_no_requests(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")

    def script(body, n):
        return Reply(content=listed(body["messages"][-1]["content"])[0])

    with FakeOpenAI(script) as server:
        def run() -> dict[int, Candidates]:
            llm = OpenAIChat(OpenAIChatConfig(model="m", base_url=server.base_url))
            return Summarizer(CachedChat(llm, JsonCache(tmp_path))).summarize(UNITS)

        first = run()
        assert server.count == len(UNITS)  # one request per unit, its T replies as n
        assert {b["n"] for b in server.requests} == {5}
        again = run()
        assert server.count == len(UNITS)
        assert again[0].concepts == first[0].concepts
        assert again[0].usage == LLMUsage(1, first[0].usage.prompt_tokens,
                                          first[0].usage.completion_tokens, cached=1)


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

    summarizer = ConsensusSummarizer(embed=embed, max_candidates=2)
    results = summarizer.summarize({0: captions, 1: RED})
    assert results[0].concepts[0] == "sofa" and len(results[0].concepts) == 2
    assert results[1].concepts[0] == "red circle"  # support still comes first
    assert len(calls) == 1  # one embedding call for all units


def test_consensus_with_only_stopwords_fails_cleanly():
    result = ConsensusSummarizer().summarize({0: ["a photo of the", "an image"]})[0]
    assert not result.ok and result.concepts == ()


def test_degenerate_reply_is_rejected_and_reasked_through_the_fake_server(monkeypatch):
    """Against an OpenAI-compatible server: the first draw of T replies loops, the re-ask
    (a new seed) answers well; both requests carry n, the cap, the schema and the seeds."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")

    def script(body, n):
        if n == 1:
            return Reply(content=["green-red-green-red"] * body["n"])
        return Reply(content=["Green star.", "a green star", "green star", "Stars", "star"])

    with FakeOpenAI(script) as server:
        llm = OpenAIChat(OpenAIChatConfig(model="m", base_url=server.base_url, max_retries=0))
        result = Summarizer(llm).summarize({7: ["a green star on a dotted background"]})[7]
        first, again = server.requests
    assert result.ok and result.concepts[0] == "green star" and "stars" in result.concepts
    assert [r.reason for r in result.rejected] == ["a repeated word"] * 5
    # A server that takes a JSON schema is asked for one (no line stop: JSON may span
    # lines); this one answers plain text anyway, which is read as text.
    assert (first["n"], first["max_tokens"], first["temperature"]) == (5, 40, 0.3)
    assert "stop" not in first and first["response_format"]["type"] == "json_schema"
    assert again["temperature"] == 0.7 and again["seed"] != first["seed"]
    assert result.usage.requests == 2


@pytest.mark.parametrize(
    "reply, concepts",
    [
        ("The object that stands out in almost every caption is a red circle on a dotted "
         "beige background.", ["red circle"]),
        ("The object in nearly every caption is a large orange square, a medium orange "
         "cube, and a small pink diamond.", ["large orange square"]),
        ('The most fitting answer is "a purple diamond and a pink circle on a striped white '
         'background"', ["purple diamond"]),
        ("a yellow triangle on a checkered black background with the word dog",
         ["yellow triangle"]),
        ("dogs, puppies", ["dogs", "puppies"]),
        ("Dogs.", ["dogs"]),
    ],
)
def test_concepts_in_sentence_and_echoed_caption_replies(reply, concepts):
    assert concepts_in_reply(reply, max_words=5) == concepts


@pytest.mark.parametrize(
    "concept, problem",
    [("i'm ready to help you", "about the task, not the images"),
     ("ones", "too vague"), ("different objects", "too vague"), ("dog toys", None)],
)
def test_meta_and_vague_concepts_are_rejected(concept, problem):
    assert concept_problem(concept, max_words=5) == problem
