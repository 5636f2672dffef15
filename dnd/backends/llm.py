"""Chat LLMs: the protocol every chat backend speaks, its registry, and the reply cache.

Every backend speaks the same small protocol (:class:`ChatLLM`): ``complete`` one chat, or
``complete_many`` a batch of :class:`ChatRequest` (a failed request comes back as its
exception, so one bad unit never sinks the others). :class:`CachedChat` wraps any backend
and stores every reply on disk, so a re-run pays nothing. The backends register in
:data:`LLMS`: an OpenAI-compatible server (:mod:`dnd.backends.openai_chat`) and a local
transformers model (:mod:`dnd.backends.local_chat`); :func:`dnd.backends.registered`
imports them all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from dnd.cache import JsonCache
from dnd.io import stable_hash
from dnd.registry import Registry

log = logging.getLogger(__name__)


LLMS = Registry("llm")

Messages = Sequence[Mapping[str, str]]


class LLMError(RuntimeError):
    """A chat request that failed for good; the message says why."""


@dataclass(frozen=True)
class ChatRequest:
    """One chat to complete, ``n`` times.

    ``prompt_version`` (e.g. ``"summarize_concept.v2"``) and ``sample`` only matter to
    caching and seeding: ``sample`` tells apart deliberate repeats of the same chat (a
    re-ask after a rejected reply). ``n`` independent replies are drawn from one prompt
    (OpenAI's ``n``; locally one batch row per reply, each seeded on its own).
    ``max_tokens`` caps each reply (None: the backend's default); generation stops at the
    first of the ``stop`` strings, which is not part of the reply.

    The form of the answer, so that nothing has to be parsed out of a sentence (a backend
    takes only the forms its ``reply_forms`` names; :func:`reply_form` picks one):
    ``answer_prefix`` is the start of the answer, written for the model, which goes on from
    it (the reply is the continuation alone); ``schema`` is a JSON schema the reply must
    follow (structured output; the reply is the JSON text).
    """

    messages: tuple[Mapping[str, str], ...]
    temperature: float = 0.0
    prompt_version: str = ""
    sample: int = 0
    n: int = 1
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    answer_prefix: str = ""
    schema: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not self.messages:
            raise ValueError("a chat request needs at least one message")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.sample < 0:
            raise ValueError(f"sample must be >= 0, got {self.sample}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.answer_prefix and self.schema is not None:
            raise ValueError("a request asks for one answer form: answer_prefix or schema")


# Answer forms a backend may take (``reply_forms``): it continues a prefilled answer, or it
# constrains its reply to a JSON schema.
PREFIX, JSON_SCHEMA = "prefix", "json_schema"


def reply_form(llm: Any) -> str | None:
    """The answer form to ask ``llm`` for: a JSON schema where it takes one, else a
    prefilled answer, else None (a plain reply). Read from ``llm.reply_forms`` (absent:
    none)."""
    forms = getattr(llm, "reply_forms", frozenset())
    return JSON_SCHEMA if JSON_SCHEMA in forms else PREFIX if PREFIX in forms else None


@dataclass(frozen=True)
class ChatReply:
    """The ``n`` replies to one :class:`ChatRequest` and what they cost.

    ``prompt_tokens`` counts the prompt once (as the OpenAI API bills it);
    ``completion_tokens`` sums over the ``n`` replies. ``cached`` is True when the reply
    came from a cache (nothing was paid for it in this run).
    """

    texts: tuple[str, ...]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        if not self.texts:
            raise ValueError("a chat reply needs at least one text")

    @property
    def text(self) -> str:
        """The first reply (the only one when ``n`` is 1)."""
        return self.texts[0]

    def to_dict(self) -> dict[str, Any]:
        return {"texts": list(self.texts), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens}


@runtime_checkable
class ChatLLM(Protocol):
    """What the summariser needs from a chat model."""

    @property
    def cache_identity(self) -> dict[str, Any]:
        """Everything besides the request that decides the reply (backend, model, ...)."""
        ...

    def complete(self, messages: Messages, *, temperature: float, sample: int = 0) -> str:
        """The reply to one chat; raises LLMError when it cannot get one."""
        ...

    def complete_many(self, requests: Sequence[ChatRequest]) -> list[ChatReply | Exception]:
        """Replies in request order; a request that failed yields its exception."""
        ...


def run_concurrently(
    fn: Callable[[ChatRequest], ChatReply], requests: Sequence[ChatRequest], max_concurrency: int
) -> list[ChatReply | Exception]:
    """Call ``fn`` on every request with at most ``max_concurrency`` in flight."""
    if not requests:
        return []

    def guarded(request: ChatRequest) -> ChatReply | Exception:
        try:
            return fn(request)
        except Exception as exc:  # the caller records the unit as failed, with this reason
            return exc

    # Threads rather than asyncio: the work is blocking I/O, and this stays callable from
    # code that already runs an event loop (notebooks).
    with ThreadPoolExecutor(max_workers=min(max_concurrency, len(requests))) as pool:
        return list(pool.map(guarded, requests))


def clean_reply(text: str | None) -> str:
    """Strip whitespace and a pair of wrapping code fences; '' stays ''."""
    text = (text or "").strip()
    if text.startswith("```") and text.endswith("```") and len(text) >= 6:
        text = text[3:-3].strip()
    return text


def complete_one(llm: ChatLLM, messages: Messages, temperature: float, sample: int = 0) -> str:
    """One chat's text through ``llm.complete_many``."""
    (reply,) = llm.complete_many([ChatRequest(tuple(messages), temperature, sample=sample)])
    if isinstance(reply, Exception):
        raise reply
    return reply.text


# --------------------------------------------------------------------------- caching


@dataclass
class CachedChat:
    """Any ``ChatLLM`` with every successful reply cached on disk.

    The key is ``stable_hash`` of the backend's ``cache_identity``, the prompt version,
    the messages and every decoding setting of the request (temperature, sample index,
    ``n``, token cap, stop strings). A reply served from the cache comes back with
    ``cached=True`` and the token counts it cost when it was paid for. Identical requests
    in one batch are sent once. Failures are not cached, so a re-run retries them. Requests
    go to the backend ``chunk_size`` at a time and each chunk is stored as it returns, so a run
    killed half-way keeps what it already paid for.
    """

    llm: ChatLLM
    cache: JsonCache
    chunk_size: int = 256
    hits: int = field(default=0, init=False)
    misses: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def cache_identity(self) -> dict[str, Any]:
        return self.llm.cache_identity

    @property
    def reply_forms(self) -> frozenset[str]:
        return getattr(self.llm, "reply_forms", frozenset())

    def key(self, request: ChatRequest) -> str:
        return stable_hash(
            {
                "llm": self.llm.cache_identity,
                "prompt_version": request.prompt_version,
                "messages": list(request.messages),
                "temperature": request.temperature,
                "sample": request.sample,
                "n": request.n,
                "max_tokens": request.max_tokens,
                "stop": list(request.stop),
                # Only when set, so replies cached before answer forms existed still match.
                **({"answer_prefix": request.answer_prefix} if request.answer_prefix else {}),
                **({"schema": dict(request.schema)} if request.schema is not None else {}),
            },
            length=32,
        )

    def complete(self, messages: Messages, *, temperature: float, sample: int = 0) -> str:
        return complete_one(self, messages, temperature, sample)

    def complete_many(self, requests: Sequence[ChatRequest]) -> list[ChatReply | Exception]:
        keys = [self.key(r) for r in requests]
        known: dict[str, ChatReply | Exception] = {}
        todo: dict[str, ChatRequest] = {}
        for k, r in zip(keys, requests, strict=True):
            if k in known or k in todo:
                continue
            reply = _cached_reply(self.cache.get(k), r.n)
            if reply is not None:
                known[k] = reply
                self.hits += 1
            else:
                todo[k] = r
        self.misses += len(todo)
        pending = list(todo.items())
        for start in range(0, len(pending), self.chunk_size):
            chunk = pending[start : start + self.chunk_size]
            replies = self.llm.complete_many([r for _, r in chunk])
            for (k, r), reply in zip(chunk, replies, strict=True):
                known[k] = reply
                if isinstance(reply, ChatReply):
                    self.cache.put(k, {**reply.to_dict(), "prompt_version": r.prompt_version})
        return [known[k] for k in keys]


def _cached_reply(entry: Any, n: int) -> ChatReply | None:
    """The reply stored in a cache entry, or None when the entry is not a whole one."""
    if not isinstance(entry, dict):
        return None
    texts = entry.get("texts")
    if not (isinstance(texts, list) and len(texts) == n and all(isinstance(t, str)
                                                               for t in texts)):
        return None
    return ChatReply(tuple(texts), int(entry.get("prompt_tokens", 0)),
                     int(entry.get("completion_tokens", 0)), cached=True)
