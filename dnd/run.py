"""A finished or partial run, read-only, from Python and notebooks: ``dnd.open_run(path)``.

::

    run = dnd.open_run("runs/quickstart")
    run.labels()           # pandas DataFrame, one row per unit with a record
    run.unit("fc", 3)      # the unit's typed record; in Jupyter, its report card
    run.work               # what every describe invocation asked of the models
    run                    # in Jupyter: a table with thumbnails

Everything is read through :class:`dnd.store.RunStore`, the one owner of a run's layout,
and every call reads the files again: a run that a describe is still writing shows the
units finished so far (each record is written whole, atomically). Nothing is written, and
the run's lock is not taken.

Runs of older dnd versions read as they are (unit records of schema 1 and 2, see
:mod:`dnd.record`); a record or config from a newer dnd is refused with the fix (upgrade
dnd) rather than half-read.

In Jupyter a run renders as a compact table and a unit as its report card (labels, scores,
top images with their heatmaps, captions, the candidates' generated images, why the winner
won), drawn by the static report's own code (:mod:`dnd.report.inline`) from the run's own
files. Images are embedded as base64 ``data:`` URIs: no server, no network, and the saved
notebook shows them anywhere, without the run directory.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dnd.config import RunConfig
from dnd.errors import ConfigError
from dnd.record import UnitRecord
from dnd.store import RunStore
from dnd.work import COUNTS, Work

if TYPE_CHECKING:
    import pandas as pd

    from dnd.probe import ProbeSet
    from dnd.report.rules import InterpretabilityRule

TABLE_ROWS = 25  # units a run's notebook table shows by default (each row has 4 images)
LABEL_COLUMNS = ("unit", "Label 1", "Label 2", "Label 3", "score", "interpretability",
                 "confidence", "stage", "failed", "why")


def open_run(path: str | os.PathLike[str]) -> Run:
    """The run directory ``path`` (``dnd describe --run-dir``, ``dnd.describe``'s
    ``run_dir``), finished or not, as a read-only :class:`Run`.

    Raises FileNotFoundError for a folder that is not a run (naming the runs inside it,
    when it holds some, such as ``dnd demo``'s folder) and :class:`dnd.config.ConfigError`
    for a config this dnd cannot read.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no run directory at {root}: pass the folder given to "
                                "dnd.describe (or `dnd describe --run-dir`)")
    store = RunStore(root)
    if not store.config_path.is_file():
        inner = sorted(p for p in root.iterdir() if (p / store.config_path.name).is_file())
        hint = (f"; it holds runs: {', '.join(str(p) for p in inner)}; open one of those"
                if inner else "; describe units into it first (dnd.describe(config, "
                f"{str(root)!r}))")
        raise FileNotFoundError(f"{root} is not a dnd run directory (no "
                                f"{store.config_path.name}){hint}")
    try:
        config = store.load_config()
    except (ConfigError, yaml.YAMLError, TypeError, AttributeError) as e:
        raise ConfigError(f"cannot read {store.config_path} ({e}). A run written by a newer "
                          "dnd needs that version: upgrade dnd (pip install -U dnd); "
                          "otherwise the file is damaged") from None
    return Run(store, config)


class Run:
    """A run directory, read-only (build one with :func:`open_run`).

    ``path``: the run's folder; ``config``: its resolved :class:`dnd.config.RunConfig`;
    ``layers``: the layers it describes, in the config's order.
    """

    def __init__(self, store: RunStore, config: RunConfig):
        self.store, self.config = store, config
        self._rules: dict[str, InterpretabilityRule] = {}

    @property
    def path(self) -> Path:
        return self.store.root

    @property
    def layers(self) -> list[str]:
        return self.config.layers

    def __repr__(self) -> str:
        return (f"<dnd.Run {str(self.path)!r}: model {self.config.model}, "
                f"{'layer' if len(self.layers) == 1 else 'layers'} {', '.join(self.layers)}>")

    # -- records --------------------------------------------------------------------------

    def _layer(self, layer: str) -> str:
        if layer not in self.layers:
            raise ValueError(f"layer {layer!r} is not one of run {self.path}'s layers "
                             f"({', '.join(self.layers)})")
        return layer

    def records(self, layer: str | None = None) -> list[RunUnit]:
        """Every readable unit record of ``layer`` (default: of every layer), by layer in
        the config's order, then unit. A unit whose record a describe is writing right
        now is left out; a record from a newer dnd raises :class:`dnd.record.RecordError`
        naming its file."""
        layers = self.layers if layer is None else [self._layer(layer)]
        return [RunUnit.of(rec, self) for la in layers for rec in self.store.records(la)]

    def unit(self, layer: str, unit: int) -> RunUnit:
        """Unit ``unit`` of ``layer``: its :class:`dnd.record.UnitRecord` (a
        :class:`RunUnit`, which shows as its report card in a notebook). Raises KeyError
        naming the units that have records when it has none (not described yet)."""
        self._layer(layer)
        rec = self.store.read_unit(layer, int(unit))
        if rec is None:
            have = self.store.unit_ids(layer)
            raise KeyError(f"run {self.path} has no record of unit {unit} of layer {layer!r} "
                           f"(records: {_spans(have) if have else 'none yet'}); describe it "
                           "first (the run's config with units including it)")
        return RunUnit.of(rec, self)

    def labels(self, layer: str | None = None) -> pd.DataFrame:
        """The units' labels and scores as a pandas DataFrame, one row per unit with a
        record (finished, stopped early or failed), ordered by layer then unit.

        Columns: ``unit`` (int64); ``Label 1``, ``Label 2``, ``Label 3`` (strings, missing
        where the unit has none); ``score`` (float64: Label 1's final score, NaN without a
        selection); ``interpretability`` (float64, NaN before Step 3); ``confidence``
        (float64: the record's ``scoring.confidence`` in [0, 1], NaN under the paper's rule
        and in older records); ``stage`` (the last stage the unit finished); ``failed``
        (bool) and ``why`` (the full error, missing unless failed). With ``layer=None`` in a
        run of several layers, a ``layer`` column comes first.
        """
        import pandas as pd  # here, not at the top: `import dnd` must stay fast

        layers = self.layers if layer is None else [self._layer(layer)]
        rows = [(la, *_row(rec)) for la in layers for rec in self.store.records(la)]
        text = "str" if int(pd.__version__.split(".")[0]) >= 3 else object
        dtypes: dict[str, Any] = {"layer": text, "unit": "int64", "Label 1": text,
                                  "Label 2": text, "Label 3": text, "score": "float64",
                                  "interpretability": "float64", "confidence": "float64",
                                  "stage": text, "failed": "bool", "why": text}
        names = ("layer", *LABEL_COLUMNS)
        frame = pd.DataFrame({name: pd.Series([r[i] for r in rows], dtype=dtypes[name])
                              for i, name in enumerate(names)})
        if layer is not None or len(self.layers) == 1:
            frame = frame.drop(columns="layer")
        return frame

    # -- other files ----------------------------------------------------------------------

    @property
    def work(self) -> Work:
        """What every describe invocation on this run asked of the models, summed: a
        :class:`dnd.work.Work` (images through the target, captioned, generated, LLM
        requests and tokens, ...; ``seconds`` per model). All zero before the first
        invocation ends. Per invocation: :attr:`invocations`."""
        total = Work()
        for entry in self.invocations:
            done = entry.get("work") or {}
            # Counts a newer dnd added are left out rather than refused.
            total.merge({k: v for k, v in done.items() if k in COUNTS or k == "seconds"})
        return total

    @property
    def invocations(self) -> list[dict[str, Any]]:
        """``work.json``'s entry per describe invocation (id, layer(s), start, units
        processed, work and per-unit work), oldest first."""
        return self.store.read_work()["invocations"]

    @property
    def report_path(self) -> Path | None:
        """The static report's index page (``<run>/report/index.html``; a describe writes
        it at the end, ``dnd.build_report(run.path)`` any time), None while it has none."""
        index = self.store.report_dir / "index.html"
        return index if index.is_file() else None

    # -- notebook display -------------------------------------------------------------------

    @cached_property
    def _probe(self) -> ProbeSet | None:
        """The run's probing set (thumbnails are re-read from it, as the report does);
        None, with a warning, when it cannot be opened any more."""
        from dnd.report.images import open_run_probe

        return open_run_probe(self.config)

    def _rule(self, layer: str) -> InterpretabilityRule:
        """The layer's low-interpretability rule over its records (kept, and renewed each
        time the run's table is drawn: a run still being written gains units)."""
        from dnd.report.rules import layer_rules, low_interpretability_rule

        if layer not in self._rules:
            self._rules[layer] = (layer_rules(self.store.records(layer)).get(layer)
                                  or low_interpretability_rule([]))
        return self._rules[layer]

    def unit_html(self, layer: str, unit: int) -> str:
        """Unit ``unit`` of ``layer``'s report card as self-contained HTML (images as
        base64 data URIs; what Jupyter shows for :meth:`unit`)."""
        return self.unit(layer, unit)._repr_html_()

    def to_html(self, layer: str | None = None, limit: int | None = TABLE_ROWS) -> str:
        """The run as a compact HTML table (what Jupyter shows for a run): per unit its top
        images' thumbnails, labels, score, interpretability, confidence and status, the
        first ``limit`` units (None: all) of ``layer`` (default: every layer). Images are
        embedded as base64 data URIs, so the saved notebook shows them anywhere."""
        from dnd.report.build import card_data
        from dnd.report.html import esc
        from dnd.report.inline import TABLE_PX, InlineImages, run_html
        from dnd.report.rules import layer_rules

        layers = self.layers if layer is None else [self._layer(layer)]
        records = [rec for la in layers for rec in self.store.records(la)]
        images = InlineImages(self.store, self._probe, max_px=TABLE_PX)
        shown = records if limit is None else records[:limit]
        self._rules.update(layer_rules(records))
        cards = [card_data(rec, images, self._rules[rec.layer]) for rec in shown]
        n_failed = sum(rec.failed for rec in records)
        heading = (f" &middot; model {esc(self.config.model)} &middot; "
                   f"{'layer' if len(self.layers) == 1 else 'layers'} "
                   f"{esc(', '.join(self.layers))} &middot; {len(records)} units"
                   + (f" &middot; {n_failed} failed" if n_failed else ""))
        return run_html(self.path.resolve().name, cards, total=len(records), heading=heading,
                        probe_ok=self._probe is not None,
                        show_layer=layer is None and len(self.layers) > 1)

    def _repr_html_(self) -> str:
        return self.to_html()


@dataclass(frozen=True, eq=False, repr=False)
class RunUnit(UnitRecord):
    """A :class:`dnd.record.UnitRecord` read from a run (:meth:`Run.unit`), which knows its
    run so that Jupyter shows it as its report card (:meth:`_repr_html_`; images embedded
    as base64 data URIs). It compares equal to the plain record with the same content; its
    repr is one line (a notebook keeps the repr beside the card; ``to_json()`` has all)."""

    run: Run | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, rec: UnitRecord, run: Run) -> RunUnit:
        return cls(**{f.name: getattr(rec, f.name) for f in dataclasses.fields(UnitRecord)},
                   run=run)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UnitRecord):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name)
                   for f in dataclasses.fields(UnitRecord))

    __hash__ = UnitRecord.__hash__

    def __repr__(self) -> str:
        state = (f"failed at {self.failed_at}" if self.failed
                 else f"stage {self.stage or 'none'}")
        return (f"<dnd.RunUnit {self.layer} #{self.unit}: "
                f"{self.labels[0] if self.labels else '(no label)'!r}, {state}>")

    def _repr_html_(self) -> str | None:
        if self.run is None:
            return None  # not from a run: IPython shows the repr
        from dnd.report.inline import InlineImages, unit_html

        return unit_html(self, InlineImages(self.run.store, self.run._probe),
                         self.run._rule(self.layer))


def _row(rec: UnitRecord) -> tuple[Any, ...]:
    """One row of :meth:`Run.labels` (without the layer), in LABEL_COLUMNS order."""
    labels = [*rec.labels[:3], None, None, None][:3]
    scoring = rec.scoring
    score = scoring.selection.winner_score if scoring and scoring.selection else None
    return (rec.unit, *labels, _float(score), _float(scoring and scoring.interpretability),
            _float(scoring and scoring.confidence), rec.stage, rec.failed, rec.error)


def _float(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _spans(units: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out: list[str] = []
    start = prev = units[0]
    for u in [*units[1:], None]:
        if u is not None and u == prev + 1:
            prev = u
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if u is not None:
            start = prev = u
    return ", ".join(out)
