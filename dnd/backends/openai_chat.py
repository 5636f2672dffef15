"""The ``openai`` chat backend: any OpenAI-compatible server (OpenAI, vLLM, Ollama, LM Studio).

Requests go out concurrently (``max_concurrency``), each retried with exponential backoff
on rate limits and server errors (a Retry-After header wins); a reply asked for in a form
the server refuses (a JSON schema) is asked again plainly, with a warning. The API key is
read from the environment (``api_key_env``), never from a config.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from dnd.backends.factory import declare
from dnd.backends.llm import (
    JSON_SCHEMA,
    LLMS,
    ChatReply,
    ChatRequest,
    LLMError,
    Messages,
    clean_reply,
    run_concurrently,
)
from dnd.io import stable_hash

log = logging.getLogger(__name__)

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
