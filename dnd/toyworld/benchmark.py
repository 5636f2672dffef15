"""Toy-world ground-truth benchmark: DnD, its ablations and baselines, judged per layer.

Methods (Label 1 of each unit, judged with the demo's keyword match against ground truth):

- DnD: the ``toyworld`` preset;
- DnD without attention crops (``crop.max_crops = 0``);
- DnD without best-concept selection: the summariser's first candidate;
- DnD without summariser: the caption of the unit's top activating image;
- CLIP-Dissect: soft-WPMI with the toy CLIP over the world's concept set;
- a constant label: the ground-truth concept most common among the layer's units.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from dnd.io import atomic_write_text
from dnd.report.build import comparison_page
from dnd.store import RunStore
from dnd.toyworld.demo import describe_toy_layers, layer_truths, mentions, probe_scenes


def concept_set() -> list[str]:
    """CLIP-Dissect's concept set: every colour, shape, class, background kind, 'text'."""
    from dnd.toyworld.target import CLASS_NAMES
    from dnd.toyworld.world import BACKGROUND_KINDS, COLOURS, SHAPES, TEXT_CONCEPT

    return [*COLOURS, *SHAPES, *CLASS_NAMES, *(f"{k} background" for k in BACKGROUND_KINDS),
            TEXT_CONCEPT]


def _score(labels: dict[int, str], truths: dict[int, str | None]) -> tuple[int, int]:
    judged = [u for u, t in truths.items() if t]
    return sum(mentions(labels.get(u, ""), truths[u]) for u in judged), len(judged)


def run_benchmark(root: str | Path, *, n_probe: int = 2000, hidden_layer: str = "conv4",
                  hidden_units: str = "0-31", progress: bool = False) -> list[str]:
    """Run every method on the fc layer and ``hidden_units`` of ``hidden_layer``.

    Returns markdown lines: one row per method, one column per layer (agreeing / judged).
    Also writes ``<root>/compare.html``: every unit's labels side by side with ground truth.
    """
    from dnd.baselines.clip_dissect import clip_dissect
    from dnd.probe import open_probe
    from dnd.toyworld.backends import _toy_encoder

    root = Path(root)
    layers = [("fc", "all"), (hidden_layer, hidden_units)]
    full = describe_toy_layers(root / "dnd", n_probe, layers, progress=progress)
    nocrops = describe_toy_layers(root / "dnd-nocrops", n_probe, layers,
                                  overrides={"crop.max_crops": 0}, progress=progress)
    scenes = probe_scenes(n_probe)
    encoder = _toy_encoder()
    probe = open_probe(f"toyworld:{n_probe}")
    image_emb = encoder.encode_images([probe.load(i) for i in range(len(probe))])
    concepts = concept_set()
    text_emb = encoder.encode_texts(concepts)
    methods = ["DnD", "DnD, no attention crops", "DnD, no best-concept selection",
               "DnD, no summariser (top image's caption)", "CLIP-Dissect (toy CLIP)",
               "constant label (most common truth)"]
    cells: dict[str, list[str]] = {m: [] for m in methods}
    compare: dict[str, dict] = {}
    for layer, _ in layers:
        res = full[layer]
        truths = layer_truths(layer, res, scenes)
        recs = {r["unit"]: r for r in RunStore(res.run_dir).records(layer)}
        nc = {r["unit"]: r for r in RunStore(nocrops[layer].run_dir).records(layer)}
        acts = np.asarray(res.activations.values[:, res.units], dtype=np.float32)
        cd = clip_dissect(acts, image_emb, concepts, text_emb).labels(1)
        common = Counter(t for t in truths.values() if t).most_common(1)
        constant = common[0][0] if common else ""
        labels = {
            "DnD": {u: (r.get("labels") or [""])[0] for u, r in recs.items()},
            "DnD, no attention crops": {u: (r.get("labels") or [""])[0] for u, r in nc.items()},
            "DnD, no best-concept selection": {
                u: (r.get("candidates", {}).get("concepts") or [""])[0] for u, r in recs.items()},
            "DnD, no summariser (top image's caption)": {
                u: (r.get("captions") or [""])[0] for u, r in recs.items()},
            "CLIP-Dissect (toy CLIP)": {u: cd[i][0] for i, u in enumerate(res.units)},
            "constant label (most common truth)": {u: constant for u in res.units},
        }
        for m in methods:
            ok, judged = _score(labels[m], truths)
            cells[m].append(f"{ok}/{judged} ({100 * ok / judged:.1f}%)" if judged else "-")
        compare[layer] = {
            "methods": methods, "truths": truths, "labels": labels,
            "agrees": {m: {u: bool(t and mentions(labels[m].get(u, ""), t))
                           for u, t in truths.items()} for m in methods},
            "links": {u: f"dnd/{layer}/report/units/{layer}/{u}.html" for u in truths}}
    atomic_write_text(root / "compare.html", comparison_page(
        "Toy world: DnD, ablations and CLIP-Dissect vs ground truth", compare))
    head = ["method", *(f"{layer} (units {units})" for layer, units in layers)]
    return [f"Label 1 agreement with ground truth on {n_probe} probing renders "
            "(keyword match with synonyms; hidden units judged only when a concept clearly "
            "explains them, AP >= 0.5).", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join([m, *cells[m]]) + " |" for m in methods)]
