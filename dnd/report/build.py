"""`dnd report RUN_DIR`: a static HTML browser of a run's unit records.

```
<run>/report/index.html                 one card per unit, search/sort/filter in inline JS
<run>/report/units/<layer>/<unit>.html  everything that explains one unit's label
<run>/report/img/probe|crop|gen/*.jpg   JPEG thumbnails (probe images re-read from the run's
                                        probing set, generated ones copied from the cache)
```

Every text a model produced (captions, replies, labels, candidates, errors) is HTML-escaped;
the index's unit data is JSON inside a <script> with ``<``, ``>`` and ``&`` escaped.

Pages say only what the records hold: a run stopped early (``--stop-after``) says so, a
failed unit's card gives a short reason (the full error is on its page), a layer without
spatial maps gets no heatmap or crop counts, and units whose interpretability score is low
for their layer are marked, with the rule's numbers (:func:`low_interpretability_rule`).
A dictionary feature's page (layer ``conv4.nmf``) lists the neurons it mixes, with their
labels when the run described them, and a neuron's page the features that use it
(:mod:`dnd.report.dictionary`).
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from dnd.config import RunConfig
from dnd.io import atomic_write_bytes, atomic_write_text
from dnd.probe import ProbeError, ProbeSet, open_probe
from dnd.record import Evidence, Scoring, Selection, UnitRecord
from dnd.report.assets import CSS, INDEX_JS
from dnd.report.dictionary import LayerMixes, layer_mixes
from dnd.store import RunStore, safe_name
from dnd.textvis import textvis_section

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
    """Writes the report's image files once per build; paths are relative to report/.

    Every image goes out through :meth:`_put` or :meth:`_put_file`, which return what a
    page's ``src`` names (here the file's path relative to report/); ``done`` maps each
    image's report path to it, so an image shown twice is made once. A subclass that
    returns data URIs instead renders the same pages inline (:mod:`dnd.report.inline`).
    """

    def __init__(self, store: RunStore, probe: ProbeSet | None):
        self.store, self.out, self.probe = store, store.report_dir, probe
        self.sizes: dict[int, tuple[int, int]] = {}  # probe index -> original (w, h)
        self.done: dict[str, str] = {}  # report path -> the src that shows it
        self.bad: set[int] = set()

    def _put(self, rel: str, data: bytes) -> str:
        """Keep an image's bytes as ``rel`` (a path under report/); return its src."""
        # Report files are rebuilt from the records on every run: no flush to disk.
        atomic_write_bytes(self.out / rel, data, durable=False)
        self.done[rel] = rel
        return rel

    def _put_file(self, rel: str, src: Path) -> str:
        """Keep a copy of the image file ``src`` as ``rel``; return its src."""
        (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, self.out / rel)
        self.done[rel] = rel
        return rel

    def _save(self, rel: str, image: Image.Image, px: int) -> str:
        thumb = image.convert("RGB")
        thumb.thumbnail((px, px))
        buf = io.BytesIO()
        thumb.save(buf, format="JPEG", quality=85)
        return self._put(rel, buf.getvalue())

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
            return self.done[rel]
        image = self._load(index)
        return None if image is None else self._save(rel, image, LARGE_PX if large else GRID_PX)

    def size(self, index: int) -> tuple[int, int] | None:
        """Original size of a probe image, the pixel space of crop boxes."""
        if int(index) not in self.sizes:
            self._load(int(index))
        return self.sizes.get(int(index))

    def evidence(self, ev: Evidence, large: bool = False) -> str | None:
        """Thumbnail of an evidence image: the probe image or its crop."""
        if not ev.box:
            return self.probe_image(ev.index, large)
        rel = f"img/crop/{ev.index}_{'-'.join(map(str, ev.box))}{'_l' if large else ''}.jpg"
        if rel in self.done:
            return self.done[rel]
        if self._load(ev.index) is None:
            return None
        # Evidence.pixels is the pipeline's own definition of a record's pixels.
        return self._save(rel, ev.pixels(self.probe), LARGE_PX if large else GRID_PX)

    def heatmap(self, layer: str, unit: int, index: int, act_map: Sequence[Sequence[float]]
                ) -> str:
        """A translucent warm-colour PNG of a unit's activation map on one image."""
        # By layer too: unit 0 of two conv layers on one image has two maps.
        rel = f"img/heat/{safe_name(layer)}/{int(unit)}_{int(index)}.png"
        if rel in self.done:
            return self.done[rel]
        m = np.asarray(act_map, dtype=np.float32)
        span = float(m.max() - m.min())
        v = (m - m.min()) / span if span > 0 else np.zeros_like(m)
        # Transparent where the unit is quiet, opaque red-to-yellow where it fires.
        rgba = np.stack([np.full_like(v, 255), 255 * v, np.zeros_like(v), 190 * v], -1)
        buf = io.BytesIO()
        Image.fromarray(rgba.astype(np.uint8), "RGBA").save(buf, format="PNG")
        return self._put(rel, buf.getvalue())

    def featurevis(self, layer: str, unit: int) -> list[tuple[str, list[tuple[str, float]],
                                                             list[float]]]:
        """The unit's feature visualizations (``dnd featurevis``), plain first: per kind,
        (kind, [(image path, activation)], activations of the starting noise); the PNGs
        are copied into the report."""
        from dnd.featurevis import unit_files

        root = self.store.featurevis_dir(layer).parent
        # texts/: a CLIP unit's top texts (dnd.textvis), a section of its own.
        kinds = sorted((p.name for p in root.iterdir() if p.is_dir() and p.name != "texts"),
                       key=lambda k: (k != "plain", k)) if root.is_dir() else []
        out = []
        for kind in kinds:
            meta, paths = unit_files(self.store.root, layer, unit, kind)
            if not paths or not all(p.is_file() for p in paths):
                continue
            data = json.loads(meta.read_text())
            shown = []
            for path, act in zip(paths, data["activations"], strict=True):
                rel = f"img/fv/{safe_name(layer)}/{kind}/{path.name}"
                shown.append((self.done.get(rel) or self._put_file(rel, path), float(act)))
            out.append((kind, shown, [float(a) for a in data["start_activations"]]))
        return out

    def generated(self, key: str) -> str | None:
        """Copy of a generated image's cached thumbnail (None if the cache lacks it)."""
        try:
            src = self.store.features.thumbnail(key)
        except ValueError as e:  # not a cache key: the record is damaged, not the report
            log.warning("report: generated image %r has no thumbnail (%s)", key, e)
            return None
        rel = f"img/gen/{src.name}"
        if rel in self.done:
            return self.done[rel]
        return self._put_file(rel, src) if src.is_file() else None


def _run_config(store: RunStore) -> RunConfig | None:
    """The run's saved config, or None (with a warning) when it is missing or unreadable."""
    try:
        return store.load_config()
    except (OSError, ValueError, TypeError, yaml.YAMLError) as e:
        log.warning("report without probe images: cannot read the run's config (%s)", e)
        return None


def _open_run_probe(config: RunConfig | None) -> ProbeSet | None:
    """The run's probing set, or None (with a warning) when it cannot be opened any more."""
    if config is None:
        return None  # _run_config said why
    try:
        return open_probe(config.probe)
    except (OSError, ProbeError, ValueError) as e:
        log.warning("report without probe images: cannot open the run's probing set (%s)", e)
        return None


def _scoring(rec: UnitRecord) -> Scoring:
    """The record's Step 3 part; an empty one before Step 3 (no score, no selection)."""
    return rec.scoring if rec.scoring is not None else Scoring(labels=())


LOW_INTERP_Z = 2.0         # robust standard deviations below the layer's median
LOW_INTERP_MIN_UNITS = 8   # fewer scored units: the layer's spread is unknown, flag nothing
_MAD_TO_SD = 1.4826        # MAD x this = standard deviation, for normally distributed scores


@dataclass(frozen=True)
class InterpretabilityRule:
    """Which units of one layer have a low interpretability score; see
    :func:`low_interpretability_rule`. ``threshold`` is None when the rule cannot judge."""

    n: int                     # units of the layer with a score
    median: float | None
    spread: float | None       # robust standard deviation, 1.4826 x MAD
    threshold: float | None    # scores strictly below it are low

    def is_low(self, score: float | None) -> bool:
        return self.threshold is not None and score is not None and score < self.threshold

    def explain(self, score: float | None) -> str:
        """Plain text: the unit's score against the rule, with the rule's numbers."""
        if score is None:
            return "No interpretability score yet (computed at the labels stage)."
        head = f"Interpretability score {score:.3f}"
        if self.threshold is None:
            why = (f"only {self.n} scored unit(s) in this layer, at least "
                   f"{LOW_INTERP_MIN_UNITS} are needed" if self.n < LOW_INTERP_MIN_UNITS
                   else "the layer's scores have no spread")
            return f"{head}; not judged against the layer: {why}."
        rule = (f"this layer's low threshold {self.threshold:.3f} = median {self.median:.3f} "
                f"\u2212 {LOW_INTERP_Z:g} \u00d7 robust SD {self.spread:.3f} over its "
                f"{self.n} scored units")
        if not self.is_low(score):
            return f"{head}, above {rule}."
        return (f"{head} is below {rule}: the unit's top activating images have little in "
                "common by the encoder's measure, so its label is weak evidence of what it "
                "detects.")


def low_interpretability_rule(scores: Sequence[float | None]) -> InterpretabilityRule:
    """The rule that marks a unit's interpretability score as low, for one layer of one run.

    The interpretability score (:func:`dnd.stages.select.interpretability_score`, the mean
    pairwise cosine of the unit's top activating images' embeddings) has no fixed scale:
    where unrelated images land depends on the encoder. So a unit is compared with the
    other units of its layer in the same run: it is **low** when its score is below
    ``median - 2 x 1.4826 x MAD`` of the layer's scores (a robust z-score below -2; about
    2% of units when scores are normally distributed). The rule does not change when all
    scores are shifted or scaled, so it holds for every encoder without a per-encoder
    constant. It judges nothing with fewer than 8 scored units or zero spread (MAD = 0),
    and being relative it cannot flag a layer whose units are all uninterpretable.

    Measured on the toy world's conv4 units 0-31 (``dnd demo``, 2,000 probing scenes):
    median 0.646, robust SD 0.205, threshold 0.236; it flags unit 25 (0.136, labelled "cyan
    triangle" while its top images are red stars and triangles of several colours) and
    unit 0 (0.207, "yellow triangle" over green and yellow triangles and two hexagons), not
    the next, unit 12 (0.376, blue rings). With 800 scenes (``dnd describe --preset toyworld
    --layer conv4 --units 0-31 --probe toyworld:800``) the same two units (0.169, 0.296;
    threshold 0.359).
    The 64 fc units (median 0.665, lowest 0.578, threshold 0.533): none. At 2.5 robust SDs
    unit 25 would escape on the 2,000-scene run (threshold 0.133).

    ``scores``: one per unit of the layer; None (no score yet) is ignored.
    """
    s = np.array([x for x in scores if x is not None], dtype=np.float64)
    if len(s) < LOW_INTERP_MIN_UNITS:
        return InterpretabilityRule(len(s), float(np.median(s)) if len(s) else None, None,
                                    None)
    median = float(np.median(s))
    spread = _MAD_TO_SD * float(np.median(np.abs(s - median)))
    threshold = median - LOW_INTERP_Z * spread if spread > 0 else None
    return InterpretabilityRule(len(s), median, spread, threshold)


def short_reason(error: str, limit: int = 120) -> str:
    """The first line of an error, cut at a word boundary to at most ``limit`` characters."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = " ".join(lines[0].split()) if lines else ""
    if len(text) <= limit and len(lines) <= 1:
        return text
    if len(text) > limit - 1:
        text = text[:limit - 1].rsplit(" ", 1)[0] or text[:limit - 1]
    return text + "\u2026"


def build_report(run_dir: str | Path) -> Path:
    """Write ``<run>/report/`` (index, one page per unit, images); return index.html's path."""
    store = RunStore(run_dir)
    if not store.config_path.is_file():
        raise FileNotFoundError(f"{store.root} is not a dnd run directory (no "
                                f"{store.config_path.name})")
    config = _run_config(store)
    images = _Images(store, _open_run_probe(config))
    records = store.all_records()
    rules = layer_rules(records)
    mixes = layer_mixes(store, config, records)  # dictionary layers only
    cards = []
    for rec in records:
        href = f"units/{safe_name(rec.layer)}/{rec.unit}.html"
        # Report files are rebuilt from the records on every run: no flush to disk.
        atomic_write_text(store.report_dir / href,
                          unit_page(rec, images, rules[rec.layer], mixes.get(rec.layer),
                                    [m for m in mixes.values() if m.parent == rec.layer]),
                          durable=False)
        cards.append({**card_data(rec, images, rules[rec.layer]), "href": href})
    index = store.report_dir / "index.html"
    atomic_write_text(index, index_page(store.root, cards, probe_ok=images.probe is not None,
                                        stop_after=config.stop_after if config else None,
                                        rules=rules), durable=False)
    return index


def layer_rules(records: Sequence[UnitRecord]) -> dict[str, InterpretabilityRule]:
    """Layer -> its low-interpretability rule over ``records`` (a run's, all layers)."""
    by_layer: dict[str, list[float | None]] = {}
    for rec in records:
        by_layer.setdefault(rec.layer, []).append(_scoring(rec).interpretability)
    return {layer: low_interpretability_rule(s) for layer, s in by_layer.items()}


def card_data(rec: UnitRecord, images: _Images, rule: InterpretabilityRule) -> dict[str, Any]:
    """What a unit's card shows (the report's index and the notebook's run table): labels,
    Label 1's final score, interpretability (``low`` by its layer's ``rule``), confidence,
    stage, a short failure reason, and up to CARD_THUMBS thumbnails of its top images."""
    top = (rec.crops.top or rec.crops.activating) if rec.crops else ()
    thumbs = [images.probe_image(e.index) for e in top[:CARD_THUMBS]]
    scoring = _scoring(rec)
    return {"layer": rec.layer, "unit": rec.unit,
            "labels": [str(x) for x in rec.labels],
            "score": scoring.selection.winner_score if scoring.selection else None,
            "interp": scoring.interpretability,
            "confidence": scoring.confidence,
            "low": rule.is_low(scoring.interpretability),
            "fallback": bool(rec.fallbacks),
            "stage": rec.stage, "failed_at": rec.failed_at,
            "thumbs": [t for t in thumbs if t],
            # The card shows a short reason; the full error is on the unit page.
            "error": short_reason(rec.error) if rec.failed else None}


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>{body}</body></html>\n")


def index_page(run: Path, cards: list[dict[str, Any]], probe_ok: bool = True,
               stop_after: str | None = None,
               rules: Mapping[str, InterpretabilityRule] | None = None) -> str:
    """The index: unit data as one inline JSON array, cards rendered by INDEX_JS.

    ``stop_after``: the run's last stage, to say why units have no labels yet; ``rules``:
    layer -> its low-interpretability rule, stated under the controls.
    """
    notes = [] if probe_ok else [
        "<p class=err>The probing set could not be opened: no images.</p>"]
    if stop_after and stop_after != "labels":
        notes.append(f"<p class=note id=stopped>This run stopped after the "
                     f"<b>{esc(stop_after)}</b> stage (<code>--stop-after {esc(stop_after)}"
                     "</code>): its units have no labels or scores yet. Run the same "
                     "<code>dnd describe</code> command without <code>--stop-after</code> to "
                     "finish them.</p>")
    n_low = sum(bool(c.get("low")) for c in cards)
    n_failed = sum(bool(c.get("error")) for c in cards)
    judged = {layer: r for layer, r in (rules or {}).items() if r.threshold is not None}
    if judged:
        per_layer = "; ".join(f"{esc(layer)}: below {r.threshold:.3f}"
                              for layer, r in judged.items())
        rule = (f"an interpretability score more than {LOW_INTERP_Z:g} robust standard "
                f"deviations below the median of its layer ({per_layer})")
        notes.append(
            "<p class=note id=low-rule><span class=low-badge>low interpretability</span> "
            + (f"marks {n_low} unit(s) whose top images have little in common: {rule}. "
               "Their labels are weak evidence.</p>" if n_low else
               f"marks units whose top images have little in common: {rule}. None here."
               "</p>"))
    counts = f"{len(cards)} units" + (f" &middot; {n_failed} failed" if n_failed else "") + (
        f" &middot; {n_low} low interpretability" if n_low else "")
    body = (f"<header><b>dnd report</b> &middot; {esc(run.resolve().name)} &middot; "
            f"{counts}</header><main>{''.join(notes)}"
            '<div class=controls><input id=q type=search placeholder="search labels" '
            'aria-label="search labels">'
            '<label>sort <select id=sort><option value=unit>unit id</option>'
            '<option value=score>final score</option>'
            '<option value=confidence>confidence, highest first</option>'
            '<option value=interp>interpretability, highest first</option>'
            '<option value=interp_low>interpretability, lowest first</option></select></label>'
            '<label>layer <select id=layer><option value="">all layers</option></select>'
            "</label><label><input type=checkbox id=lowonly> only low interpretability"
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


def _boxed(images: _Images, top: Evidence, boxes: Sequence[Sequence[int]], up: str,
           layer: str, unit: int, count_crops: bool = True) -> str:
    """A top image with the unit's activation heatmap over the region the network saw (when
    the record has one) and its attention-crop boxes (original-image pixels) drawn over it;
    ``count_crops`` adds "N crop(s)" to the caption."""
    rel, size = images.probe_image(top.index, large=True), images.size(top.index)
    if rel is None or size is None:
        return _img(None, up)
    w, h = size
    heat = ""
    if top.act_map and top.view_box:
        x0, y0, x1, y1 = top.view_box
        href = esc(up + images.heatmap(layer, unit, top.index, top.act_map))
        heat = (f'<image class=heat href="{href}" x="{x0}" y="{y0}" width="{x1 - x0}" '
                f'height="{y1 - y0}" preserveAspectRatio="none"/>')
    rects = "".join(f'<rect x="{b[0]}" y="{b[1]}" width="{b[2] - b[0]}" '
                    f'height="{b[3] - b[1]}"/>' for b in boxes)
    svg = f'<svg viewBox="0 0 {w} {h}" preserveAspectRatio="none">{heat}{rects}</svg>'
    crops = f" &middot; {len(boxes)} crop(s)" if count_crops else ""
    return (f'<figure class=top><div class=boxed>{_img(rel, up)}{svg}</div>'
            f"<div>{esc(top.image_id)} &middot; act {_num(top.activation)}"
            f"{crops}</div></figure>")


def why_sentence(sel: Selection) -> str:
    """Plain-text reason the winner won, by the record's rule: the evidence rule's response
    x coverage, or the paper's (C - position) x weight."""
    if sel.rule == "evidence":
        return _why_evidence(sel)
    c = len(sel.candidates)
    w = sel.order[0]
    text = (f"\u201c{sel.label}\u201d won with the best final score "
            f"{sel.winner_score:.3f} = ({c} \u2212 position {sel.positions[w]}) "
            f"\u00d7 image-product weight {sel.weights[w]:.3f}; its rank score "
            f"({sel.rank_score_name}, lower is better) was {sel.rank_scores[w]:.3f}.")
    if c > 1:
        r = sel.order[1]
        text += (f" Runner-up \u201c{sel.candidates[r]}\u201d scored "
                 f"{sel.final_scores[r]:.3f}.")
    return text


def _evidence_of(sel: Selection, i: int) -> str:
    """'response 0.84 (shown 3x smaller) x coverage 1.00' of candidate ``i``."""
    scale = f" (shown {sel.scales[i]}\u00d7 smaller)" if sel.scales[i] > 1 else ""
    return f"response {sel.responses[i]:.2f}{scale} \u00d7 coverage {sel.coverage[i]:.2f}"


def _why_evidence(sel: Selection) -> str:
    w = sel.order[0]
    text = (f"\u201c{sel.label}\u201d won: its generated images fire the unit at "
            f"{sel.responses[w]:.2f} of its top images' level on average"
            + (f" when shown {sel.scales[w]}\u00d7 smaller, as the unit sees things"
               if sel.scales[w] > 1 else "")
            + f", and the captions of {sel.coverage[w]:.0%} of its activating images name "
            f"it: score {sel.winner_score:.3f} = {_evidence_of(sel, w)}.")
    best = max(range(len(sel.candidates)), key=lambda i: (sel.final_scores[i], -i))
    if best != w:
        text += (f" It is preferred to the more specific \u201c{sel.candidates[best]}\u201d "
                 f"({sel.final_scores[best]:.3f}), which explains the unit no better.")
    rest = [i for i in sel.order[1:] if i != best]
    if rest:
        r = rest[0]
        text += (f" Runner-up \u201c{sel.candidates[r]}\u201d scored "
                 f"{sel.final_scores[r]:.3f} ({_evidence_of(sel, r)}).")
    return text


def _from(sources: Sequence[str] | None) -> str:
    """' (from llm, consensus)': where a candidate came from, when the record says."""
    return f" <span class=src>(from {esc(', '.join(sources))})</span>" if sources else ""


def _candidate_table(sel: Selection, generated: Mapping[str, Sequence[str]], images: _Images,
                     up: str, sources: Mapping[str, Sequence[str]]) -> str:
    """The candidates, best first, with every number of the selection rule.
    ``generated``: concept -> feature-cache keys of its generated images."""
    if sel.rule == "evidence":
        return _evidence_table(sel, generated, images, up, sources)
    c = len(sel.candidates)
    top_k = set(sel.top_k)
    rows = []
    for place, i in enumerate(sel.order, 1):
        name = sel.candidates[i]
        mine = [j for j, owner in enumerate(sel.image_candidate) if owner == i]
        ranks = ", ".join(f"{sel.ranks[j]:g}" for j in sorted(mine, key=lambda j: sel.ranks[j]))
        mine_top = sum(j in top_k for j in mine)
        gens = "".join(_img(images.generated(k), up, name) for k in generated.get(name, ()))
        rows.append(
            f"<tr class=\"{'winner' if place == 1 else ''}\"><td>{place}</td>"
            f"<td class=cand>{esc(name)}{_from(sources.get(name))}</td>"
            f"<td class=gen>{gens}</td><td>{ranks}</td>"
            f"<td>{mine_top}</td>"
            f"<td>{_num(sel.rank_scores[i])}</td><td>{sel.positions[i]}</td>"
            f"<td>{_num(sel.weights[i])}{' (no image in top-k)' if not mine_top else ''}"
            f"</td><td>{_num(sel.final_scores[i])}</td></tr>")
    return ("<table id=candidates><tr><th>#</th><th>candidate</th><th>generated images</th>"
            f"<th>ranks of its images (1 = highest activation)</th><th>in top-{sel.k}</th>"
            f"<th>rank score ({esc(sel.rank_score_name)}, beta {esc(sel.beta)})</th>"
            f"<th>position</th><th>image-product weight</th><th>final score "
            f"= ({c} &minus; position) &times; weight</th></tr>{''.join(rows)}</table>")


def _evidence_table(sel: Selection, generated: Mapping[str, Sequence[str]], images: _Images,
                    up: str, sources: Mapping[str, Sequence[str]]) -> str:
    """The candidates under the evidence rule, Label 1 first: response, the scale it was
    read at, coverage and score; the paper's final score beside them for comparison."""
    rows = []
    for place, i in enumerate(sel.order, 1):
        name = sel.candidates[i]
        gens = "".join(_img(images.generated(k), up, name) for k in generated.get(name, ()))
        scale = "as generated" if sel.scales[i] == 1 else f"{sel.scales[i]}&times; smaller"
        rows.append(
            f"<tr class=\"{'winner' if place == 1 else ''}\"><td>{place}</td>"
            f"<td class=cand>{esc(name)}{_from(sources.get(name))}</td>"
            f"<td class=gen>{gens}</td><td>{_num(sel.responses[i])} ({scale})</td>"
            f"<td>{_num(sel.coverage[i])}</td><td>{_num(sel.final_scores[i])}</td>"
            f"<td>{_num(sel.rank_scores[i])}</td></tr>")
    return ("<table id=candidates><tr><th>#</th><th>candidate</th><th>generated images</th>"
            "<th>response: its images' activation on the unit's scale (0 = its median probe "
            "image, 1 = its top images), mean</th><th>coverage: share of the activating "
            "images whose captions name it</th><th>score = response &times; coverage</th>"
            f"<th>rank score ({esc(sel.rank_score_name)}, the paper's)</th></tr>"
            f"{''.join(rows)}</table>")


def _top_images(rec: UnitRecord, images: _Images, up: str) -> str:
    """The top images section of a record with crops. What it promises follows the record:
    a heatmap only for layers with spatial maps, crop counts only when the unit has
    attention crops."""
    top, crops = rec.crops.top, rec.crops.crops
    has_maps = any(t.act_map for t in top)
    figs = "".join(_boxed(images, t, [c.box for c in crops if c.box and c.index == t.index],
                          up, rec.layer, rec.unit, count_crops=bool(crops)) for t in top)
    if has_maps:
        title = "Top images: activation heatmap" + (" and attention crops" if crops else "")
        note = "" if crops else ("<p class=note>No attention crops for this unit (none "
                                 "stood out, or the run set <code>--max-crops 0</code>).</p>")
    elif crops:
        title, note = "Top images and attention crops", ""
    else:
        title = "Top images"
        note = (f"<p class=note id=no-maps>Layer {esc(rec.layer)} has no spatial maps "
                "(each unit is one number per image), so there is no heatmap and no "
                "attention crop: the top images are used whole.</p>")
    return f"<h2>{title}</h2>{note}<div class=imgs>{figs}</div>"


def _featurevis_section(rec: UnitRecord, images: _Images, up: str) -> str:
    """Feature visualizations beside the dataset examples, with the unit's activation on
    each, on the starting noise and on its top probing image; empty when none computed."""
    kinds = images.featurevis(rec.layer, rec.unit)
    if not kinds:
        return ""
    top = rec.crops.top[0].activation if rec.crops and rec.crops.top else None
    rows = []
    for kind, shown, start in kinds:
        title = "plain" if kind == "plain" else f"faceted: {kind.removeprefix('facet-')}"
        figs = "".join(f"<figure class=fv>{_img(rel, up, 'feature visualization')}"
                       f"<div>act {_num(act)}</div></figure>" for rel, act in shown)
        # A unit the optimiser never switched on (a sparse dictionary feature, often)
        # leaves its starting noise: say so rather than let the noise pass as evidence.
        stuck = max(act for _, act in shown) <= max(start)
        rows.append(f"<h3>{esc(title)}</h3><div class=imgs>{figs}</div>"
                    + ("<p class=lowwarn id=fv-stuck>The optimisation did not raise this "
                       "unit above its starting noise: these images show nothing it "
                       "responds to.</p>"
                       if stuck else "")
                    + f"<p class=note>Starting noise: act {_num(max(start))}"
                    + (f"; top probing image: act {_num(top)}" if top is not None else "")
                    + ".</p>")
    return ("<h2 id=featurevis>Feature visualization</h2><p class=note>Images optimised to "
            "excite this unit (<code>dnd featurevis</code>): what it responds to most, "
            "which can differ from anything in the probing set.</p>" + "".join(rows))


def unit_page(rec: UnitRecord, images: _Images, rule: InterpretabilityRule | None = None,
              mixes: LayerMixes | None = None,
              readers: Sequence[LayerMixes] = ()) -> str:
    """One unit's page: labels, evidence images with crop boxes, captions, candidates.

    ``rule``: the layer's low-interpretability rule, to mark and explain the unit's score;
    ``mixes``: for a dictionary feature, its layer's dictionary (the neurons it mixes);
    ``readers``: for a neuron, the dictionaries of its layer (the features that use it).
    """
    up = "../../"
    title, body = unit_body(rec, images, up, rule, mixes, readers)
    return _page(f"{rec.layer} #{rec.unit}: {title}",
                 f'<header><a href="{up}index.html">&larr; all units</a> &middot; '
                 f"{unit_heading(rec)}</header><main>{body}</main>")


def unit_heading(rec: UnitRecord) -> str:
    """'model &middot; layer fc &middot; unit 3', escaped."""
    return (f"{esc(rec.model)} &middot; layer {esc(rec.layer)} &middot; "
            f"unit {esc(rec.unit)}")


def unit_body(rec: UnitRecord, images: _Images, up: str,
              rule: InterpretabilityRule | None = None, mixes: LayerMixes | None = None,
              readers: Sequence[LayerMixes] = ()) -> tuple[str, str]:
    """Everything a unit's page shows under its header: (title, HTML). The report's unit
    pages and the notebook's unit cards (:mod:`dnd.report.inline`) are both this.

    ``up``: what leads from the page to report/, prefixed to every image path (``""``
    when ``images`` gives data URIs); the other arguments as for :func:`unit_page`.
    """
    unit = rec.unit
    scoring, cands = _scoring(rec), rec.candidates
    parts: list[str] = []
    labels = rec.labels
    if labels:
        title = str(labels[0])
    elif rec.failed:
        title = f"failed at {rec.failed_at or 'an unknown stage'}"
    elif rec.stage in (None, "labels"):
        title = "no label"
    else:
        title = f"no label yet: stopped after {rec.stage}"
    parts.append(f"<h1 id=label>{esc(title)}</h1>")
    if labels[1:]:
        parts.append("<p>Labels 2-3: " + " &middot; ".join(
            f"<span class=label2>{esc(x)}</span>" for x in labels[1:]) + "</p>")
    if rec.failed:
        parts.append(f"<p class=err id=error>Failed at {esc(rec.failed_at)}: "
                     f"{esc(rec.error)}</p>")
    elif not labels and rec.stage not in (None, "labels"):
        parts.append(f"<p class=note id=stopped>This unit reached the "
                     f"<b>{esc(rec.stage)}</b> stage; the run stopped there "
                     "(<code>--stop-after</code>, or it was interrupted). Re-running the "
                     "describe command without <code>--stop-after</code> finishes it.</p>")
    interp = scoring.interpretability
    if rule is not None and rule.is_low(interp):
        parts.append(f"<p class=lowwarn id=interp><span class=low-badge>low "
                     f"interpretability</span> {esc(rule.explain(interp))}</p>")
    elif rule is not None and interp is not None:
        parts.append(f"<p id=interp>{esc(rule.explain(interp))}</p>")
    elif interp is not None:
        parts.append(f"<p id=interp>Interpretability score: {_num(interp)}</p>")
    if scoring.confidence is not None:
        parts.append(f"<p id=confidence>Confidence in Label 1: {_num(scoring.confidence)} "
                     "(0-1: how far the evidence supports it)</p>")
    for reason in rec.fallbacks:
        parts.append(f"<p class=lowwarn id=fallback><span class=fallback-badge>fallback"
                     f"</span> {esc(reason)}.</p>")
    if scoring.selection:
        parts.append(f"<p class=why id=why>{esc(why_sentence(scoring.selection))}</p>")
    if mixes is not None:
        parts.append(mixes.section(unit, up))
    parts += [m.readers_section(unit, up) for m in readers]

    if rec.crops and rec.crops.top:
        parts.append(_top_images(rec, images, up))
    parts.append(_featurevis_section(rec, images, up))
    parts.append(textvis_section(images.store.root, rec.layer, rec.unit))

    captions = rec.captions or ()
    if rec.crops and rec.crops.activating:
        figs = []
        for i, ev in enumerate(rec.crops.activating):
            cap = f"<div class=caption>{esc(captions[i])}</div>" if i < len(captions) else ""
            kind = "crop" if ev.box else "image"
            figs.append(f"<figure>{_img(images.evidence(ev), up, kind)}"
                        f"<div>{esc(ev.image_id)} ({kind}) act "
                        f"{_num(ev.activation)}</div>{cap}</figure>")
        heading = "Activating images" + (" and captions" if captions else "")
        parts.append(f"<h2>{heading}</h2><div class=imgs>{''.join(figs)}</div>")
    if cands and cands.replies:
        usage = cands.usage
        # Records written before LLM usage was counted read as zero requests: no cost line.
        cost = (f"; {usage.requests} request(s), {usage.prompt_tokens:,} "
                f"prompt + {usage.completion_tokens:,} completion tokens"
                + (f", {usage.cached} from the cache" if usage.cached else "")
                if usage.requests else "")
        parts.append(
            f"<details id=replies><summary>LLM replies ({len(cands.replies)}, "
            f"{len(cands.rejected)} rejected{cost})</summary>"
            + "".join(f"<pre>{esc(r)}</pre>" for r in cands.replies)
            + ("<p>Rejected, and why:</p><ul>" + "".join(
                f"<li><code>{esc(r.reply)}</code>: {esc(r.reason)}</li>"
                for r in cands.rejected) + "</ul>" if cands.rejected else "") + "</details>")
    if cands and cands.error:
        parts.append(f"<p class=err>Candidates: {esc(cands.error)}</p>")

    sources = dict(zip(cands.concepts, cands.sources)) if cands else {}
    if scoring.selection:
        parts.append("<h2>Candidate concepts</h2>"
                     + _candidate_table(scoring.selection, scoring.generated, images, up,
                                        sources)
                     + "<p class=note>Labels 2-3 are kept only with evidence: one of the "
                     "candidate's generated images among the top-k of all generated images, "
                     "its images activating the unit at least half-way from the median of "
                     "all generated images to Label 1's, and at least half of the unit's "
                     "activating images' captions naming it; then a label too close in "
                     "meaning to a kept one (text similarity above 0.81) is dropped.</p>")
    elif cands and cands.concepts:
        parts.append("<h2>Candidate concepts</h2><ul>" + "".join(
            f"<li>{esc(c)}{_from(sources.get(c))}</li>" for c in cands.concepts) + "</ul>")
    if scoring.dropped:
        parts.append("<h3>Dropped candidates</h3><ul>" + "".join(
            f"<li>{esc(c)}: {esc(why)}</li>" for c, why in scoring.dropped.items()) + "</ul>")
    return title, "".join(parts)


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
    images = _Images(store, _open_run_probe(_run_config(store)))
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
    return _page(title, "".join(parts))
