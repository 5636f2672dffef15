"""`dnd report RUN_DIR`: a static HTML browser of a run's unit records.

```
<run>/report/index.html                 one card per unit, search/sort/filter in inline JS
<run>/report/units/<layer>/<unit>.html  everything that explains one unit's label
<run>/report/img/probe|crop|gen/*.jpg   JPEG thumbnails (probe images re-read from the run's
                                        probing set, generated ones copied from the cache)
```

Every text a model produced (captions, replies, labels, candidates, errors) is HTML-escaped;
the index's unit data is JSON inside a <script> with ``<``, ``>`` and ``&`` escaped.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from dnd.config import RunConfig
from dnd.io import atomic_write_bytes, atomic_write_text
from dnd.probe import ProbeError, ProbeSet, open_probe
from dnd.report.assets import CSS, INDEX_JS
from dnd.stages.caption import evidence_image
from dnd.store import RunStore, safe_name

log = logging.getLogger("dnd")

GRID_PX = 160   # thumbnails in grids and cards
LARGE_PX = 320  # top images with their crop boxes, rating-study images
CARD_THUMBS = 4


def esc(value: Any) -> str:
    """HTML-escaped text of any value (None as an empty string)."""
    return html.escape("" if value is None else str(value))


def script_json(value: Any) -> str:
    """JSON safe inside <script>: no '</script>', '<!--' or entity can end or alter it."""
    return (json.dumps(value, ensure_ascii=False).replace("&", "\\u0026")
            .replace("<", "\\u003c").replace(">", "\\u003e"))


def _num(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else esc(x)


class _Images:
    """Writes the report's image files once per build; paths are relative to report/."""

    def __init__(self, run: Path, out: Path, probe: ProbeSet | None):
        self.run, self.out, self.probe = run, out, probe
        self.sizes: dict[int, tuple[int, int]] = {}  # probe index -> original (w, h)
        self.done: set[str] = set()
        self.bad: set[int] = set()

    def _save(self, rel: str, image: Image.Image, px: int) -> str:
        thumb = image.convert("RGB")
        thumb.thumbnail((px, px))
        buf = io.BytesIO()
        thumb.save(buf, format="JPEG", quality=85)
        atomic_write_bytes(self.out / rel, buf.getvalue(), durable=False)
        self.done.add(rel)
        return rel

    def _load(self, index: int) -> Image.Image | None:
        """Probe image ``index``; None (once warned) when it is gone or unreadable, so one
        bad file costs a placeholder, not the report."""
        if self.probe is None or index in self.bad:
            return None
        try:
            image = self.probe.load(index)
        except (OSError, IndexError) as e:
            log.warning("report: probe image %d unreadable (%s)", index, e)
            self.bad.add(index)
            return None
        self.sizes[index] = image.size
        return image

    def probe_image(self, index: int, large: bool = False) -> str | None:
        """Thumbnail of probe image ``index`` (None if it cannot be read)."""
        index = int(index)
        rel = f"img/probe/{index}{'_l' if large else ''}.jpg"
        if rel in self.done:
            return rel
        image = self._load(index)
        return None if image is None else self._save(rel, image, LARGE_PX if large else GRID_PX)

    def size(self, index: int) -> tuple[int, int] | None:
        """Original size of a probe image, the pixel space of crop boxes."""
        if int(index) not in self.sizes:
            self._load(int(index))
        return self.sizes.get(int(index))

    def evidence(self, ev: Mapping[str, Any], large: bool = False) -> str | None:
        """Thumbnail of an activating-image record: the probe image or its crop."""
        if not ev.get("box"):
            return self.probe_image(ev["index"], large)
        box = [int(v) for v in ev["box"]]
        rel = f"img/crop/{int(ev['index'])}_{'-'.join(map(str, box))}{'_l' if large else ''}.jpg"
        if rel in self.done:
            return rel
        if self._load(int(ev["index"])) is None:
            return None
        # evidence_image is the pipeline's own definition of a record's pixels.
        return self._save(rel, evidence_image(self.probe, ev), LARGE_PX if large else GRID_PX)

    def heatmap(self, unit: int, index: int, act_map: list) -> str:
        """A translucent warm-colour PNG of a unit's activation map on one image."""
        rel = f"img/heat/{int(unit)}_{int(index)}.png"
        if rel not in self.done:
            m = np.asarray(act_map, dtype=np.float32)
            span = float(m.max() - m.min())
            v = (m - m.min()) / span if span > 0 else np.zeros_like(m)
            # Transparent where the unit is quiet, opaque red-to-yellow where it fires.
            rgba = np.stack([np.full_like(v, 255), 255 * v, np.zeros_like(v), 190 * v], -1)
            buf = io.BytesIO()
            Image.fromarray(rgba.astype(np.uint8), "RGBA").save(buf, format="PNG")
            atomic_write_bytes(self.out / rel, buf.getvalue(), durable=False)
            self.done.add(rel)
        return rel

    def generated(self, key: str) -> str | None:
        """Copy of a generated image's cached thumbnail (None if the cache lacks it)."""
        name = safe_name(key)
        rel = f"img/gen/{name}.jpg"
        if rel not in self.done:
            src = self.run / "cache" / "generated" / f"{name}.jpg"
            if not src.is_file():
                return None
            (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, self.out / rel)
            self.done.add(rel)
        return rel


def _open_run_probe(run: Path) -> ProbeSet | None:
    """The run's probing set, or None (with a warning) when it cannot be opened any more."""
    try:
        config = RunConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
        return open_probe(config.probe)
    except (OSError, ProbeError, ValueError) as e:
        log.warning("report without probe images: cannot open the run's probing set (%s)", e)
        return None


def _records(run: Path) -> list[dict[str, Any]]:
    """Every readable unit record of every layer, by layer folder then unit id."""
    store = RunStore(run)
    folders = sorted(p for p in (run / "units").glob("*") if p.is_dir())
    return [rec for folder in folders for rec in store.records(folder.name)]


def _winner(rec: Mapping[str, Any]) -> float | None:
    sel = rec.get("selection")
    return sel["final_scores"][sel["order"][0]] if sel and sel.get("order") else None


def build_report(run_dir: str | Path) -> Path:
    """Write ``<run>/report/`` (index, one page per unit, images); return index.html's path."""
    run = Path(run_dir)
    if not (run / "units").is_dir():
        raise FileNotFoundError(f"{run} is not a dnd run directory (no units/ folder)")
    out = run / "report"
    images = _Images(run, out, _open_run_probe(run))
    cards = []
    for rec in _records(run):
        layer, unit = str(rec.get("layer", "")), int(rec["unit"])
        href = f"units/{safe_name(layer)}/{unit}.html"
        # Report files are rebuilt from the records on every run: no flush to disk.
        atomic_write_text(out / href, unit_page(rec, images), durable=False)
        top = rec.get("top_images") or rec.get("activating_images") or []
        thumbs = [images.probe_image(e["index"]) for e in top[:CARD_THUMBS]]
        cards.append({"layer": layer, "unit": unit, "href": href,
                      "labels": [str(x) for x in rec.get("labels") or []],
                      "score": _winner(rec), "interp": rec.get("interpretability"),
                      "thumbs": [t for t in thumbs if t], "error": rec.get("error")})
    index = out / "index.html"
    atomic_write_text(index, index_page(run, cards, probe_ok=images.probe is not None))
    return index


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>{body}</body></html>\n")


def index_page(run: Path, cards: list[dict[str, Any]], probe_ok: bool = True) -> str:
    """The index: unit data as one inline JSON array, cards rendered by INDEX_JS."""
    note = "" if probe_ok else "<p class=err>The probing set could not be opened: no images.</p>"
    body = (f"<header><b>dnd report</b> &middot; {esc(run.resolve().name)} &middot; "
            f"{len(cards)} units</header><main>{note}"
            '<div class=controls><input id=q type=search placeholder="search labels" '
            'aria-label="search labels">'
            '<label>sort <select id=sort><option value=unit>unit id</option>'
            '<option value=score>final score</option>'
            '<option value=interp>interpretability</option></select></label>'
            '<label>layer <select id=layer><option value="">all layers</option></select>'
            "</label><span id=count></span></div>"
            "<noscript>This page needs JavaScript to list the units.</noscript>"
            "<div id=grid></div></main>"
            f'<script type="application/json" id="units-data">{script_json(cards)}</script>'
            f"<script>{INDEX_JS}</script>")
    return _page(f"dnd report: {run.resolve().name}", body)


def _img(rel: str | None, up: str, alt: str = "") -> str:
    if rel is None:
        return '<div class=noimg style="width:160px;height:160px;background:#eee"></div>'
    return f'<img src="{esc(up + rel)}" alt="{esc(alt)}" loading="lazy">'


def _boxed(images: _Images, top: Mapping[str, Any], boxes: list, up: str,
           unit: int) -> str:
    """A top image with the unit's activation heatmap over the region the network saw and
    its attention-crop boxes (original-image pixels) drawn over it."""
    rel, size = images.probe_image(top["index"], large=True), images.size(top["index"])
    if rel is None or size is None:
        return _img(None, up)
    w, h = size
    heat = ""
    if top.get("map") and top.get("view_box"):
        x0, y0, x1, y1 = (int(v) for v in top["view_box"])
        href = esc(up + images.heatmap(unit, top["index"], top["map"]))
        heat = (f'<image class=heat href="{href}" x="{x0}" y="{y0}" width="{x1 - x0}" '
                f'height="{y1 - y0}" preserveAspectRatio="none"/>')
    rects = "".join(f'<rect x="{b[0]}" y="{b[1]}" width="{b[2] - b[0]}" '
                    f'height="{b[3] - b[1]}"/>' for b in boxes)
    svg = f'<svg viewBox="0 0 {w} {h}" preserveAspectRatio="none">{heat}{rects}</svg>'
    return (f'<figure style="width:250px"><div class=boxed>{_img(rel, up)}{svg}</div>'
            f"{esc(top.get('image'))} &middot; act {_num(top.get('activation'))} &middot; "
            f"{len(boxes)} crop(s)</figure>")


def why_sentence(sel: Mapping[str, Any]) -> str:
    """Plain-text reason the winner won: best final score = (C - position) x weight."""
    c = len(sel["candidates"])
    w = sel["order"][0]
    text = (f"\u201c{sel['candidates'][w]}\u201d won with the best final score "
            f"{sel['final_scores'][w]:.3f} = ({c} \u2212 position {sel['positions'][w]}) "
            f"\u00d7 image-product weight {sel['weights'][w]:.3f}; its rank score "
            f"({sel['rank_score_name']}, lower is better) was {sel['rank_scores'][w]:.3f}.")
    if c > 1:
        r = sel["order"][1]
        text += (f" Runner-up \u201c{sel['candidates'][r]}\u201d scored "
                 f"{sel['final_scores'][r]:.3f}.")
    return text


def _candidate_table(rec: Mapping[str, Any], images: _Images, up: str) -> str:
    sel = rec["selection"]
    c = len(sel["candidates"])
    top_k = set(sel.get("top_k") or [])
    rows = []
    for place, i in enumerate(sel["order"], 1):
        name = sel["candidates"][i]
        mine = [j for j, owner in enumerate(sel["image_candidate"]) if owner == i]
        ranks = ", ".join(f"{sel['ranks'][j]:g}" for j in sorted(mine,
                                                                 key=lambda j: sel["ranks"][j]))
        mine_top = sum(j in top_k for j in mine)
        gens = "".join(_img(images.generated(k), up, name)
                       for k in (rec.get("generated") or {}).get(name, []))
        rows.append(
            f"<tr class=\"{'winner' if place == 1 else ''}\"><td>{place}</td>"
            f"<td class=cand>{esc(name)}</td><td class=gen>{gens}</td><td>{ranks}</td>"
            f"<td>{mine_top}</td>"
            f"<td>{_num(sel['rank_scores'][i])}</td><td>{sel['positions'][i]}</td>"
            f"<td>{_num(sel['weights'][i])}{' (no image in top-k)' if not mine_top else ''}"
            f"</td><td>{_num(sel['final_scores'][i])}</td></tr>")
    return ("<table id=candidates><tr><th>#</th><th>candidate</th><th>generated images</th>"
            f"<th>ranks of its images (1 = highest activation)</th><th>in top-{sel['k']}</th>"
            f"<th>rank score ({esc(sel['rank_score_name'])}, beta {esc(sel['beta'])})</th>"
            f"<th>position</th><th>image-product weight</th><th>final score "
            f"= ({c} &minus; position) &times; weight</th></tr>{''.join(rows)}</table>")


def unit_page(rec: Mapping[str, Any], images: _Images) -> str:
    """One unit's page: labels, evidence images with crop boxes, captions, candidates."""
    up = "../../"
    layer, unit = rec.get("layer", ""), rec["unit"]
    parts = [f'<header><a href="{up}index.html">&larr; all units</a> &middot; '
             f"{esc(rec.get('model'))} &middot; layer {esc(layer)} &middot; unit {esc(unit)}"
             "</header><main>"]
    labels = rec.get("labels") or []
    parts.append(f"<h1 id=label>{esc(labels[0]) if labels else 'no label'}</h1>")
    if labels[1:]:
        parts.append("<p>Labels 2-3: " + " &middot; ".join(
            f"<span class=label2>{esc(x)}</span>" for x in labels[1:]) + "</p>")
    if rec.get("error"):
        parts.append(f"<p class=err id=error>Failed at {esc(rec.get('failed_at'))}: "
                     f"{esc(rec['error'])}</p>")
    parts.append(f"<p>Interpretability score: {_num(rec.get('interpretability'))}</p>")
    if rec.get("selection"):
        parts.append(f"<p class=why id=why>{esc(why_sentence(rec['selection']))}</p>")

    crops = rec.get("crops") or []
    if rec.get("top_images"):
        figs = [_boxed(images, t, [c["box"] for c in crops
                                   if c.get("box") and c["index"] == t["index"]], up, unit)
                for t in rec["top_images"]]
        parts.append("<h2>Top images: activation heatmap and attention crops</h2>"
                     f"<div class=imgs>{''.join(figs)}</div>")

    captions = rec.get("captions") or []
    cands = rec.get("candidates") or {}
    simplified = cands.get("simplified") or []
    aligned = len(simplified) == len(captions)
    if rec.get("activating_images"):
        figs = []
        for i, ev in enumerate(rec["activating_images"]):
            cap = f"<div class=caption>{esc(captions[i])}</div>" if i < len(captions) else ""
            if aligned and simplified:
                cap += f"<div class=simplified><i>{esc(simplified[i])}</i></div>"
            kind = "crop" if ev.get("box") else "image"
            figs.append(f"<figure>{_img(images.evidence(ev), up, kind)}"
                        f"<div>{esc(ev.get('image'))} ({kind}) act "
                        f"{_num(ev.get('activation'))}</div>{cap}</figure>")
        parts.append(f"<h2>Activating images and captions</h2><div class=imgs>{''.join(figs)}"
                     "</div>")
    if simplified and not aligned:
        parts.append("<h2>Simplified captions</h2><ul>" + "".join(
            f"<li>{esc(s)}</li>" for s in simplified) + "</ul>")
    if cands.get("replies"):
        parts.append("<details><summary>LLM replies</summary>" + "".join(
            f"<pre>{esc(r)}</pre>" for r in cands["replies"]) + "</details>")
    if cands.get("error"):
        parts.append(f"<p class=err>Candidates: {esc(cands['error'])}</p>")

    if rec.get("selection"):
        parts.append("<h2>Candidate concepts</h2>" + _candidate_table(rec, images, up))
    elif cands.get("concepts"):
        parts.append("<h2>Candidate concepts</h2><ul>" + "".join(
            f"<li>{esc(c)}</li>" for c in cands["concepts"]) + "</ul>")
    if rec.get("dropped"):
        parts.append("<h3>Dropped candidates</h3><ul>" + "".join(
            f"<li>{esc(c)}: {esc(why)}</li>" for c, why in rec["dropped"].items()) + "</ul>")
    parts.append("</main>")
    return _page(f"{layer} #{unit}: {labels[0] if labels else 'no label'}", "".join(parts))


def export_rating(run_dir: str | Path, out: str | Path, seed: int = 0,
                  methods: Mapping[str, str | Path] | None = None) -> tuple[Path, Path]:
    """Write a rating study's units as ``out.csv`` and ``out.json``; return both paths.

    Per labelled unit: its activating images (absolute paths of report image files) and
    the labels of every method, DnD's Labels 1-3 plus ``methods`` (name -> labels.csv in
    either layout of :func:`dnd.evaluation.labels.read_labels`), shuffled per unit with a
    seed derived from (seed, layer, unit) so raters cannot tell the methods apart.
    """
    from dnd.evaluation.labels import read_labels

    run = Path(run_dir)
    images = _Images(run, run / "report", _open_run_probe(run))
    others = {name: {} for name in methods or {}}
    units = []
    for rec in _records(run):
        if not rec.get("labels"):
            continue
        layer, unit = str(rec.get("layer", "")), int(rec["unit"])
        options = [{"method": "dnd", "labels": list(rec["labels"][:3])}]
        for name, path in (methods or {}).items():
            if layer not in others[name]:
                others[name][layer] = {u.unit: list(u.labels[:3])
                                       for u in read_labels(path, layer)}
            if unit in others[name][layer]:
                options.append({"method": name, "labels": others[name][layer][unit]})
        random.Random(f"{seed}:{layer}:{unit}").shuffle(options)
        paths = [images.evidence(ev, large=True) for ev in rec.get("activating_images") or []]
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


def comparison_page(title: str, layers: Mapping[str, Mapping[str, Any]]) -> str:
    """Methods side by side with ground truth, one table per layer.

    ``layers``: layer -> {"methods": [name, ...], "truths": {unit: concept or None},
    "labels": {method: {unit: label}}, "agrees": {method: {unit: bool}},
    "links": {unit: relative href of the unit's DnD page}}.
    """
    parts = [f"<header><b>{esc(title)}</b></header><main>"]
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
    return _page(title, "".join(parts))
