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

import json
import re
from pathlib import Path
from typing import Any

from dnd.io import atomic_write_json

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
