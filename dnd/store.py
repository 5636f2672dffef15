"""The run directory: resolved config, activations, one JSON record per unit, labels.csv.

```
<run>/config.yaml                 resolved config (never secrets)
<run>/activations/<key>/          float16 memmap + validity mask + meta.json (cache)
<run>/units/<layer>/<unit>.json   one record per finished unit, written atomically
<run>/labels.csv                  Neuron ID,Label 1,Label 2,Label 3
```

Re-running the same command continues: finished units are not redone. A run directory
never mixes results of two different configs (see :meth:`RunStore.check`).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import yaml

from dnd.config import STAGES, RunConfig, save_config
from dnd.io import atomic_write_json, atomic_write_text

LABELS_HEADER = ["Neuron ID", "Label 1", "Label 2", "Label 3"]


class RunDirConflict(ValueError):
    """The run directory holds results of a different config."""


def safe_name(name: str) -> str:
    """A layer name as a single safe path component (no separators, no '..')."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".")
    if not cleaned:
        raise ValueError(f"cannot use {name!r} as a file name")
    return cleaned


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def check(self, config: RunConfig) -> None:
        """Refuse a config whose results would mix with this directory's existing ones.

        Raises :class:`RunDirConflict` naming the differing keys (model, layer, probe,
        summary, crop rules, ...). Unit ranges and speed settings may change between runs.
        Writes nothing, so it can run before any other check.
        """
        path = self.root / "config.yaml"
        if not path.is_file():
            return
        old = RunConfig.from_dict(yaml.safe_load(path.read_text()))
        diff = _diff(old.results_key(), config.results_key())
        if diff:
            raise RunDirConflict(
                f"run directory {self.root} was made with a different config "
                f"({'; '.join(diff)}). Use a new --run-dir (e.g. {self.root}-2) or "
                "delete the old one.")

    def save_config(self, config: RunConfig) -> None:
        """Create the directory and save the resolved config (after :meth:`check`)."""
        self.check(config)
        self.root.mkdir(parents=True, exist_ok=True)
        save_config(config, self.root / "config.yaml")

    @property
    def activations_dir(self) -> Path:
        return self.root / "activations"

    def unit_path(self, layer: str, unit: int) -> Path:
        return self.root / "units" / safe_name(layer) / f"{int(unit)}.json"

    def read_unit(self, layer: str, unit: int) -> dict[str, Any] | None:
        """The unit's record, or None if absent or unreadable (a partial write)."""
        try:
            return json.loads(self.unit_path(layer, unit).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def unit_done(self, layer: str, unit: int, stage: str) -> bool:
        """True if the unit's record has reached ``stage`` (or a later one)."""
        rec = self.read_unit(layer, unit)
        return rec is not None and rec.get("stage") in STAGES[STAGES.index(stage):]

    def write_unit(self, layer: str, unit: int, record: dict[str, Any]) -> Path:
        return atomic_write_json(self.unit_path(layer, unit), record)

    def records(self, layer: str) -> list[dict[str, Any]]:
        """All readable unit records of ``layer``, by unit id."""
        folder = self.root / "units" / safe_name(layer)
        recs = []
        for p in folder.glob("*.json") if folder.is_dir() else []:
            try:
                recs.append(json.loads(p.read_text()))
            except json.JSONDecodeError:
                continue
        return sorted(recs, key=lambda r: r["unit"])

    def write_labels(self, layer: str) -> Path:
        """labels.csv in the reference format, one row per unit that has labels."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(LABELS_HEADER)
        for rec in self.records(layer):
            labels = rec.get("labels")
            if labels:
                w.writerow([rec["unit"], *(labels + ["", "", ""])[:3]])
        return atomic_write_text(self.root / "labels.csv", buf.getvalue())


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out
