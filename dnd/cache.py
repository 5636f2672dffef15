"""A small on-disk JSON cache for expensive calls (LLM replies, captions, ...).

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
    float32) and the image embedding (``emb``, [d] float32); ``<root>/<key>.jpg``: a
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
        """{"acts", "emb"} of generated image ``key``, or None when absent or unreadable."""
        try:
            with np.load(self._path(key, "npz")) as z:
                return {"acts": z["acts"], "emb": z["emb"]}
        except (OSError, ValueError, KeyError):
            return None  # absent or a partial write: recompute

    def put(self, key: str, acts: np.ndarray, emb: np.ndarray, image: Image.Image) -> None:
        """Store image ``key``'s features and its thumbnail."""
        buf = io.BytesIO()
        np.savez(buf, acts=acts, emb=emb)
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
