"""Labels side by side: comparison pages against ground truth, and a human rating study.

:func:`comparison_page` draws methods' labels beside each unit's ground truth (the toy
world's demo and benchmarks); :func:`export_rating` writes a run's units with every
method's labels in a seeded random order (``dnd report RUN_DIR --export-rating``).
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dnd.io import atomic_write_text
from dnd.report.html import esc, page
from dnd.report.images import ReportImages, open_run_probe, run_config
from dnd.store import RunStore


def export_rating(run_dir: str | Path, out: str | Path, seed: int = 0,
                  methods: Mapping[str, str | Path] | None = None) -> tuple[Path, Path]:
    """Write a rating study's units as ``out.csv`` and ``out.json``; return both paths.

    Per labelled unit: its activating images (absolute paths of report image files) and
    the labels of every method, DnD's Labels 1-3 plus ``methods`` (name -> labels.csv in
    either layout of :func:`dnd.evaluation.labels.read_labels`), shuffled per unit with a
    seed derived from (seed, layer, unit) so raters cannot tell the methods apart.
    """
    from dnd.evaluation.labels import read_labels

    store = RunStore(run_dir)
    images = ReportImages(store, open_run_probe(run_config(store)))
    others: dict[str, dict[str, dict[int, list[str]]]] = {name: {} for name in methods or {}}
    units = []
    for rec in store.all_records():
        if not rec.labels:
            continue
        layer, unit = rec.layer, rec.unit
        options = [{"method": "dnd", "labels": list(rec.labels[:3])}]
        for name, path in (methods or {}).items():
            if layer not in others[name]:
                others[name][layer] = {u.unit: list(u.labels[:3])
                                       for u in read_labels(path, layer)}
            if unit in others[name][layer]:
                options.append({"method": name, "labels": others[name][layer][unit]})
        random.Random(f"{seed}:{layer}:{unit}").shuffle(options)
        paths = [images.evidence(ev, large=True)
                 for ev in (rec.crops.activating if rec.crops else ())]
        units.append({"layer": layer, "unit": unit,
                      "images": [str((images.out / p).resolve()) for p in paths if p],
                      "options": options})
    out = Path(out)
    json_path, csv_path = out.with_suffix(".json"), out.with_suffix(".csv")
    atomic_write_text(json_path, json.dumps({"seed": seed, "units": units}, indent=1))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "unit", "images", "position", "method", "label_1", "label_2",
                "label_3"])
    for u in units:
        for pos, opt in enumerate(u["options"], 1):
            w.writerow([u["layer"], u["unit"], ";".join(u["images"]), pos, opt["method"],
                        *(opt["labels"] + ["", "", ""])[:3]])
    atomic_write_text(csv_path, buf.getvalue())
    return csv_path, json_path


def comparison_page(title: str, layers: Mapping[str, Mapping[str, Any]],
                    intro: str = "") -> str:
    """Methods side by side with ground truth, one table per layer.

    ``layers``: layer -> {"methods": [name, ...], "truths": {unit: concept or None},
    "labels": {method: {unit: label}}, "agrees": {method: {unit: bool}},
    "links": {unit: relative href of the unit's DnD page}}. ``intro``: HTML placed before
    the tables, already escaped by the caller.
    """
    parts = [f"<header><b>{esc(title)}</b></header><main>{intro}"]
    for layer, t in layers.items():
        methods = list(t["methods"])
        head = "".join(f"<th>{esc(m)}</th>" for m in methods)
        rows = []
        for unit, truth in sorted(t["truths"].items()):
            link = t.get("links", {}).get(unit)
            cell_unit = f'<a href="{esc(link)}">{esc(unit)}</a>' if link else esc(unit)
            cells = "".join(
                f'<td class="{"ok" if t["agrees"][m].get(unit) else ""}">'
                f"{esc(t['labels'][m].get(unit, ''))}</td>" for m in methods)
            rows.append(f"<tr><td>{cell_unit}</td><td>{esc(truth or '(no clear concept)')}"
                        f"</td>{cells}</tr>")
        parts.append(f"<h2>{esc(layer)}</h2><table class=cmp><tr><th>unit</th>"
                     f"<th>ground truth</th>{head}</tr>{''.join(rows)}</table>")
    parts.append("<p>Green cells name the ground-truth concept (keyword match with "
                 "synonyms).</p></main>")
    return page(title, "".join(parts))

