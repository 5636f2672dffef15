"""Small protocols for the swappable models of Steps 2-3, their registries, and batching.

Every backend exposes ``identity`` (a JSON-able dict: backend name, model id, settings that
change outputs) used in cache keys, so a cached caption or image is never reused for a
different model or setting. Backends are created by name from their registry:
``CAPTIONERS.create("blip", device="cuda")``; every factory takes the keyword ``device``
(local models go there, API clients accept and ignore it). A run builds them with
:func:`dnd.backends.factory.build`, which checks the options first. Also here: the one
device resolver (:func:`resolve_device`) and the empty-tokenizer check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
from PIL import Image

from dnd.errors import ConfigError
from dnd.registry import Registry

log = logging.getLogger(__name__)

CAPTIONERS = Registry("captioner")
GENERATORS = Registry("generator")
ENCODERS = Registry("encoder")


class CannotRender(ValueError):
    """A generator cannot ground this prompt (e.g. the toy world has no bananas)."""


@dataclass(frozen=True)
class GenRequest:
    """One image to generate: the full prompt text and its seed."""

    prompt: str
    seed: int


@runtime_checkable
class Captioner(Protocol):
    identity: dict[str, Any]

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per RGB image, in order."""
        ...


@runtime_checkable
class Generator(Protocol):
    identity: dict[str, Any]

    def generate(self, requests: Sequence[GenRequest]) -> list[Image.Image | Exception]:
        """One RGB image per request, in order; a prompt it cannot render yields
        :class:`CannotRender` in its place (the others still come back)."""
        ...


@runtime_checkable
class ImageTextEncoder(Protocol):
    identity: dict[str, Any]

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised float32 embeddings [n_images, d]."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings [n_texts, d], same space as the images."""
        ...


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The one device resolver of dnd. ``None``/``"auto"`` -> CUDA when present, else CPU;
    anything else must be a device this machine has: ``cuda`` without a GPU, ``cuda:N``
    beyond the count, ``mps`` off Apple silicon or a misspelt name raise a ConfigError
    naming it and the alternatives."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a device name: use auto, cpu, cuda, "
                          "cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r}: this machine has no usable CUDA GPU "
                              "(torch.cuda.is_available() is False); use --device cpu, or "
                              "auto to take a GPU when there is one")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {str(device)!r}: this machine has {count} CUDA "
                              f"device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {str(device)!r}: Apple MPS is not available on this "
                              "machine; use --device cpu or auto")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ConfigError(f"device {str(device)!r} is not available on this machine; use "
                              "auto, cpu, cuda, cuda:N or mps")
    return dev


# An offline load of an uncached model can "succeed" with a near-empty tokenizer instead of
# raising (DESIGN.md): CLIPTokenizer comes back with 2 tokens, BertTokenizer with its 5
# special tokens. Ten separates those from every real vocabulary, down to the word-level
# ones of the tiny test models (13 tokens and up); real models have tens of thousands.
MIN_TOKENS = 10


def check_tokenizer_size(size: int, source: str) -> None:
    """Raise ValueError when a loaded tokenizer of ``source`` (a model id or folder) holds
    fewer than ``MIN_TOKENS`` tokens: its files did not load."""
    if size < MIN_TOKENS:
        raise ValueError(
            f"the tokenizer of {source!r} has only {size} tokens: it did not load. Offline "
            f"(HF_HUB_OFFLINE=1) an uncached model can yield an empty tokenizer instead of "
            f"an error; download the model to the Hugging Face cache or pass a local folder."
        )


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


T = TypeVar("T")
R = TypeVar("R")


def run_batched(fn: Callable[[list[T]], list[R]], items: Sequence[T], batch_size: int,
                what: str = "batch") -> list[R]:
    """Apply ``fn`` to ``items`` in batches, halving the batch on GPU out-of-memory.

    A batch that fails with ``torch.OutOfMemoryError`` is retried at half its size, down to
    1; only then does the error propagate, so a large default batch is safe everywhere.
    """
    out: list[R] = []
    i, size = 0, max(1, int(batch_size))
    while i < len(items):
        chunk = list(items[i:i + size])
        try:
            res = fn(chunk)
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            size = max(1, size // 2)
            log.warning("out of memory in %s; retrying with batch size %d", what, size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        if len(res) != len(chunk):
            raise RuntimeError(f"{what}: got {len(res)} results for {len(chunk)} inputs")
        out.extend(res)
        i += len(chunk)
    return out
