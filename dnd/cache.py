"""On-disk caches for expensive calls: JSON values (LLM replies, captions, ...), generated
images' features in a run (:class:`FeatureCache`) and generated images shared by every run
on the machine (:class:`ImageBank`).

One file per key, sharded by the key's first two hex characters so no directory grows
huge. Files are written atomically; a file that is unreadable anyway (disk full, a copy
cut short) is treated as a miss, so a damaged cache costs a re-computation, never a crash.

Safe with several processes: each writer renames a complete file of its own into place,
so a reader sees a whole entry or a miss, and of two writers of one key the last wins.
Keys hash everything that determines the value, so concurrent writers store the same value
(sampled LLM replies aside, where either is a valid reply). In a run every cache lives in
the run directory, which one process holds at a time (:class:`dnd.store.RunLock`).
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dnd.io import atomic_write_bytes, atomic_write_json

# Keys come from dnd.io.stable_hash; insisting on hex keeps them from naming paths.
_KEY = re.compile(r"[0-9a-f]{4,128}")


class JsonCache:
    """``get``/``put`` JSON values under hex keys, one file each below ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"JsonCache({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """The file that holds ``key``'s value."""
        if not _KEY.fullmatch(key):
            raise ValueError(f"cache keys are lower-case hex strings (stable_hash), got {key!r}")
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Any | None:
        """The value stored under ``key``, or None when absent or unreadable."""
        try:
            entry = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        # The key is stored inside the file too, so a file that parses but is not one of
        # our entries (or was copied to the wrong name) is still a miss.
        if not isinstance(entry, dict) or entry.get("key") != key or "value" not in entry:
            return None
        return entry["value"]

    def put(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable, non-None ``value`` under ``key``."""
        if value is None:
            raise ValueError("None cannot be cached: get() uses it to mean 'miss'")
        atomic_write_json(self.path(key), {"key": key, "value": value})


class FeatureCache:
    """Step 3's generated images, kept as what scoring needs of them.

    ``<root>/<key>.npz``: the unit activations of the whole layer (``acts``, [n_units]
    float32), the image embedding (``emb``, [d] float32) and, when scoring asked for them,
    the activations on the image shown smaller (``scaled``, [n_scales, n_units] float32:
    :data:`dnd.stages.score.SCALES`); ``<root>/<key>.jpg``: a
    thumbnail (at most 128 px a side) for the report. Keys hash the generator, prompt,
    seed, target, layer, summary and encoder (:meth:`dnd.stages.score.ConceptScorer.request_key`).
    Damaged entries are recomputed, so nothing is flushed to disk.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r})"

    def thumbnail(self, key: str) -> Path:
        """The JPEG thumbnail of generated image ``key`` (it may not exist)."""
        return self._path(key, "jpg")

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """{"acts", "emb"} (and "scaled" when stored) of generated image ``key``, or None
        when absent or unreadable."""
        try:
            with np.load(self._path(key, "npz")) as z:
                return {"acts": z["acts"], "emb": z["emb"],
                        **({"scaled": z["scaled"]} if "scaled" in z.files else {})}
        except (OSError, ValueError, KeyError):
            return None  # absent or a partial write: recompute

    def put(self, key: str, acts: np.ndarray, emb: np.ndarray, image: Image.Image,
            scaled: np.ndarray | None = None) -> None:
        """Store image ``key``'s features and its thumbnail."""
        buf = io.BytesIO()
        np.savez(buf, acts=acts, emb=emb, **({"scaled": scaled} if scaled is not None else {}))
        atomic_write_bytes(self._path(key, "npz"), buf.getvalue(), durable=False)
        thumb = image.convert("RGB")
        thumb.thumbnail((128, 128))
        jbuf = io.BytesIO()
        thumb.save(jbuf, format="JPEG", quality=85)
        atomic_write_bytes(self._path(key, "jpg"), jbuf.getvalue(), durable=False)

    def _path(self, key: str, ext: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"cache keys are lower-case hex strings (stable_hash), got {key!r}")
        return self.root / f"{key}.{ext}"


class ImageBank:
    """Generated images shared by every run, layer and model on the machine.

    A text-to-image model's output depends only on the generator (its identity), the prompt
    and the seed, so an image made for one run serves every later run that asks the same:
    another layer, another target, a re-run in a new folder. ``<root>/<kk>/<key>.png``
    holds the image losslessly (a bank hit gives exactly the pixels a fresh generation
    would, so records do not depend on the bank); ``<key>.<ekey>.npy`` beside it the image
    embedding of an encoder (``ekey`` hashes the encoder's identity and the image size it
    was given). Keys are :func:`dnd.io.stable_hash` hex (content-addressed).

    Size: :meth:`evict` (called by its users after each batch of writes: it lists the
    whole bank) removes the least recently used images and their embeddings while the bank
    holds more than ``max_bytes``, down to 90% of it; a hit touches the file's
    modification time. Several runs may use one bank at once: files are renamed
    into place whole, and a file that vanishes (another run evicted it) or cannot be read
    (a damaged entry, which is then deleted) is a miss, recomputed and written again.
    """

    def __init__(self, root: str | Path, max_bytes: int = 20 * 2**30):
        if max_bytes < 1:
            raise ValueError(f"image bank size limit must be >= 1 byte, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    def __repr__(self) -> str:
        return f"ImageBank({str(self.root)!r}, max_bytes={self.max_bytes})"

    @staticmethod
    def key(generator: dict[str, Any], prompt: str, seed: int) -> str:
        """The key of the image ``generator`` (identity) makes from ``prompt`` and ``seed``."""
        from dnd.io import stable_hash

        return stable_hash({"generator": generator, "prompt": prompt, "seed": int(seed)},
                           length=32)

    def _path(self, key: str, suffix: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"bank keys are lower-case hex strings (stable_hash), got {key!r}")
        return self.root / key[:2] / f"{key}{suffix}"

    @staticmethod
    def _embedding_suffix(encoder: dict[str, Any], size: int) -> str:
        from dnd.io import stable_hash

        return f".{stable_hash({'encoder': encoder, 'size': int(size)})}.npy"

    def get_image(self, key: str) -> Image.Image | None:
        """The banked RGB image, or None (absent, evicted or damaged: then deleted)."""
        path = self._path(key, ".png")
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
                image.load()
        except FileNotFoundError:
            return None
        except (OSError, ValueError, SyntaxError):
            path.unlink(missing_ok=True)  # damaged: the caller generates it again
            return None
        _touch(path)
        return image

    def put_image(self, key: str, image: Image.Image) -> None:
        """Bank ``image`` (lossless PNG). Call :meth:`evict` after a batch of puts."""
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        atomic_write_bytes(self._path(key, ".png"), buf.getvalue(), durable=False)

    def get_embedding(self, key: str, encoder: dict[str, Any], size: int
                      ) -> np.ndarray | None:
        """Image ``key``'s embedding by ``encoder`` (identity) at input ``size``, or None."""
        path = self._path(key, self._embedding_suffix(encoder, size))
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            return None

    def put_embedding(self, key: str, encoder: dict[str, Any], size: int,
                      emb: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(emb, dtype=np.float32), allow_pickle=False)
        atomic_write_bytes(self._path(key, self._embedding_suffix(encoder, size)),
                           buf.getvalue(), durable=False)

    def evict(self) -> int:
        """Remove least recently used images (with their embeddings) while the bank holds
        more than ``max_bytes``, down to 90% of it. Returns the images removed."""
        files = []
        for path in self.root.glob("??/*"):
            try:
                st = path.stat()
            except FileNotFoundError:  # another run evicted it meanwhile
                continue
            files.append((path, st.st_size, st.st_mtime))
        total = sum(size for _, size, _ in files)
        if total <= self.max_bytes:
            return 0
        by_image: dict[str, list[tuple[Path, int]]] = {}
        used: dict[str, float] = {}
        for path, size, mtime in files:
            stem = path.name.split(".")[0]
            by_image.setdefault(stem, []).append((path, size))
            if path.suffix == ".png":
                used[stem] = mtime
        removed = 0
        for stem in sorted(by_image, key=lambda s: used.get(s, 0.0)):
            if total <= 0.9 * self.max_bytes:
                break
            for path, size in by_image[stem]:
                path.unlink(missing_ok=True)
                total -= size
            removed += 1
        return removed


def _touch(path: Path) -> None:
    """Mark ``path`` as recently used (for eviction); a vanished file is fine."""
    try:
        os.utime(path)
    except OSError:
        pass
