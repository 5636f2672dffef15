"""Chat backends and the reply cache, against a fake local OpenAI-compatible server."""

from __future__ import annotations

import copy
import json
import os
import time

import pytest
from fake_openai import FakeOpenAI, Reply

from dnd.backends.llm import LLMS, CachedChat, ChatReply, ChatRequest, LLMError, clean_reply
from dnd.backends.local_chat import TransformersChat, TransformersChatConfig
from dnd.backends.openai_chat import OpenAIChat, OpenAIChatConfig
from dnd.cache import JsonCache
from dnd.io import stable_hash

# Set before the tiny-model test imports transformers: nothing may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SECRET = "sk-test-0123456789-very-secret"
USER = [{"role": "user", "content": "hello"}]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def make_llm(server: FakeOpenAI, **settings) -> OpenAIChat:
    defaults = dict(model="fake-model", base_url=server.base_url, max_retries=3,
                    backoff_base=0.01, backoff_max=1.0, timeout=5.0)
    return OpenAIChat(OpenAIChatConfig(**{**defaults, **settings}))


def fail_first(k: int, failure: Reply, then: str = "fine"):
    """A script that answers ``failure`` to the first ``k`` requests, then ``then``."""
    return lambda body, n: failure if n <= k else Reply(content=then)


# ------------------------------------------------------------------- retries


def test_transient_errors_are_retried_until_success():
    with FakeOpenAI(fail_first(2, Reply(status=500))) as server:
        assert make_llm(server).complete(USER, temperature=0.0) == "fine"
        assert server.count == 3


@pytest.mark.parametrize("headers", [{"Retry-After": "0.25"}, {"retry-after-ms": "250"}])
def test_retry_after_header_is_honoured(headers):
    with FakeOpenAI(fail_first(1, Reply(status=429, headers=headers))) as server:
        llm = make_llm(server, backoff_base=0.0)  # the header is the only source of waiting
        start = time.perf_counter()
        assert llm.complete(USER, temperature=0.0) == "fine"
        assert time.perf_counter() - start >= 0.25
        assert server.count == 2


def test_persistent_failure_raises_with_reason_after_bounded_tries():
    with FakeOpenAI(lambda body, n: Reply(status=503)) as server:
        with pytest.raises(LLMError, match=r"after 3 tries.*HTTP 503"):
            make_llm(server, max_retries=2).complete(USER, temperature=0.0)
        assert server.count == 3


def test_client_errors_are_not_retried():
    with FakeOpenAI(lambda body, n: Reply(status=400)) as server:
        with pytest.raises(LLMError, match="HTTP 400"):
            make_llm(server).complete(USER, temperature=0.0)
        assert server.count == 1


def test_timeout_is_retried():
    with FakeOpenAI(fail_first(1, Reply(content="late", delay=1.0))) as server:
        assert make_llm(server, timeout=0.2).complete(USER, temperature=0.0) == "fine"
        assert server.count == 2


@pytest.mark.parametrize(
    "bad",
    [Reply(raw=b'{"choices": [ cut off'), Reply(raw=b"<html>bad gateway</html>"),
     Reply(content=""), Reply(content="  \n "), Reply(content=None),
     Reply(raw=b'{"id": "x", "choices": []}')],
    ids=["truncated-json", "html", "empty", "blank", "null", "no-choices"],
)
def test_malformed_or_empty_replies_are_retried(bad):
    with FakeOpenAI(fail_first(1, bad)) as server:
        assert make_llm(server).complete(USER, temperature=0.0) == "fine"
        assert server.count == 2


def test_complete_many_returns_failures_in_place():
    def script(body, n):
        text = body["messages"][-1]["content"]
        return Reply(status=400) if text == "bad" else Reply(content=text.upper())

    with FakeOpenAI(script) as server:
        requests = [ChatRequest(({"role": "user", "content": t},)) for t in ["a", "bad", "c"]]
        out = make_llm(server).complete_many(requests)
    assert out[0].texts == ("A",) and out[2].texts == ("C",)
    assert isinstance(out[1], LLMError) and "HTTP 400" in str(out[1])


def test_replies_are_cleaned():
    with FakeOpenAI(lambda body, n: Reply(content="  ```\nred circle\n```  ")) as server:
        assert make_llm(server).complete(USER, temperature=0.0) == "red circle"
    assert clean_reply(None) == ""
    assert clean_reply("  dogs \n") == "dogs"


def test_request_carries_model_temperature_and_messages():
    with FakeOpenAI() as server:
        make_llm(server, max_tokens=7).complete(USER, temperature=0.3)
        body = server.requests[0]
    assert body["model"] == "fake-model" and body["temperature"] == 0.3
    assert body["messages"] == USER and body["max_tokens"] == 7
    assert server.auth_headers[0] == f"Bearer {SECRET}"
    assert "n" not in body and "stop" not in body  # only sent when asked for


def test_n_seed_stop_and_token_cap_reach_the_server():
    """What a real server gets for the summariser's T replies from one prompt."""
    request = ChatRequest(tuple(USER), 0.3, "p.v2", sample=1, n=5, max_tokens=24, stop=("\n",))
    with FakeOpenAI(lambda body, n: Reply(content=["a", "b", "c", "d", "e"])) as server:
        (reply,) = make_llm(server, seed=7).complete_many([request])
        body = server.requests[0]
    assert server.count == 1
    assert (body["n"], body["max_tokens"], body["stop"], body["temperature"]) == (
        5, 24, ["\n"], 0.3)
    assert body["seed"] == int(stable_hash([7, 1, 0]), 16) % 2**31
    assert reply.texts == ("a", "b", "c", "d", "e")
    assert reply.prompt_tokens == 1 and reply.completion_tokens == 5  # the server's usage


def test_a_server_ignoring_n_is_asked_again_for_the_rest():
    with FakeOpenAI(lambda body, n: Reply(content=[f"r{n}"])) as server:
        (reply,) = make_llm(server).complete_many([ChatRequest(tuple(USER), 0.3, n=3)])
        seeds = [b["seed"] for b in server.requests]
    assert reply.texts == ("r1", "r2", "r3") and server.count == 3
    assert [b.get("n", 1) for b in server.requests] == [3, 2, 1]
    assert len(set(seeds)) == 3  # each follow-up call gets its own seed


# --------------------------------------------------------------- concurrency


def test_concurrency_is_bounded_and_used():
    with FakeOpenAI(lambda body, n: Reply(content=f"r{n}", delay=0.2)) as server:
        llm = make_llm(server, max_concurrency=4)
        requests = [ChatRequest(({"role": "user", "content": f"q{i}"},)) for i in range(8)]
        start = time.perf_counter()
        out = llm.complete_many(requests)
        elapsed = time.perf_counter() - start
    assert all(isinstance(r, ChatReply) for r in out)
    assert server.max_in_flight == 4
    assert elapsed < 1.0  # two waves of 0.2 s, not eight


# ------------------------------------------------------------------ API key


def test_api_key_never_exposed(tmp_path):
    with FakeOpenAI() as server:
        llm = make_llm(server)
        cached = CachedChat(llm, JsonCache(tmp_path))
        cached.complete(USER, temperature=0.0)
        shown = [repr(llm), str(llm), repr(llm.config), json.dumps(llm.config.to_dict()),
                 json.dumps(llm.cache_identity), repr(cached)]
    assert not any(SECRET in s for s in shown)
    assert not any(SECRET in p.read_text() for p in tmp_path.rglob("*.json"))


@pytest.mark.parametrize("value", [None, "", "  "])
def test_missing_key_is_a_clear_error(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    else:
        monkeypatch.setenv("OPENAI_API_KEY", value)
    with pytest.raises(LLMError, match="OPENAI_API_KEY"):
        OpenAIChat(OpenAIChatConfig(model="m"))


def test_key_variable_name_is_a_setting(monkeypatch):
    monkeypatch.delenv("LOCAL_LLM_KEY", raising=False)
    with pytest.raises(LLMError, match="LOCAL_LLM_KEY"):
        LLMS.create("openai", model="m", api_key_env="LOCAL_LLM_KEY")
    monkeypatch.setenv("LOCAL_LLM_KEY", "anything")
    assert isinstance(LLMS.create("openai", model="m", api_key_env="LOCAL_LLM_KEY"), OpenAIChat)


def test_registry_names():
    assert {"openai", "transformers"} <= set(LLMS.names())


# --------------------------------------------------------------------- cache


def test_cache_hit_means_no_requests(tmp_path):
    requests = [
        ChatRequest(tuple(USER), 0.3, "p.v1", sample=0),
        ChatRequest(tuple(USER), 0.3, "p.v1", sample=1),  # a repeat: its own entry
        ChatRequest(tuple(USER), 0.3, "p.v1", sample=0),  # a duplicate: sent once
        ChatRequest(tuple(USER), 0.3, "p.v2", sample=0),  # another prompt version
    ]
    with FakeOpenAI(lambda body, n: Reply(content=f"reply {n}")) as server:
        first = CachedChat(make_llm(server), JsonCache(tmp_path)).complete_many(requests)
        assert server.count == 3
        again = CachedChat(make_llm(server), JsonCache(tmp_path))
        replayed = again.complete_many(requests)
        assert server.count == 3 and again.hits == 3 and again.misses == 0
    assert [r.texts for r in replayed] == [r.texts for r in first]
    assert all(r.cached for r in replayed) and not any(r.cached for r in first)
    assert [r.completion_tokens for r in replayed] == [r.completion_tokens for r in first]
    texts = [r.text for r in first]
    assert texts[0] == texts[2] and len({texts[0], texts[1], texts[3]}) == 3


def test_cache_key_depends_on_n_cap_and_stop(tmp_path):
    cached = CachedChat(object(), JsonCache(tmp_path))  # type: ignore[arg-type]
    cached.llm = type("L", (), {"cache_identity": {"backend": "x"}})()
    base = ChatRequest(tuple(USER), 0.3, "p.v1")
    keys = {cached.key(r) for r in (base, ChatRequest(tuple(USER), 0.3, "p.v1", n=5),
                                    ChatRequest(tuple(USER), 0.3, "p.v1", max_tokens=9),
                                    ChatRequest(tuple(USER), 0.3, "p.v1", stop=("\n",)))}
    assert len(keys) == 4


def test_cache_key_depends_on_model(tmp_path):
    request = ChatRequest(tuple(USER), 0.0, "p.v1")
    with FakeOpenAI() as server:
        a = CachedChat(make_llm(server, model="a"), JsonCache(tmp_path))
        b = CachedChat(make_llm(server, model="b"), JsonCache(tmp_path))
        assert a.key(request) != b.key(request)
        a.complete_many([request])
        b.complete_many([request])
        assert server.count == 2


def test_failures_are_not_cached(tmp_path):
    with FakeOpenAI(fail_first(1, Reply(status=400))) as server:
        cached = CachedChat(make_llm(server), JsonCache(tmp_path))
        request = ChatRequest(tuple(USER))
        assert isinstance(cached.complete_many([request])[0], LLMError)
        assert cached.complete_many([request])[0].texts == ("fine",)
        assert server.count == 2


class Interrupted(BaseException):
    """Stands in for a kill (KeyboardInterrupt) in the middle of a run."""


def test_interrupted_run_keeps_finished_chunks(tmp_path):
    class DiesOnSecondChunk:
        """Passes requests to the fake server, but the run is killed at the second chunk."""

        cache_identity = {"backend": "dies"}

        def __init__(self, llm):
            self.llm, self.calls = llm, 0

        def complete_many(self, requests):
            self.calls += 1
            if self.calls == 2:
                raise Interrupted
            return self.llm.complete_many(requests)

    requests = [ChatRequest(({"role": "user", "content": f"q{i}"},)) for i in range(4)]
    with FakeOpenAI() as server:
        dying = DiesOnSecondChunk(make_llm(server))
        with pytest.raises(Interrupted):
            CachedChat(dying, JsonCache(tmp_path), chunk_size=2).complete_many(requests)
        assert server.count == 2
        dying.calls = 10  # the re-run is not killed
        again = CachedChat(dying, JsonCache(tmp_path), chunk_size=2)
        assert [r.text for r in again.complete_many(requests)] == ["q0", "q1", "q2", "q3"]
        assert again.hits == 2 and server.count == 4


def test_json_cache_round_trip_and_damage(tmp_path):
    cache = JsonCache(tmp_path)
    key = stable_hash("question")
    assert cache.get(key) is None
    cache.put(key, {"reply": "answer"})
    assert cache.get(key) == {"reply": "answer"}
    path = cache.path(key)
    assert path.parent.name == key[:2]
    path.write_text(path.read_text()[:10])  # cut short, as by a full disk
    assert cache.get(key) is None
    path.write_bytes(b"\xff\xfe\x00")  # not even text
    assert cache.get(key) is None
    path.write_text(json.dumps({"key": "someoneelse", "value": 1}))
    assert cache.get(key) is None
    cache.put(key, [1, 2])  # a damaged entry is simply overwritten
    assert cache.get(key) == [1, 2]
    with pytest.raises(ValueError):
        cache.path("../etc/passwd")
    with pytest.raises(ValueError):
        cache.put(key, None)


# -------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def tiny_chat_model():
    """A random-weight Llama and a word-level tokenizer with a chat template, built offline."""
    pytest.importorskip("torch")
    from tiny_models import tiny_chat_model as build

    return build()


def test_transformers_chat_batches_deterministically(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    chat = TransformersChat(TransformersChatConfig(model="tiny", max_new_tokens=4, batch_size=2),
                            model=model, tokenizer=tokenizer)
    system = {"role": "system", "content": "concept"}
    requests = [ChatRequest((system, {"role": "user", "content": text}), temperature=t)
                for text in ["hello", "caption w1 w2 w3 w4", "w7"] for t in (0.0, 0.7)]
    out = chat.complete_many(requests)
    assert all(isinstance(r, ChatReply) and len(r.text.split()) == 4 for r in out), out
    assert chat.complete_many(requests) == out  # greedy and seeded sampling both repeat
    # Neither left padding nor the batch's other requests change a reply.
    assert chat.complete(requests[2].messages, temperature=0.0) == out[2].text
    assert chat.complete(requests[3].messages, temperature=0.7) == out[3].text
    assert chat.complete(requests[3].messages, temperature=0.7, sample=1) != out[3].text
    assert "tiny" in repr(chat) and chat.cache_identity["backend"] == "transformers"
    # Token counts: the prompt once, every generated token of every reply.
    prompt = tokenizer(chat._render(requests[0].messages), add_special_tokens=False)
    assert out[0].prompt_tokens == len(prompt["input_ids"]) and out[0].completion_tokens == 4


def test_transformers_chat_n_replies_are_seeded_each_and_batch_independent(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    chat = TransformersChat(TransformersChatConfig(model="tiny", max_new_tokens=5, batch_size=3),
                            model=model, tokenizer=tokenizer)
    user = ({"role": "user", "content": "caption w1 w2"},)
    (many,) = chat.complete_many([ChatRequest(user, 1.0, n=4)])
    assert len(many.texts) == 4 and len(set(many.texts)) > 1  # independent draws
    assert many.completion_tokens == 4 * 5
    # With a longer and a shorter prompt in its batch (left padding, each prompt run once
    # for its four rows), every reply is the same.
    longer = ChatRequest(({"role": "user", "content": "w9 w8 w7 w6 w5 w4"},), 1.0, n=4)
    shorter = ChatRequest(({"role": "user", "content": "w9"},), 1.0, n=4)
    assert chat.complete_many([longer, ChatRequest(user, 1.0, n=4), shorter])[1] == many
    (greedy,) = chat.complete_many([ChatRequest(user, 0.0, n=3)])
    assert len(set(greedy.texts)) == 1 and greedy.completion_tokens == 5  # decoded once


def test_transformers_chat_stops_at_a_stop_string_and_never_repeats_a_pair(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    chat = TransformersChat(TransformersChatConfig(model="tiny", max_new_tokens=12),
                            model=model, tokenizer=tokenizer)
    user = ({"role": "user", "content": "hello w3"},)
    words = chat.complete_many([ChatRequest(user)])[0].text.split()
    pairs = list(zip(words, words[1:]))
    assert len(pairs) == len(set(pairs)), words  # no token pair twice in a line
    (cut,) = chat.complete_many([ChatRequest(user, stop=(words[2],))])
    assert cut.text == " ".join(words[:2]) and cut.completion_tokens == 3


def test_line_bigram_block_bans_only_pairs_repeated_within_the_current_line():
    torch = pytest.importorskip("torch")
    from dnd.backends.local_chat import _LineBigramBlock

    block = _LineBigramBlock(start=2, newline_ids=frozenset({9}))
    # prompt [5, 6] | reply 1 2 1 -> after "1", the pair (1, 2) exists: 2 is banned.
    ids = torch.tensor([[5, 6, 1, 2, 1], [5, 6, 1, 2, 9], [1, 1, 7, 7, 7]])
    scores = block(ids, torch.zeros(3, 10))
    assert scores[0].isinf().nonzero().flatten().tolist() == [2]
    assert not scores[1].isinf().any()  # a new line starts afresh
    assert scores[2].isinf().nonzero().flatten().tolist() == [7]  # prompt tokens ignored


def test_transformers_chat_runs_a_shared_prompt_head_once(tiny_chat_model, monkeypatch):
    model, tokenizer = tiny_chat_model
    chat = TransformersChat(TransformersChatConfig(model="tiny", max_new_tokens=3, batch_size=8),
                            model=model, tokenizer=tokenizer)
    head = {"role": "system", "content": " ".join(f"w{i}" for i in range(30))}
    requests = [ChatRequest((head, {"role": "user", "content": text}), temperature=t)
                for text in ["hello", "caption w1 w2 w3 w4 w5", "w7 w8"] for t in (0.0, 0.5)]
    widths = []
    forward = model.forward

    def spy(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    batched = chat.complete_many(requests)
    monkeypatch.undo()
    # Per temperature, one pass over the shared head (the 30-word system turn and more),
    # then passes over the short tails only.
    assert widths[0] > 30 and [w for w in widths if w > 10] == [widths[0]] * 2, widths
    alone = [chat.complete(r.messages, temperature=r.temperature) for r in requests]
    assert [r.text for r in batched] == alone


def test_gumbel_sampler_draws_from_the_tempered_softmax():
    torch = pytest.importorskip("torch")
    from dnd.backends.local_chat import _GumbelSampler

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    temperature, n = 0.5, 4000
    sampler = _GumbelSampler(temperature, list(range(n)), "cpu")
    picks = sampler(None, logits.expand(n, 4)).argmax(dim=1)
    freq = torch.bincount(picks, minlength=4).float() / n
    expected = torch.softmax(logits[0] / temperature, dim=0)
    assert torch.allclose(freq, expected, atol=0.02), (freq, expected)


def test_transformers_chat_folds_system_into_user_when_template_refuses_it(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}" + tokenizer.chat_template
    )
    chat = TransformersChat(TransformersChatConfig(model="tiny", max_new_tokens=2),
                            model=model, tokenizer=strict)
    system, user = {"role": "system", "content": "concept"}, {"role": "user", "content": "w1"}
    assert chat._render((system, user)) == strict.apply_chat_template(
        [{"role": "user", "content": "concept\n\nw1"}], tokenize=False, add_generation_prompt=True)
    assert len(chat.complete([system, user], temperature=0.0).split()) == 2


def test_connection_failures_are_retried_then_reported():
    import socket

    with socket.socket() as s:  # a port nothing listens on: every connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = OpenAIChat(OpenAIChatConfig(model="m", base_url=f"http://127.0.0.1:{port}/v1",
                                      max_retries=2, backoff_base=0.01, backoff_max=0.05,
                                      timeout=2.0))
    with pytest.raises(LLMError, match="after 3 tries") as err:
        llm.complete([{"role": "user", "content": "hi"}], temperature=0.0)
    assert "onnect" in str(err.value)  # the reason names the connection failure
