"""`dnd demo`: the whole DnD pipeline on the toy world, offline, with ground truth.

Describes every unit of the toy CNN's final layer and 32 hidden units of ``conv4`` with the
``toyworld`` preset (toy BLIP, consensus summariser, scene renderer, toy CLIP), then judges
each description against ground truth:

- final layer: unit i's truth is ``CLASS_NAMES[i]`` (e.g. "red circle");
- hidden units: the concept whose presence best predicts the unit's activation (average
  precision, :mod:`dnd.toyworld.groundtruth`); units without a clear concept are counted
  but not judged.

The judge is a keyword match (:func:`dnd.toyworld.groundtruth.mentions`): a label agrees
with a concept when it names every word of the concept, each word through any of its
synonyms in :data:`dnd.toyworld.world.SYNONYMS` ("crimson disc" agrees with "red circle").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dnd.benchmarks.common import describe_toy_layers, layer_truths
from dnd.io import atomic_write_json, atomic_write_text
from dnd.record import UnitRecord
from dnd.store import RunStore
from dnd.toyworld.groundtruth import mentions
from dnd.toyworld.probe import probe_scenes


@dataclass(frozen=True)
class LayerAgreement:
    """Agreement of one layer's labels with ground truth."""

    layer: str
    units: int
    judged: int      # units with a clear ground-truth concept
    label1: int      # judged units whose Label 1 names the concept
    top3: int        # judged units whose Labels 1-3 include it

    def cells(self) -> list[str]:
        """layer, units, judged, Label 1 agrees, Labels 1-3 agree (counts with percents)."""
        pct = (lambda k: f"{100 * k / self.judged:.1f}%") if self.judged else (lambda k: "-")
        return [self.layer, str(self.units), str(self.judged),
                f"{self.label1} ({pct(self.label1)})", f"{self.top3} ({pct(self.top3)})"]

    def row(self) -> str:
        return "| " + " | ".join(self.cells()) + " |"


def _agreement(layer: str, records: list[UnitRecord], truths: dict[int, str | None]) -> tuple[
        LayerAgreement, list[dict]]:
    rows = []
    for rec in records:
        truth = truths.get(rec.unit)
        labels = list(rec.labels)
        rows.append({"unit": rec.unit, "truth": truth, "labels": labels,
                     "label1_agrees": bool(truth and labels and mentions(labels[0], truth)),
                     "top3_agrees": bool(truth and any(mentions(x, truth) for x in labels))})
    judged = [r for r in rows if r["truth"]]
    return LayerAgreement(layer, len(rows), len(judged),
                          sum(r["label1_agrees"] for r in judged),
                          sum(r["top3_agrees"] for r in judged)), rows


def run_demo(root: str | Path = "runs/demo", *, n_probe: int = 2000, hidden_layer: str = "conv4",
             hidden_units: str = "0-31", progress: bool = True) -> list[LayerAgreement]:
    """Describe the toy CNN's fc layer and ``hidden_units`` of ``hidden_layer``; judge them.

    Writes ``<root>/<layer>/`` run directories (each with its report),
    ``<root>/agreement.{md,json}`` and ``<root>/index.html``, a page linking both layers'
    reports with the agreement table and every unit's labels next to its ground truth.
    Then the short version of the planted-unit benchmark (``planted_demo``: the planted
    units of ``toyworld-planted``'s conv4, run in ``<root>/planted/conv4``), added to
    ``agreement.md`` and printed.
    """
    root = Path(root)
    results = describe_toy_layers(root, n_probe, [("fc", "all"), (hidden_layer, hidden_units)],
                                  progress=progress)
    scenes = probe_scenes(n_probe)
    table, details = [], {}
    for layer, res in results.items():
        records = RunStore(res.run_dir).records(layer)
        agreement, rows = _agreement(layer, records, layer_truths(layer, res, scenes))
        table.append(agreement)
        details[layer] = rows
    lines = ["| layer | units | with clear ground truth | Label 1 agrees | Labels 1-3 agree |",
             "| --- | --- | --- | --- | --- |", *(a.row() for a in table)]
    md = ("Toy-world demo: DnD labels vs ground truth (keyword match with synonyms). "
          "Candidates from the consensus summariser (the toyworld preset: the words, phrases "
          "and conjunctions the captions share, no LLM); `dnd tables --only "
          "toyworld_benchmark` also measures "
          "an LLM summariser.\n\n"
          + "\n".join(lines) + "\n")
    from dnd.benchmarks.planted import planted_demo

    md += "\n" + "\n".join(planted_demo(root / "planted", n_probe, progress=progress)) + "\n"
    atomic_write_text(root / "agreement.md", md)
    atomic_write_json(root / "agreement.json", details)
    top = write_top_page(root, table, details)
    print(md)
    print(f"Reports of both layers: {top}; the planted units' report: "
          f"{RunStore(root / 'planted' / 'conv4').report_dir / 'index.html'}")
    return table


def write_top_page(root: Path, table: list[LayerAgreement], details: dict[str, list[dict]]
                   ) -> Path:
    """Write ``<root>/index.html``: the agreement table with a link to each layer's report,
    then per layer every unit's Label 1 and Labels 2-3 beside its ground truth (green where
    they name it), each unit linking to its page. Static, opens from file://."""
    from urllib.parse import quote

    from dnd.report.compare import comparison_page
    from dnd.report.html import esc
    from dnd.store import safe_name

    rows = []
    for a in table:
        report = RunStore(root / a.layer).report_dir / "index.html"
        link = (f'<a href="{esc(quote(f"{a.layer}/report/index.html"))}">report</a>'
                if report.is_file() else "no report (see the run's log)")
        rows.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in a.cells())
                    + f"<td>{link}</td></tr>")
    intro = ("<p>The toy CNN's units described by <code>dnd demo</code> with the "
             "<code>toyworld</code> preset (candidates from the consensus summariser, no "
             "LLM), judged against the toy world's ground truth "
             "(keyword match with synonyms).</p><table id=agreement><tr><th>layer</th>"
             "<th>units</th><th>with clear ground truth</th><th>Label 1 agrees</th>"
             f"<th>Labels 1-3 agree</th><th>report</th></tr>{''.join(rows)}</table>")
    layers = {}
    for layer, unit_rows in details.items():
        units = f"{layer}/report/units/{safe_name(layer)}"
        layers[layer] = {
            "methods": ["Label 1", "Labels 2-3"],
            "truths": {r["unit"]: r["truth"] for r in unit_rows},
            "labels": {"Label 1": {r["unit"]: (r["labels"] or [""])[0] for r in unit_rows},
                       "Labels 2-3": {r["unit"]: " \u00b7 ".join(r["labels"][1:3])
                                      for r in unit_rows}},
            "agrees": {"Label 1": {r["unit"]: r["label1_agrees"] for r in unit_rows},
                       "Labels 2-3": {r["unit"]: bool(r["truth"]) and any(
                           mentions(x, r["truth"]) for x in r["labels"][1:3])
                           for r in unit_rows}},
            "links": {r["unit"]: quote(f"{units}/{r['unit']}.html") for r in unit_rows}}
    path = root / "index.html"
    atomic_write_text(path, comparison_page("dnd demo: toy world", layers, intro=intro))
    return path
