"""CLIP image-text encoders for scoring (Step 3.4 image products, label similarity).

``ENCODERS.create("open_clip")`` (ViT-B/16, OpenAI weights: the paper's choice) or
``ENCODERS.create("hf_clip")`` (the same model from transformers). Both return L2-normalised
float32 rows, computed in batches that halve on GPU out-of-memory, in eval mode without
gradients. Every tokenizer is checked after loading: offline loads of an uncached model can
silently return an (almost) empty tokenizer, which would encode every text the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image

from dnd.backends.base import (
    ENCODERS,
    check_tokenizer_size,
    normalize_rows,
    resolve_device,
    run_batched,
)
from dnd.preflight import Need, declares_needs, hub_model, open_clip_needs
from dnd.registry import unknown_name_message


class _ClipEncoder:
    """Shared batching and normalisation; subclasses embed one batch of each kind."""

    identity: dict[str, Any]
    batch_size: int

    def _setup(self, device: str | torch.device | None, batch_size: int, net: Any,
               vocab_size: int, source: str) -> None:
        """Settings shared by every CLIP-like encoder (batch_size already checked before the
        model loaded); refuses an empty tokenizer; puts ``net`` in eval mode."""
        check_tokenizer_size(vocab_size, source)
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.model = net.to(self.device).eval()

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised float32 embeddings [n_images, d]."""
        return self._encode(self._image_batch, list(images), "image encoding")

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings [n_texts, d], same space as the images."""
        return self._encode(self._text_batch, [str(t) for t in texts], "text encoding")

    @cached_property
    def dim(self) -> int:
        """Embedding width d (found by encoding one text)."""
        return int(self._text_batch(["a"])[0].shape[0])

    def _encode(self, fn: Callable[[list], list[np.ndarray]], items: list,
                what: str) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = run_batched(fn, items, self.batch_size, what=f"{self.identity['backend']} {what}")
        return normalize_rows(np.stack(rows))

    def _image_batch(self, images: list[Image.Image]) -> list[np.ndarray]:
        """Embeddings (unnormalised) of one batch of images of any mode."""
        raise NotImplementedError

    def _text_batch(self, texts: list[str]) -> list[np.ndarray]:
        raise NotImplementedError


def _rows(features: Any) -> list[np.ndarray]:
    """[n, d] features -> n float32 rows. transformers v5 returns an output object whose
    ``pooler_output`` holds the projected embeddings; older versions and open_clip a tensor."""
    if not isinstance(features, torch.Tensor):
        features = features.pooler_output
    return list(features.detach().float().cpu().numpy())


@ENCODERS.register("open_clip")
class OpenClipEncoder(_ClipEncoder):
    """An open_clip model (``open_clip.list_pretrained()`` lists the (model, pretrained)
    pairs; ``model`` may also be ``"hf-hub:org/repo"`` or ``"local-dir:/path"``).

    Args:
        model, pretrained: open_clip architecture name and weights tag. With
            ``components`` they only name the model in ``identity``.
        device: ``None``/``"auto"`` picks CUDA when present.
        batch_size: images or texts per forward pass (halved on out-of-memory).
        components: a ready ``(model, preprocess, tokenizer)`` as built by
            ``open_clip.create_model_and_transforms`` and ``open_clip.get_tokenizer``.
    """

    def __init__(self, model: str = "ViT-B-16", pretrained: str | None = "openai", *,
                 device: str | torch.device | None = None, batch_size: int = 64,
                 components: tuple[Any, Any, Any] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if components is None:
            components = _load_open_clip(model, pretrained)
        net, self.preprocess, self.tokenizer = components
        self._setup(device, batch_size, net, _open_clip_vocab_size(self.tokenizer), model)
        self.identity: dict[str, Any] = {"backend": "open_clip", "model": model,
                                         "pretrained": pretrained}

    @torch.no_grad()
    def _image_batch(self, images: list[Image.Image]) -> list[np.ndarray]:
        pixels = torch.stack([self.preprocess(img.convert("RGB")) for img in images])
        pixels = pixels.to(self.device)
        return _rows(self.model.encode_image(pixels))

    @torch.no_grad()
    def _text_batch(self, texts: list[str]) -> list[np.ndarray]:
        return _rows(self.model.encode_text(self.tokenizer(texts).to(self.device)))


@declares_needs(ENCODERS, "open_clip")
def _open_clip_needs(model: str = "ViT-B-16", pretrained: str | None = "openai",
                     components: Any = None, **_: Any) -> list[Need]:
    return [] if components is not None else open_clip_needs(
        "encoder open_clip", model, pretrained, "encoder.options.model: local-dir:FOLDER")


def _load_open_clip(model: str, pretrained: str | None) -> tuple[Any, Any, Any]:
    import open_clip

    known = open_clip.list_models()
    if open_clip.factory.parse_model_name(model)[0] is None and model not in known:
        raise ValueError(unknown_name_message("open_clip model", model, known))
    try:
        # Built on the CPU (the encoder moves it); the third item is the eval transform.
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(model)
    except (OSError, RuntimeError) as err:
        raise OSError(
            f"could not load open_clip model {model!r} with weights {pretrained!r}: the "
            f"weights must be downloaded to the cache first (open_clip.list_pretrained() "
            f"lists valid pairs). Cause: {err}"
        ) from err
    return net, preprocess, tokenizer


def _open_clip_vocab_size(tokenizer: Any) -> int:
    # open_clip's own tokenizers have ``vocab_size``; its HFTokenizer wraps a transformers
    # tokenizer as ``.tokenizer``, whose len() counts added tokens too.
    inner = getattr(tokenizer, "tokenizer", None)
    return len(inner) if inner is not None else int(tokenizer.vocab_size)


@ENCODERS.register("hf_clip")
class HFClipEncoder(_ClipEncoder):
    """A transformers ``CLIPModel`` with its ``CLIPImageProcessor`` and ``CLIPTokenizer``.

    Args:
        model_id: hub id or local folder. With ``components`` it only names the model in
            ``identity``.
        device: ``None``/``"auto"`` picks CUDA when present.
        batch_size: images or texts per forward pass (halved on out-of-memory).
        components: a ready ``(model, image_processor, tokenizer)``.
    """

    def __init__(self, model_id: str = "openai/clip-vit-base-patch16", *,
                 device: str | torch.device | None = None, batch_size: int = 64,
                 components: tuple[Any, Any, Any] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if components is None:
            components = _load_hf_clip(model_id)
        net, self.image_processor, self.tokenizer = components
        self._setup(device, batch_size, net, len(self.tokenizer), model_id)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.identity: dict[str, Any] = {"backend": "hf_clip", "model": model_id}

    @torch.no_grad()
    def _image_batch(self, images: list[Image.Image]) -> list[np.ndarray]:
        rgb = [img.convert("RGB") for img in images]
        pixels = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        return _rows(self.model.get_image_features(pixel_values=pixels.to(self.device)))

    @torch.no_grad()
    def _text_batch(self, texts: list[str]) -> list[np.ndarray]:
        # Padding does not change a text's embedding: attention is causal and CLIP pools
        # at the end token, so batched and single texts agree.
        tokens = self.tokenizer(texts, padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        return _rows(self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device)))


@declares_needs(ENCODERS, "hf_clip")
def _hf_clip_needs(model_id: str = "openai/clip-vit-base-patch16", components: Any = None,
                   **_: Any) -> list[Need]:
    return [] if components is not None else [
        hub_model("encoder hf_clip", model_id, option="encoder.options.model_id: FOLDER")]


def _load_hf_clip(model_id: str) -> tuple[Any, Any, Any]:
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    # The tokenizer first: for an uncached model offline it is the part that "loads"
    # empty instead of failing, and the size check says what is wrong.
    tokenizer = CLIPTokenizer.from_pretrained(model_id)
    check_tokenizer_size(len(tokenizer), model_id)
    try:
        image_processor = CLIPImageProcessor.from_pretrained(model_id)
        model = CLIPModel.from_pretrained(model_id)
    except OSError as err:
        raise OSError(
            f"could not load CLIP model {model_id!r}: it must be a local folder or be "
            f"downloaded to the Hugging Face cache first (e.g. `hf download {model_id}`). "
            f"Cause: {err}"
        ) from err
    return model, image_processor, tokenizer
