"""The report's sections of what ``dnd featurevis`` saved: read from the run's files.

The report imports neither :mod:`dnd.featurevis` nor :mod:`dnd.textvis`: it renders their
files (``<run>/featurevis/<layer>/<kind>/<unit>.json`` and PNGs; ``texts/<unit>.json``,
:data:`dnd.store.TEXTS_VARIANT`) whatever made them.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from dnd.record import UnitRecord
from dnd.report.html import esc, img, num
from dnd.report.images import ReportImages
from dnd.store import TEXTS_VARIANT, RunStore

# The multimodal check's threshold (sd) when a unit's file does not say (the toy world's).
MULTIMODAL_THRESHOLD = 1.0


def featurevis_section(rec: UnitRecord, images: ReportImages, up: str) -> str:
    """Feature visualizations beside the dataset examples, with the unit's activation on
    each, on the starting noise and on its top probing image; empty when none computed."""
    kinds = images.featurevis(rec.layer, rec.unit)
    if not kinds:
        return ""
    top = rec.crops.top[0].activation if rec.crops and rec.crops.top else None
    rows = []
    for kind, shown, start in kinds:
        title = "plain" if kind == "plain" else f"faceted: {kind.removeprefix('facet-')}"
        figs = "".join(f"<figure class=fv>{img(rel, up, 'feature visualization')}"
                       f"<div>act {num(act)}</div></figure>" for rel, act in shown)
        # A unit the optimiser never switched on (a sparse dictionary feature, often)
        # leaves its starting noise: say so rather than let the noise pass as evidence.
        stuck = max(act for _, act in shown) <= max(start)
        rows.append(f"<h3>{esc(title)}</h3><div class=imgs>{figs}</div>"
                    + ("<p class=lowwarn id=fv-stuck>The optimisation did not raise this "
                       "unit above its starting noise: these images show nothing it "
                       "responds to.</p>"
                       if stuck else "")
                    + f"<p class=note>Starting noise: act {num(max(start))}"
                    + (f"; top probing image: act {num(top)}" if top is not None else "")
                    + ".</p>")
    return ("<h2 id=featurevis>Feature visualization</h2><p class=note>Images optimised to "
            "excite this unit (<code>dnd featurevis</code>): what it responds to most, "
            "which can differ from anything in the probing set.</p>" + "".join(rows))


def read_unit_texts(run_dir: str | Path, layer: str, unit: int) -> dict | None:
    """A unit's saved top texts (:func:`dnd.textvis.textvis_run`), or None when not
    computed."""
    path = RunStore(run_dir).featurevis_dir(layer, TEXTS_VARIANT) / f"{int(unit)}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def textvis_section(run_dir: str | Path, layer: str, unit: int) -> str:
    """HTML fragment for the report's unit page: the unit's top texts with their scores
    and the multimodal check; "" when nothing was computed. Every text is escaped."""
    data = read_unit_texts(run_dir, layer, unit)
    if not data:
        return ""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{k + 1}</td><td>{esc(t['text'])}</td><td>{t['score']:.3f}</td></tr>"
        for k, t in enumerate(data.get("texts", [])))
    lm = data.get("settings", {}).get("lm_weight", 0)
    score = ("cosine minus " + esc(f"{lm:g}") + " x LM negative log-likelihood per token"
             if lm else "cosine")
    seed = data.get("seed") or {}
    parts = [
        "<h2 id=textvis>Top texts</h2><p class=note>Texts whose CLIP text embedding best "
        "matches the direction this unit writes into the image embedding (its "
        "activation-times-gradient contribution, averaged over its top probing images), "
        f"found by word edits (<code>dnd featurevis</code>); score: {score}.</p>",
        f"<table class=textvis><tr><th>#</th><th>text</th><th>score</th></tr>{rows}</table>"]
    if seed:
        parts.append(f"<p class=note>Best single word: {esc(str(seed.get('text', '')))} "
                     f"({float(seed.get('score', 0)):.3f}).</p>")
    mm = data.get("multimodal")
    if mm:
        verdict = ("responds to both the picture and the written word" if mm["both"]
                   else "does not respond to both")
        c = esc(str(mm["concept"]))
        parts.append(
            f"<h3 id=multimodal>Multimodal check: {c}</h3><table class=textvis><tr>"
            "<th>renders</th><th>mean activation</th></tr>"
            f"<tr><td>{c} as a picture</td><td>{mm['object']:.3f}</td></tr>"
            f"<tr><td>the word &ldquo;{c}&rdquo; written</td><td>{mm['word']:.3f}</td></tr>"
            f"<tr><td>control: no {c}, no word</td><td>{mm['control']:.3f}</td></tr>"
            f"<tr><td>control: no {c}, another word</td><td>{mm['other_word']:.3f}</td></tr>"
            f"</table><p class=note>Picture {mm['object_z']:+.2f} sd, word "
            f"{mm['word_z']:+.2f} sd (each against its control; sd {mm['spread']:.3f}: the "
            f"unit's spread over ordinary scenes): the unit {verdict} (threshold "
            f"{float(mm.get('threshold', MULTIMODAL_THRESHOLD)):g} sd each).</p>")
    return "".join(parts)

