"""The report's view of dictionary features: which neurons a feature mixes, and which
features use a neuron.

A run layer ``conv4.nmf`` (``dnd describe --dictionary nmf --layer conv4.nmf``) describes
a dictionary's features of ``conv4`` (:mod:`dnd.dictionary`). Each feature is a weighted
mix of the layer's channels, its row of the dictionary's decoder: NMF ``components``
[F, C], an SAE's ``W_dec`` [F, C] (the encoder's columns ``W_enc.T`` when a loaded file
has no decoder), or the directions themselves. A feature's report page lists the channels
with the largest weights (by absolute value), each with its share of the row's total
absolute weight, and, when the same run described the layer's neurons, their labels and a
link to their pages; then one line comparing the feature's own label with how many
distinct labels the neurons carrying half of its weight have (the point of a dictionary:
one feature, one concept, where single neurons mix several). A neuron's page, in turn,
lists the features that give it the largest share of their weight, linked to their pages.

The dictionary is read from the run: the fitted copy at
:meth:`dnd.store.RunStore.dictionary_path` (kinds nmf, sae) or the user's file at
``config.dictionary.path`` (kind file). One that cannot be read is warned about and its
pages go without the section; runs without a dictionary are not touched.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from dnd.config import RunConfig
from dnd.record import UnitRecord
from dnd.store import RunStore, safe_name

log = logging.getLogger("dnd")

MIXED_SHOWN = 8  # channels listed per feature, largest |weight| first (zero weights left out)
READERS_SHOWN = 5  # features listed on a neuron's page, largest share of the neuron first
# Words that do not make two labels name the same thing.
_STOPWORDS = frozenset("a an and the of on in with at by to from for or its some".split())


def decoder_rows(dictionary) -> tuple[np.ndarray, str]:
    """The channels each feature of ``dictionary`` mixes: float [F, C], and what the rows
    are, in words. NMF: ``components``; SAE: ``W_dec`` (``W_enc.T`` when it has none: the
    channels the feature reads instead of those it writes); directions: ``weight``."""
    from dnd.dictionary.kinds import Directions, NMFDictionary, SparseAutoencoder

    if isinstance(dictionary, NMFDictionary):
        return dictionary.components.detach().cpu().numpy(), "NMF components"
    if isinstance(dictionary, SparseAutoencoder):
        if dictionary.W_dec is not None:
            return dictionary.W_dec.detach().cpu().numpy(), "SAE decoder rows (W_dec)"
        return (dictionary.W_enc.detach().cpu().numpy().T,
                "SAE encoder columns (W_enc; the file has no decoder)")
    if isinstance(dictionary, Directions):
        return dictionary.weight.detach().cpu().numpy(), "directions"
    raise TypeError(f"no decoder rows for a {type(dictionary).__name__}")


def top_channels(row: np.ndarray, n: int = MIXED_SHOWN) -> list[tuple[int, float, float]]:
    """The ``n`` channels of a decoder ``row`` [C] with the largest absolute weight:
    (channel, weight, share of the row's total absolute weight), largest first; ties by
    channel id. Shares are 0 for an all-zero row."""
    row = np.asarray(row, dtype=np.float64)
    total = float(np.abs(row).sum())
    order = sorted(range(len(row)), key=lambda c: (-abs(row[c]), c))[:n]
    return [(c, float(row[c]), abs(float(row[c])) / total if total > 0 else 0.0)
            for c in order]


def _words(label: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z0-9]+", label.lower()) if w not in _STOPWORDS)


def _norm(label: str) -> str:
    return " ".join(label.lower().split())


@dataclass(frozen=True, eq=False)
class LayerMixes:
    """One dictionary layer of a run: ``layer`` (``conv4.nmf``) reads ``parent``
    (``conv4``); ``rows`` [F, C] what each feature mixes (:func:`decoder_rows`, described
    by ``rows_are``); ``neurons``: the parent layer's unit records in this run (empty when
    the run did not describe it); ``labels``: the features' own Labels 1."""

    layer: str
    parent: str
    kind: str
    rows: np.ndarray
    rows_are: str
    neurons: dict[int, UnitRecord] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)
    described: frozenset[int] = frozenset()  # features with a record (and so a page)

    def readers(self, channel: int, n: int = READERS_SHOWN) -> list[tuple[int, float, float]]:
        """The ``n`` features that give ``channel`` the largest share of their row's total
        absolute weight: (feature, weight, share), largest share first, ties by feature
        id; features that do not use the channel (weight 0) are left out."""
        if not 0 <= channel < self.rows.shape[1]:
            return []
        col = self.rows[:, channel].astype(np.float64)
        totals = self._row_totals
        shares = np.divide(np.abs(col), totals, out=np.zeros_like(col), where=totals > 0)
        used = np.flatnonzero(col)
        order = used[np.lexsort((used, -shares[used]))][:n]  # by share, then feature id
        return [(int(f), float(col[f]), float(shares[f])) for f in order]

    @cached_property
    def _row_totals(self) -> np.ndarray:
        """Each feature's total absolute weight [F], once per report (every neuron page of
        the parent layer reads it)."""
        return np.abs(self.rows).sum(1).astype(np.float64)

    def readers_section(self, channel: int, up: str = "../../") -> str:
        """HTML of a neuron's page (a channel of ``parent``): the features of this
        dictionary that use the neuron most, with its share of each and their labels; empty
        when none uses it."""
        esc = html.escape
        rows = []
        for f, weight, share in self.readers(channel):
            name = f"{esc(self.layer)} #{f}"
            if f in self.described:
                href = f"{up}units/{safe_name(self.layer)}/{f}.html"
                name = f'<a href="{esc(href)}">{name}</a>'
            label = esc(self.labels[f]) if f in self.labels else "<i>no label</i>"
            rows.append(f"<tr><td>{name}</td><td>{weight:.4g}</td><td>{100 * share:.1f}%</td>"
                        f"<td class=cand>{label}</td></tr>")
        if not rows:
            return ""
        return (f"<h2 id=readers-{safe_name(self.layer)}>Features of {esc(self.layer)} that "
                f"use it</h2><p class=note>The {esc(self.kind)} dictionary's features whose "
                f"rows ({esc(self.rows_are)}) give this neuron the largest share of their "
                "total absolute weight.</p>"
                f"<table class=readers><tr><th>feature</th><th>weight</th><th>share</th>"
                f"<th>the feature's Label 1</th></tr>{''.join(rows)}</table>")

    def section(self, feature: int, up: str = "../../") -> str:
        """HTML of a feature's page (``up``: from the page to report/): the neurons it
        mixes with their weight shares and labels, and the polysemanticity line."""
        esc = html.escape
        if not 0 <= feature < len(self.rows):
            return (f"<h2 id=mixes>Neurons it mixes</h2><p class=err>Feature {feature} is not "
                    f"in the dictionary read for {esc(self.layer)} ({len(self.rows)} "
                    "features): the run's dictionary changed after this unit was "
                    "described.</p>")
        # A channel of weight 0 is not mixed in (an NMF row has many).
        top = [t for t in top_channels(self.rows[feature]) if t[1] != 0]
        covered = sum(s for _, _, s in top)
        rows = []
        for channel, weight, share in top:
            rec = self.neurons.get(channel)
            name = f"{esc(self.parent)} #{channel}"
            if rec is not None:
                href = f"{up}units/{safe_name(self.parent)}/{channel}.html"
                name = f'<a href="{esc(href)}">{name}</a>'
                labels = (" &middot; ".join(esc(str(x)) for x in rec.labels[:3])
                          if rec.labels else "<i>no label</i>")
            else:
                labels = "<i>not described in this run</i>"
            rows.append(f"<tr><td>{name}</td><td>{weight:.4g}</td><td>{100 * share:.1f}%</td>"
                        f"<td class=cand>{labels}</td></tr>")
        parts = [
            "<h2 id=mixes>Neurons it mixes</h2>",
            f"<p class=note>This feature is a weighted mix of the channels of "
            f"<b>{esc(self.parent)}</b>: its row of the {esc(self.kind)} dictionary "
            f"({esc(self.rows_are)}). The {len(top)} largest weights (by absolute value), each "
            "with its share of the row's total absolute weight; together "
            f"{100 * covered:.0f}%.</p>",
            "<table id=mixed><tr><th>neuron</th><th>weight</th><th>share</th>"
            f"<th>the neuron's labels</th></tr>{''.join(rows)}</table>"]
        if not self.neurons:
            parts.append(f"<p class=note id=polysemanticity>This run did not describe the "
                         f"neurons of {esc(self.parent)}: describe them in the same run "
                         f"(<code>--layer {esc(self.parent)} --layer {esc(self.layer)}</code>) "
                         "to see their labels here.</p>")
        else:
            line = polysemanticity_line(top, self.neurons, self.labels.get(feature))
            parts.append(f"<p id=polysemanticity>{line}</p>")
        return "".join(parts)


def polysemanticity_line(top: Sequence[tuple[int, float, float]],
                         neurons: dict[int, UnitRecord], own: str | None) -> str:
    """One HTML sentence comparing the feature's own Label 1 ``own`` with the labels of the
    neurons it is mostly made of: the first channels of ``top`` (:func:`top_channels`,
    largest first) that together carry at least half of its weight (all of ``top`` when
    they carry less). Says how many distinct Label 1s those neurons have (case and spacing
    ignored) and which of them share a word with the feature's (small words such as "a",
    "on" do not count)."""
    esc = html.escape
    core, carried = [], 0.0
    for channel, _, share in top:
        core.append(channel)
        carried += share
        if carried >= 0.5:
            break
    labelled = [(c, str(neurons[c].labels[0])) for c in core
                if c in neurons and neurons[c].labels]
    who = (f"the {len(core)} neuron(s) carrying {100 * carried:.0f}% of its weight "
           f"({', '.join(f'#{c}' for c in core)})")
    if not labelled:
        return f"Polysemanticity: none of {who} has a label in this run."
    distinct = list(dict.fromkeys(_norm(x) for _, x in labelled))
    unlabelled = len(core) - len(labelled)
    head = (f"Polysemanticity: {who} have {len(distinct)} distinct Label 1(s) ("
            + "; ".join(f"\u201c{esc(x)}\u201d" for x in distinct) + ")"
            + (f", {unlabelled} without a label" if unlabelled else ""))
    if own is None:
        return head + "; this feature has no label yet."
    mine = _words(own)
    shared = [c for c, x in labelled if mine & _words(x)]
    return (head + f"; this feature has one, \u201c{esc(own)}\u201d, which shares a word "
            + (f"with {len(shared)} of them (neuron(s) {', '.join(map(str, shared))})."
               if shared else "with none of them."))


def layer_mixes(store: RunStore, config: RunConfig | None, records: Sequence[UnitRecord]
                ) -> dict[str, LayerMixes]:
    """Run layer -> :class:`LayerMixes` for every dictionary layer of the run's ``config``
    whose dictionary can be read (the others are warned about and left out). ``records``:
    the run's unit records (the parent layers' neurons and the features' own labels)."""
    if config is None or not config.dictionary_layers:
        return {}
    from dnd.dictionary.files import load_dictionary
    from dnd.dictionary.kinds import DictionaryError
    from dnd.record import NEURON

    by_layer: dict[str, dict[int, UnitRecord]] = {}
    for rec in records:
        if rec.basis == NEURON:  # a dictionary layer's features are run units as well
            by_layer.setdefault(rec.layer, {})[rec.unit] = rec
    out = {}
    for layer, parent in config.dictionary_layers.items():
        path = (Path(config.dictionary.path) if config.dictionary.kind == "file"
                else store.dictionary_path(layer))
        try:
            rows, rows_are = decoder_rows(load_dictionary(path))
        except (OSError, DictionaryError, TypeError, ValueError) as e:
            log.warning("report: cannot read the dictionary of %s (%s); its pages show no "
                        "mixed neurons", layer, e)
            continue
        features = by_layer.get(layer, {})
        out[layer] = LayerMixes(
            layer, parent, config.dictionary.kind, rows, rows_are, by_layer.get(parent, {}),
            {u: str(r.labels[0]) for u, r in features.items() if r.labels},
            frozenset(features))
    return out
