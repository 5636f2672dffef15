"""Small file helpers shared by every stage: atomic writes and content hashes.

A run can be killed at any moment, so every file another run may read is written to a
temporary sibling and renamed into place (rename is atomic on POSIX and Windows).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; finished files get the usual mode so a
# report folder can be served or shared.
_FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one.

    ``durable`` also flushes the file to the disk before it replaces the old one, so it
    survives a power cut. Files that are recomputed when damaged (caches, report
    thumbnails) pass False: a killed process still leaves the old file or the new one,
    and skipping the flush makes writing thousands of them several times faster.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """Atomically write UTF-8 text (``durable``: as for :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable object, independent of dict order.

    Used as cache keys: same inputs -> same key across runs and machines.
    """
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


def bytes_hash(data: bytes, length: int = 16) -> str:
    """Hex digest of raw bytes (e.g. an image's pixels), for content-addressed caches."""
    return hashlib.sha256(data).hexdigest()[:length]
