"""Image-to-text backends for Step 2: BLIP, BLIP-2, and a vision chat model over an API.

All share the :class:`~dnd.backends.base.Captioner` protocol: ``caption(images) -> list[str]``
plus an ``identity`` for caches. The transformers models are loaded once and batched; a
model that is not downloaded fails at construction with a message naming it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from dnd.backends.base import CAPTIONERS, check_tokenizer_size, resolve_device, run_batched
from dnd.backends.factory import Dependency, declare
from dnd.backends.llm import LLMS
from dnd.preflight import Need, declares_needs, hub_model

BLIP_BASE = "Salesforce/blip-image-captioning-base"
BLIP2_OPT = "Salesforce/blip2-opt-2.7b"


class TransformersCaptioner:
    """BLIP / BLIP-2 captioning with transformers (paper: BLIP base, 32 new tokens, min 5).

    ``model`` and ``processor`` may be passed ready-made (tests, custom checkpoints);
    otherwise ``model_id`` is loaded with ``from_pretrained``. ``prompt`` is an optional
    text prefix for conditional captioning (kept out of the returned caption).
    """

    def __init__(self, model_id: str = BLIP_BASE, *, kind: str = "blip",
                 device: str | torch.device | None = "auto",
                 dtype: str = "auto", batch_size: int = 32, max_new_tokens: int = 32,
                 min_length: int = 5, num_beams: int = 1, prompt: str | None = None,
                 model: Any = None, processor: Any = None):
        if kind not in ("blip", "blip2"):
            raise ValueError(f"kind must be 'blip' or 'blip2', got {kind!r}")
        if min_length > max_new_tokens:
            raise ValueError(f"min_length ({min_length}) > max_new_tokens ({max_new_tokens})")
        self.device = resolve_device(device)
        self.dtype = (torch.float16 if self.device.type == "cuda" else torch.float32) \
            if dtype == "auto" else getattr(torch, dtype)
        if model is None or processor is None:
            model, processor = self._load(model_id, kind)
        check_tokenizer_size(len(processor.tokenizer), model_id)
        self.model = model.to(self.device, self.dtype).eval()
        self.processor = processor
        self.batch_size = batch_size
        self.prompt = prompt
        self.gen_kwargs = {"max_new_tokens": max_new_tokens, "min_length": min_length,
                           "num_beams": num_beams, "do_sample": False}
        self.identity = {"backend": kind, "model": model_id, "prompt": prompt,
                         **self.gen_kwargs}
        # Half-precision weights caption differently (on a GPU "auto" is float16), so the
        # dtype is part of the cache key. Named only when not float32, so float32 runs keep
        # the keys and unit records they had before it was.
        if self.dtype != torch.float32:
            self.identity["dtype"] = str(self.dtype).removeprefix("torch.")

    def _load(self, model_id: str, kind: str):
        import transformers as tf

        model_cls, proc_cls = ((tf.BlipForConditionalGeneration, tf.BlipProcessor)
                               if kind == "blip" else
                               (tf.Blip2ForConditionalGeneration, tf.Blip2Processor))
        try:
            processor = proc_cls.from_pretrained(model_id)
            model = model_cls.from_pretrained(model_id, torch_dtype=self.dtype)
        except OSError as e:
            raise RuntimeError(f"cannot load captioner {model_id!r}: download it first (e.g. "
                               f"`huggingface-cli download {model_id}`) or pass a local "
                               f"path ({e})") from e
        return model, processor

    @torch.no_grad()
    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        kwargs = {"images": [im.convert("RGB") for im in images], "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, **self.gen_kwargs)
        if self.identity["backend"] == "blip2" and not self.model.config.text_config \
                .is_encoder_decoder:
            # A decoder-only language model returns its prompt too: the processor's input ids
            # or, without text, the query-token placeholders plus BOS that generate() builds.
            n_prompt = (inputs["input_ids"].shape[1] if "input_ids" in inputs
                        else self.model.config.num_query_tokens + 1)
            out = out[:, n_prompt:]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        if self.prompt:  # conditional captions start with the prompt; keep only the rest
            texts = [t[len(self.prompt):] if t.startswith(self.prompt) else t for t in texts]
        return [" ".join(t.split()) for t in texts]

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per image; batches halve on GPU out-of-memory."""
        return run_batched(self._caption_batch, list(images), self.batch_size, "captioning")


@CAPTIONERS.register("blip")
@declare(options=TransformersCaptioner, exclude=("kind",))
def _blip(model_id: str = BLIP_BASE, *, device: str | torch.device | None = None,
          **kw: Any) -> TransformersCaptioner:
    return TransformersCaptioner(model_id, kind="blip", device=device, **kw)


@CAPTIONERS.register("blip2")
@declare(options=TransformersCaptioner, exclude=("kind",))
def _blip2(model_id: str = BLIP2_OPT, *, device: str | torch.device | None = None,
           **kw: Any) -> TransformersCaptioner:
    return TransformersCaptioner(model_id, kind="blip2", device=device, **kw)


@declares_needs(CAPTIONERS, "blip")
def _blip_needs(model_id: str = BLIP_BASE, model: Any = None, **_: Any) -> list[Need]:
    # A ready-made model loads nothing.
    return [] if model is not None else [
        hub_model("captioner blip", model_id, option="captioner.options.model_id: FOLDER")]


@declares_needs(CAPTIONERS, "blip2")
def _blip2_needs(model_id: str = BLIP2_OPT, model: Any = None, **_: Any) -> list[Need]:
    return [] if model is not None else [
        hub_model("captioner blip2", model_id, option="captioner.options.model_id: FOLDER")]


def image_data_url(image: Image.Image, max_side: int = 512) -> str:
    """A JPEG ``data:`` URL of ``image`` (longest side at most ``max_side`` px)."""
    im = image.convert("RGB")
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ChatCaptioner:
    """Captions from a vision chat model (e.g. GPT-4o-mini) through a ``ChatLLM`` backend.

    Images are sent inline as data URLs; requests run concurrently under the backend's
    limit and are cached by it. The instruction comes from ``prompts/caption_image.v1.yaml``.
    """

    def __init__(self, llm: Any, *, prompt_name: str = "caption_image.v1", max_side: int = 512,
                 temperature: float = 0.0):
        from dnd.prompting import load_prompt

        self.llm = llm
        self.prompt = load_prompt(prompt_name)
        self.max_side = max_side
        self.temperature = temperature
        # The chat model's identity nested: its own "backend" key must not replace ours.
        self.identity = {"backend": "chat", "llm": dict(llm.cache_identity),
                         "prompt": self.prompt.id, "max_side": max_side,
                         "temperature": temperature}

    def _messages(self, image: Image.Image) -> list[dict]:
        msgs = self.prompt.messages()
        last = msgs[-1]
        msgs[-1] = {"role": last["role"], "content": [
            {"type": "text", "text": last["content"]},
            {"type": "image_url", "image_url": {"url": image_data_url(image, self.max_side)}},
        ]}
        return msgs

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        from dnd.backends.llm import ChatRequest

        requests = [ChatRequest(messages=tuple(self._messages(im)),
                                temperature=self.temperature, prompt_version=self.prompt.id)
                    for im in images]
        replies = self.llm.complete_many(requests)
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return [" ".join(r.text.split()) for r in replies]


@CAPTIONERS.register("chat")
@declare(options=ChatCaptioner, depends_on=(Dependency("llm", LLMS, default="openai"),))
def _chat(llm: Any, *, device: str | torch.device | None = None, **kw: Any) -> ChatCaptioner:
    """Options: ``llm`` (an LLM backend name, default openai) and ``llm_options`` choose the
    chat model, built first (:mod:`dnd.backends.factory`) on the run's device;
    ``device`` is not used here: the captioner itself runs no model."""
    return ChatCaptioner(llm, **kw)
