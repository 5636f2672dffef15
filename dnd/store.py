"""The run directory: resolved config, activations, one JSON record per unit, labels.csv.

```
<run>/config.yaml                 resolved config (never secrets)
<run>/activations/<key>/          float16 memmap + validity mask + meta.json (cache)
<run>/units/<layer>/<unit>.json   one record per unit (dnd.record), written atomically
<run>/labels.csv                  Neuron ID,Label 1,Label 2,Label 3 (a run of one layer)
<run>/labels-<layer>.csv          the same, per layer, in a run of several layers
<run>/work.json                   what each describe invocation asked of the models (dnd.work)
<run>/cache/captions/             captions by captioner and image pixels (JsonCache)
<run>/cache/llm/                  LLM replies by request (JsonCache)
<run>/cache/generated/            generated images' features and thumbnails (FeatureCache)
<run>/dictionaries/<layer>.*      dictionaries fitted for dictionary layers (dnd.dictionary)
<run>/featurevis/<layer>/         dnd featurevis: images per kind, a CLIP unit's top texts
<run>/explain/<image>/            dnd explain's page of one image
<run>/report/                     the HTML report (dnd.report)
<run>/run.lock                    held by the process using the run (see RunLock)
```

:class:`RunStore` is the only code that builds these paths.

Re-running the same command continues: finished units are not redone. A run directory
never mixes results of two different configs (see :meth:`RunStore.check`), and is used by
one process at a time (see :class:`RunLock`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shlex
import socket
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from dnd.cache import FeatureCache, JsonCache
from dnd.config import RunConfig, save_config
from dnd.errors import ConfigError
from dnd.io import FileLock, LockBusy, atomic_write_json, atomic_write_text
from dnd.record import NEURON, RecordError, UnitRecord

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"

LABELS_HEADER = ["Neuron ID", "Label 1", "Label 2", "Label 3"]
# <run>/featurevis/<layer>/texts/<unit>.json: a CLIP unit's top texts (dnd.textvis).
TEXTS_VARIANT = "texts"


class RunDirConflict(ValueError):
    """The run directory holds results of a different config."""


class RunDirBusy(OSError):
    """Another process is using the run directory; the message names it."""


class RunLock:
    """Holds a run directory for one process: ``with RunLock(run_dir): ...``.

    Why: two processes on one run directory gave silently wrong labels. Both missed the
    activation cache and computed it into the same file: creating the memory map
    (``np.memmap`` mode ``w+``) truncates ``values.f16`` and refills it with zeros, which
    the first process's own map of the file sees too. The rows the first had written and
    the second had not yet rewritten were zero when the first picked its units' top
    images: wrong crops, captions and labels (reproduced with two ``dnd describe --preset
    toyworld --units 0-31 --probe toyworld:800``, the second's pass starting late in the
    first's: all 32 units' top images changed, unit 5 became "ring" instead of "red
    ring"). Each process also decides once which units are left and reads a chunk's
    records once per chunk, so the second carried on from whatever records the first had
    written (here the wrong crops) and overwrote the first's, and both reported every unit
    as done by them. Caches written one file at a time (captions, LLM replies,
    generated-image features) were never the problem: each entry is renamed into place
    whole (see :mod:`dnd.cache`).

    So ``describe`` holds this lock from start to end (report included). The lock is an OS
    advisory lock on ``<run>/run.lock`` (:class:`dnd.io.FileLock`): a crashed or killed
    holder cannot leave it stuck. Without ``wait`` a second process fails at once with
    :class:`RunDirBusy` naming the holder (pid, host, command, start time); with ``wait``
    it logs that and waits for the holder to finish. ``dnd report RUN_DIR`` takes no lock:
    it reads whole records and writes its files atomically, so while a run goes on it
    shows the units finished so far, and the run's own report replaces it at the end.

    A directory the lock had to create is removed again on release if the run wrote
    nothing else there (a command that failed its checks leaves no empty run directory).
    """

    def __init__(self, root: str | Path, *, wait: bool = False):
        self.root = Path(root)
        self.wait = wait
        self._lock: FileLock | None = None
        self._created = False

    @property
    def path(self) -> Path:
        return self.root / LOCK_NAME

    def __enter__(self) -> RunLock:
        created = not self.root.exists()
        lock = FileLock(self.path, _holder_info())
        try:
            lock.acquire(wait=self.wait, on_wait=lambda holder: log.warning(
                "%s; waiting for it to finish", _in_use(self.root, holder)))
        except LockBusy as e:
            raise RunDirBusy(f"{_in_use(self.root, e.holder)}; wait for it, stop it, or pass "
                             "--wait (wait=True in Python)") from None
        self._lock, self._created = lock, created
        return self

    def __exit__(self, *exc) -> None:
        lock, self._lock = self._lock, None
        if lock is None:
            return
        try:
            if self._created and [p.name for p in self.root.iterdir()] == [LOCK_NAME]:
                # Removed while still held: a process waiting on this file notices that
                # the path is gone and locks a new one (see FileLock.acquire).
                self.path.unlink()
                self.root.rmdir()
        except OSError:
            pass  # another process created something meanwhile: leave the directory
        finally:
            lock.release()


def _holder_info() -> dict[str, Any]:
    """What a busy run directory tells the next process about its holder."""
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(argv),
            "started": datetime.now().astimezone().isoformat(timespec="seconds")}


def _in_use(root: Path, holder: dict[str, Any]) -> str:
    """'run directory X is in use by pid P on host H since 04:31 (dnd describe ...)'."""
    if "pid" not in holder:
        return (f"run directory {root} is in use by another process (its details in "
                f"{root / LOCK_NAME} are unreadable)")
    since = ""
    try:
        started = datetime.fromisoformat(holder["started"]).astimezone()
        now = datetime.now().astimezone()
        since = " since " + started.strftime("%H:%M" if started.date() == now.date()
                                             else "%Y-%m-%d %H:%M")
    except (KeyError, TypeError, ValueError):
        pass
    command = str(holder.get("command", ""))
    if len(command) > 200:
        command = command[:197] + "..."
    return (f"run directory {root} is in use by pid {holder['pid']} on host "
            f"{holder.get('host', '?')}{since}" + (f" ({command})" if command else ""))


def unit_done(folder: Path, unit: int, key: str) -> bool:
    """Whether ``folder/<unit>.json`` was saved with settings ``key`` (the resume check of
    ``dnd featurevis``'s images and texts: what a unit's JSON holds besides is theirs)."""
    try:
        return json.loads((folder / f"{int(unit)}.json").read_text()).get("key") == key
    except (OSError, ValueError):
        return False


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
        The layers of a run are fixed when it starts (in any order): its label files are
        named by how many layers it has (:meth:`labels_path_of`), and a re-run with another
        layer list is refused with how to resume or start a new run. Writes nothing, so it
        can run before any other check.
        """
        if not self.config_path.is_file():
            return
        try:
            old = self.load_config()
        except (ConfigError, yaml.YAMLError) as e:
            # E.g. a run made by an older dnd whose settings no longer exist.
            raise RunDirConflict(
                f"run directory {self.root} holds a config this version of dnd cannot read "
                f"({e}). Use a new --run-dir (e.g. {self.root}-2) or delete the old one."
            ) from None
        old_key, new_key = old.results_key(), config.results_key()
        if old_key["layer"] != new_key["layer"]:
            del old_key["layer"], new_key["layer"]
            also = _diff(old_key, new_key)
            raise RunDirConflict(
                f"run directory {self.root} describes {_layer_list(old.layers)}, not "
                f"{_layer_list(config.layers)}"
                + (f" (and its config differs: {'; '.join(also)})" if also else "")
                + ". A run's layers are fixed when it starts: to resume it, give the same "
                f"layers ({' '.join('--layer ' + la for la in old.layers)}); to describe "
                f"other layers, use a new --run-dir (e.g. {self.root}-2; generated images "
                "are reused through the image bank).")
        diff = _diff(old_key, new_key)
        if diff:
            raise RunDirConflict(
                f"run directory {self.root} was made with a different config "
                f"({'; '.join(diff)}). Use a new --run-dir (e.g. {self.root}-2) or "
                "delete the old one.")

    def save_config(self, config: RunConfig) -> None:
        """Create the directory and save the resolved config (after :meth:`check`)."""
        self.check(config)
        self.root.mkdir(parents=True, exist_ok=True)
        save_config(config, self.config_path)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def load_config(self) -> RunConfig:
        """The run's saved config (raises OSError, ConfigError or yaml.YAMLError)."""
        return RunConfig.from_dict(yaml.safe_load(self.config_path.read_text()))

    @property
    def activations_dir(self) -> Path:
        return self.root / "activations"

    @property
    def caption_cache(self) -> JsonCache:
        return JsonCache(self.root / "cache" / "captions")

    @property
    def llm_cache(self) -> JsonCache:
        return JsonCache(self.root / "cache" / "llm")

    @property
    def features(self) -> FeatureCache:
        """Step 3's generated images (features for scoring, thumbnails for the report)."""
        return FeatureCache(self.root / "cache" / "generated")

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def layer_config(self, layer: str | None = None) -> RunConfig:
        """The run's config for one of its layers (``layer`` may be left out in a run of
        one), for the commands that work on a finished run (``dnd featurevis``). Raises
        FileNotFoundError for a folder that is not a run, ValueError naming the layers."""
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a dnd run directory (no "
                                    f"{self.config_path.name}); run `dnd describe` first")
        config = self.load_config()
        if layer is None and len(config.layers) > 1:
            raise ValueError(f"{self.root} describes several layers "
                             f"({', '.join(config.layers)}): choose one with --layer")
        return config.for_layer(layer or config.layers[0])  # another layer raises, naming them

    def described_units(self, layer: str) -> list[int]:
        """The units of ``layer`` that have a record (raises ValueError when none has)."""
        units = [r.unit for r in self.records(layer)]
        if not units:
            raise ValueError(f"{self.root} has no unit records for layer {layer!r}; "
                             "describe units first or pass --units")
        return units

    def dictionary_path(self, layer: str) -> Path:
        """The dictionary a run fitted for run layer ``layer`` (``conv4.nmf``; dnd's
        safetensors file, what it was fitted on in the ``.json`` beside it)."""
        return self.root / "dictionaries" / f"{safe_name(layer)}.safetensors"

    def explain_dir(self, image_stem: str) -> Path:
        """``dnd explain``'s page of one image (``index.html``, its PNGs and JSON)."""
        return self.root / "explain" / safe_name(image_stem)

    def featurevis_dir(self, layer: str, variant: str = "plain") -> Path:
        """Feature visualizations of ``layer`` (``dnd featurevis``): images in ``plain`` or
        ``facet-<name>`` (:mod:`dnd.featurevis`), a CLIP unit's top texts in
        :data:`TEXTS_VARIANT` (:mod:`dnd.textvis`)."""
        return self.root / "featurevis" / safe_name(layer) / variant

    def featurevis_files(self, layer: str, unit: int, variant: str = "plain"
                         ) -> tuple[Path, list[Path]]:
        """A unit's saved visualization (``dnd featurevis``): its JSON (``key``,
        ``activations``, ``start_activations``, ``facet``) and its images' paths
        (``<unit>_<k>.png``); no paths when it was not computed."""
        folder = self.featurevis_dir(layer, variant)
        meta = folder / f"{int(unit)}.json"
        if not meta.is_file():
            return meta, []
        n = len(json.loads(meta.read_text()).get("activations", []))
        return meta, [folder / f"{int(unit)}_{k}.png" for k in range(n)]

    @property
    def labels_path(self) -> Path:
        """labels.csv: the labels of a run of one layer."""
        return self.root / "labels.csv"

    def labels_path_of(self, layer: str, run_layers: Sequence[str]) -> Path:
        """Where ``layer``'s labels go in a run of ``run_layers``: ``labels.csv`` when it is
        the run's only layer (as for every run before several layers existed),
        ``labels-<layer>.csv`` beside it in a run of several layers (the reference format
        has no layer column, so one file per layer)."""
        if layer not in run_layers:
            raise ValueError(f"layer {layer!r} is not one of {', '.join(run_layers)}")
        if len(run_layers) == 1:
            return self.labels_path
        return self.root / f"labels-{safe_name(layer)}.csv"

    @property
    def work_path(self) -> Path:
        return self.root / "work.json"

    def save_work(self, invocation: dict[str, Any]) -> Path:
        """Add or update (same ``id``) one describe invocation's entry of
        ``work.json`` (``{"invocations": [...], "total": {count: n}}``, totals over every
        invocation). Unreadable old content is kept aside as ``work.json.bad``."""
        from dnd.work import COUNTS

        data: dict[str, Any] = {"invocations": []}
        if self.work_path.is_file():
            try:
                data = json.loads(self.work_path.read_text())
                data["invocations"] = list(data["invocations"])
            except (ValueError, KeyError, TypeError):
                log.warning("%s is unreadable; kept as %s.bad", self.work_path, self.work_path)
                self.work_path.replace(self.work_path.with_suffix(".json.bad"))
                data = {"invocations": []}
        entries = [e for e in data["invocations"] if e.get("id") != invocation["id"]]
        entries.append(invocation)
        total = {k: sum(int(e.get("work", {}).get(k, 0)) for e in entries) for k in COUNTS}
        return atomic_write_json(self.work_path, {"invocations": entries, "total": total})

    def read_work(self) -> dict[str, Any]:
        """``work.json`` as :meth:`save_work` writes it: ``{"invocations": [...], "total":
        {count: n}}``; both empty when the run has none yet, or (with a warning) when it is
        unreadable. Writes nothing, so it may run beside a describe."""
        try:
            data = json.loads(self.work_path.read_text())
            return {"invocations": list(data["invocations"]), "total": dict(data["total"])}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s is unreadable (%s); reading it as empty", self.work_path, e)
        return {"invocations": [], "total": {}}

    def _units_dir(self, layer: str, basis: str = NEURON) -> Path:
        # Neurons keep the plain layer folder; another basis gets its own beside it.
        name = safe_name(layer) if basis == NEURON else f"{safe_name(layer)}@{safe_name(basis)}"
        return self.root / "units" / name

    def unit_path(self, layer: str, unit: int, basis: str = NEURON) -> Path:
        return self._units_dir(layer, basis) / f"{int(unit)}.json"

    def layers(self) -> list[str]:
        """Folder names under units/ (one per layer and basis), sorted."""
        units = self.root / "units"
        return sorted(p.name for p in units.iterdir() if p.is_dir()) if units.is_dir() else []

    def unit_ids(self, layer: str, basis: str = NEURON) -> list[int]:
        """The units of ``layer`` that have a record file, sorted (files are not read)."""
        folder = self._units_dir(layer, basis)
        ids = (int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()) \
            if folder.is_dir() else ()
        return sorted(ids)

    def read_unit(self, layer: str, unit: int, basis: str = NEURON) -> UnitRecord | None:
        """The unit's record, or None if absent or unreadable (a partial write). A record
        from a newer dnd raises :class:`dnd.record.RecordError`."""
        return _read(self.unit_path(layer, unit, basis))

    def write_unit(self, record: UnitRecord) -> Path:
        # Durable: a unit record is the result of minutes of model calls.
        return atomic_write_json(self.unit_path(record.layer, record.unit, record.basis),
                                 record.to_json())

    def records(self, layer: str, basis: str = NEURON) -> list[UnitRecord]:
        """All readable unit records of ``layer``, by unit id."""
        return self._records_in(self._units_dir(layer, basis))

    def all_records(self) -> list[UnitRecord]:
        """Every readable unit record of every layer, by layer folder then unit id."""
        return [r for name in self.layers() for r in self._records_in(self.root / "units" / name)]

    @staticmethod
    def _records_in(folder: Path) -> list[UnitRecord]:
        recs = [_read(p) for p in folder.glob("*.json")] if folder.is_dir() else []
        return sorted((r for r in recs if r is not None), key=lambda r: r.unit)

    def write_labels(self, layer: str, run_layers: Sequence[str] | None = None) -> Path:
        """``layer``'s labels in the reference format, one row per unit that has labels, to
        :meth:`labels_path_of` (``run_layers``: the run's layers, default just ``layer``:
        labels.csv)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(LABELS_HEADER)
        for rec in self.records(layer):
            if rec.labels:
                w.writerow([rec.unit, *(list(rec.labels) + ["", "", ""])[:3]])
        return atomic_write_text(self.labels_path_of(layer, run_layers or [layer]),
                                 buf.getvalue())


def _read(path: Path) -> UnitRecord | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    try:
        return UnitRecord.from_json(data)
    except RecordError as e:
        raise RecordError(f"{path}: {e}") from None


def _layer_list(layers: Sequence[str]) -> str:
    """'layer fc' or 'layers conv4, fc' (sorted: the order is not part of a run)."""
    return (f"layer {layers[0]}" if len(layers) == 1
            else f"layers {', '.join(sorted(layers))}")


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out
