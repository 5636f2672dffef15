"""The report in a notebook: a unit's card and a run's table, as self-contained HTML.

:func:`unit_html` is the report's unit page (:func:`dnd.report.build.unit_body`: labels,
scores, top images with their heatmaps, captions, the candidates' generated images, why
the winner won) and :func:`run_html` a static table of the report index's cards
(:func:`dnd.report.build.card_data`), drawn by the report's own code from the run's own
files. Images are not written anywhere: :class:`InlineImages` makes the same thumbnails the
report writes and returns them as base64 ``data:`` URIs, so a notebook that shows them
needs no server and no network, and stays viewable where the run's files are not (a
notebook sent to a colleague, GitHub's viewer). The CSS is the report's, confined to the
output's own ``div`` so it does not restyle the notebook.

Dictionary features are shown without the neurons they mix (that section links to the
report's other pages, which a notebook output cannot reach: ``dnd report`` has them).
"""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from dnd.probe import ProbeSet
from dnd.record import UnitRecord
from dnd.report.assets import scoped_css
from dnd.report.build import unit_body, unit_heading
from dnd.report.html import esc, num
from dnd.report.images import ReportImages
from dnd.report.rules import InterpretabilityRule
from dnd.store import RunStore

SCOPE = "dnd-inline"  # the class of the div every output sits in
TABLE_PX = 96  # the run table's thumbnails (shown at 58 px), smaller than the report's 160
# Extra rules for the run table, scoped like the rest.
_TABLE_CSS = """
table.runtable td{vertical-align:middle}
table.runtable tr.failed{background:#fdecea}
table.runtable tr.low{background:#fff3e0}
"""


def data_uri(data: bytes, name: str) -> str:
    """``data:<type>;base64,...`` of an image file's bytes; the type from ``name``'s
    extension (``.jpg``, ``.png``)."""
    mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class InlineImages(ReportImages):
    """The report's images (:class:`dnd.report.images.ReportImages`) as data URIs: nothing is
    written; ``max_px`` caps thumbnail sides (None: the report's sizes)."""

    def __init__(self, store: RunStore, probe: ProbeSet | None, max_px: int | None = None):
        super().__init__(store, probe)
        self.max_px = max_px

    def _save(self, rel: str, image: Image.Image, px: int) -> str:
        return super()._save(rel, image, min(px, self.max_px) if self.max_px else px)

    def _put(self, rel: str, data: bytes) -> str:
        self.done[rel] = uri = data_uri(data, rel)
        return uri

    def _put_file(self, rel: str, src: Path) -> str:
        return self._put(rel, src.read_bytes())


def _fragment(body: str, extra_css: str = "") -> str:
    """``body`` in a div of class SCOPE with the report's CSS confined to it."""
    return (f'<div class="{SCOPE}"><style>{scoped_css("." + SCOPE, extra_css)}</style>'
            f"{body}</div>")


def unit_html(rec: UnitRecord, images: ReportImages, rule: InterpretabilityRule | None = None
              ) -> str:
    """A unit's report card as one HTML fragment (``images``: an :class:`InlineImages`;
    ``rule``: its layer's low-interpretability rule, to mark and explain its score)."""
    _, body = unit_body(rec, images, "", rule)
    return _fragment(f"<header>{unit_heading(rec)}</header><main>{body}</main>")


def run_html(name: str, cards: Sequence[Mapping[str, Any]], *, total: int,
             heading: str = "", probe_ok: bool = True, show_layer: bool = False) -> str:
    """A run as a compact table, one row per card of :func:`dnd.report.build.card_data`
    (thumbnails as data URIs): layer (``show_layer``), unit, top images, Label 1, Labels
    2-3, final score, interpretability, confidence, status. ``total``: the units the run
    has, to say how many are left out; ``heading``: extra words after the run's name."""
    head = (("<th>layer</th>" if show_layer else "") + "<th>unit</th><th>top images</th>"
            "<th>Label 1</th><th>Labels 2-3</th><th>score</th><th>interpretability</th>"
            "<th>confidence</th><th>status</th>")
    rows = []
    for c in cards:
        labels = list(c["labels"])
        if c["error"]:
            status, cls = f"failed at {esc(c['failed_at'] or '?')}: {esc(c['error'])}", "failed"
        elif labels:
            status, cls = "done", "low" if c["low"] else ""
        elif c["stage"] and c["stage"] != "labels":
            status, cls = f"no label yet: stopped after {esc(c['stage'])}", ""
        else:
            status, cls = "no label", ""
        if c["fallback"]:
            status += " <span class=fallback-badge>fallback label</span>"
        low = " <span class=low-badge>low</span>" if c["low"] else ""
        thumbs = "".join(f'<img src="{esc(t)}" alt="">' for t in c["thumbs"])
        rows.append(
            f'<tr class="{cls}">' + (f"<td>{esc(c['layer'])}</td>" if show_layer else "")
            + f"<td>{esc(c['unit'])}</td><td><div class=thumbs>{thumbs}</div></td>"
            f"<td><b>{esc(labels[0]) if labels else ''}</b></td>"
            f"<td>{' &middot; '.join(esc(x) for x in labels[1:])}</td>"
            f"<td>{num(c['score'])}</td><td>{num(c['interp'])}{low}</td>"
            f"<td>{num(c.get('confidence'))}</td><td>{status}</td></tr>")
    notes = [] if probe_ok else [
        "<p class=err>The run's probing set could not be opened: no images.</p>"]
    shown = (f"{len(cards)} of {total} units shown (<code>run.to_html(limit=None)</code>: "
             "all); " if len(cards) < total else "")
    hint = (f"<p class=muted>{shown}<code>run.labels()</code>: every unit as a DataFrame; "
            "<code>run.unit(layer, unit)</code>: a unit's report card.</p>")
    body = (f"<header><b>dnd run</b> &middot; {esc(name)}{heading}</header><main>"
            + "".join(notes)
            + f"<table class=runtable><tr>{head}</tr>{''.join(rows)}</table>{hint}</main>")
    return _fragment(body, _TABLE_CSS)
