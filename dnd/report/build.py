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
for their layer are marked, with the rule's numbers (:mod:`dnd.report.rules`).
A dictionary feature's page (layer ``conv4.nmf``) lists the neurons it mixes, with their
labels when the run described them, and a neuron's page the features that use it
(:mod:`dnd.report.dictionary`), and ``dnd featurevis``'s images and texts are shown from
its files (:mod:`dnd.report.featurevis`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dnd.io import atomic_write_text
from dnd.record import Evidence, Selection, UnitRecord
from dnd.report.assets import INDEX_JS
from dnd.report.dictionary import LayerMixes, layer_mixes
from dnd.report.featurevis import featurevis_section, textvis_section
from dnd.report.html import esc, img, num, page, script_json
from dnd.report.images import CARD_THUMBS, ReportImages, open_run_probe, run_config
from dnd.report.rules import LOW_INTERP_Z, InterpretabilityRule, layer_rules, scoring_of
from dnd.store import RunStore, safe_name

log = logging.getLogger("dnd")


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
    config = run_config(store)
    images = ReportImages(store, open_run_probe(config))
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



def card_data(rec: UnitRecord, images: ReportImages, rule: InterpretabilityRule) -> dict[str, Any]:
    """What a unit's card shows (the report's index and the notebook's run table): labels,
    Label 1's final score, interpretability (``low`` by its layer's ``rule``), confidence,
    stage, a short failure reason, and up to CARD_THUMBS thumbnails of its top images."""
    top = (rec.crops.top or rec.crops.activating) if rec.crops else ()
    thumbs = [images.probe_image(e.index) for e in top[:CARD_THUMBS]]
    scoring = scoring_of(rec)
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
    return page(f"dnd report: {run.resolve().name}", body)


def _boxed(images: ReportImages, top: Evidence, boxes: Sequence[Sequence[int]], up: str,
           layer: str, unit: int, count_crops: bool = True) -> str:
    """A top image with the unit's activation heatmap over the region the network saw (when
    the record has one) and its attention-crop boxes (original-image pixels) drawn over it;
    ``count_crops`` adds "N crop(s)" to the caption."""
    rel, size = images.probe_image(top.index, large=True), images.size(top.index)
    if rel is None or size is None:
        return img(None, up)
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
    return (f'<figure class=top><div class=boxed>{img(rel, up)}{svg}</div>'
            f"<div>{esc(top.image_id)} &middot; act {num(top.activation)}"
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


def _candidate_table(sel: Selection, generated: Mapping[str, Sequence[str]], images: ReportImages,
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
        gens = "".join(img(images.generated(k), up, name) for k in generated.get(name, ()))
        rows.append(
            f"<tr class=\"{'winner' if place == 1 else ''}\"><td>{place}</td>"
            f"<td class=cand>{esc(name)}{_from(sources.get(name))}</td>"
            f"<td class=gen>{gens}</td><td>{ranks}</td>"
            f"<td>{mine_top}</td>"
            f"<td>{num(sel.rank_scores[i])}</td><td>{sel.positions[i]}</td>"
            f"<td>{num(sel.weights[i])}{' (no image in top-k)' if not mine_top else ''}"
            f"</td><td>{num(sel.final_scores[i])}</td></tr>")
    return ("<table id=candidates><tr><th>#</th><th>candidate</th><th>generated images</th>"
            f"<th>ranks of its images (1 = highest activation)</th><th>in top-{sel.k}</th>"
            f"<th>rank score ({esc(sel.rank_score_name)}, beta {esc(sel.beta)})</th>"
            f"<th>position</th><th>image-product weight</th><th>final score "
            f"= ({c} &minus; position) &times; weight</th></tr>{''.join(rows)}</table>")


def _evidence_table(sel: Selection, generated: Mapping[str, Sequence[str]], images: ReportImages,
                    up: str, sources: Mapping[str, Sequence[str]]) -> str:
    """The candidates under the evidence rule, Label 1 first: response, the scale it was
    read at, coverage and score; the paper's final score beside them for comparison."""
    rows = []
    for place, i in enumerate(sel.order, 1):
        name = sel.candidates[i]
        gens = "".join(img(images.generated(k), up, name) for k in generated.get(name, ()))
        scale = "as generated" if sel.scales[i] == 1 else f"{sel.scales[i]}&times; smaller"
        rows.append(
            f"<tr class=\"{'winner' if place == 1 else ''}\"><td>{place}</td>"
            f"<td class=cand>{esc(name)}{_from(sources.get(name))}</td>"
            f"<td class=gen>{gens}</td><td>{num(sel.responses[i])} ({scale})</td>"
            f"<td>{num(sel.coverage[i])}</td><td>{num(sel.final_scores[i])}</td>"
            f"<td>{num(sel.rank_scores[i])}</td></tr>")
    return ("<table id=candidates><tr><th>#</th><th>candidate</th><th>generated images</th>"
            "<th>response: its images' activation on the unit's scale (0 = its median probe "
            "image, 1 = its top images), mean</th><th>coverage: share of the activating "
            "images whose captions name it</th><th>score = response &times; coverage</th>"
            f"<th>rank score ({esc(sel.rank_score_name)}, the paper's)</th></tr>"
            f"{''.join(rows)}</table>")


def _top_images(rec: UnitRecord, images: ReportImages, up: str) -> str:
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


def unit_page(rec: UnitRecord, images: ReportImages, rule: InterpretabilityRule | None = None,
              mixes: LayerMixes | None = None,
              readers: Sequence[LayerMixes] = ()) -> str:
    """One unit's page: labels, evidence images with crop boxes, captions, candidates.

    ``rule``: the layer's low-interpretability rule, to mark and explain the unit's score;
    ``mixes``: for a dictionary feature, its layer's dictionary (the neurons it mixes);
    ``readers``: for a neuron, the dictionaries of its layer (the features that use it).
    """
    up = "../../"
    title, body = unit_body(rec, images, up, rule, mixes, readers)
    return page(f"{rec.layer} #{rec.unit}: {title}",
                 f'<header><a href="{up}index.html">&larr; all units</a> &middot; '
                 f"{unit_heading(rec)}</header><main>{body}</main>")


def unit_heading(rec: UnitRecord) -> str:
    """'model &middot; layer fc &middot; unit 3', escaped."""
    return (f"{esc(rec.model)} &middot; layer {esc(rec.layer)} &middot; "
            f"unit {esc(rec.unit)}")


def unit_body(rec: UnitRecord, images: ReportImages, up: str,
              rule: InterpretabilityRule | None = None, mixes: LayerMixes | None = None,
              readers: Sequence[LayerMixes] = ()) -> tuple[str, str]:
    """Everything a unit's page shows under its header: (title, HTML). The report's unit
    pages and the notebook's unit cards (:mod:`dnd.report.inline`) are both this.

    ``up``: what leads from the page to report/, prefixed to every image path (``""``
    when ``images`` gives data URIs); the other arguments as for :func:`unit_page`.
    """
    unit = rec.unit
    scoring, cands = scoring_of(rec), rec.candidates
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
        parts.append(f"<p id=interp>Interpretability score: {num(interp)}</p>")
    if scoring.confidence is not None:
        parts.append(f"<p id=confidence>Confidence in Label 1: {num(scoring.confidence)} "
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
    parts.append(featurevis_section(rec, images, up))
    parts.append(textvis_section(images.store.root, rec.layer, rec.unit))

    captions = rec.captions or ()
    if rec.crops and rec.crops.activating:
        figs = []
        for i, ev in enumerate(rec.crops.activating):
            cap = f"<div class=caption>{esc(captions[i])}</div>" if i < len(captions) else ""
            kind = "crop" if ev.box else "image"
            figs.append(f"<figure>{img(images.evidence(ev), up, kind)}"
                        f"<div>{esc(ev.image_id)} ({kind}) act "
                        f"{num(ev.activation)}</div>{cap}</figure>")
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
