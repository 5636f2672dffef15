"""`dnd tables --only toyworld_planted`: DnD, its ablations and baselines on ``toyworld-planted``.

The planted channels of that target (:data:`dnd.toyworld.planted.PLANTED`, or a spec of
one's own: ``--spec FILE --weights DIR``) were trained to fire on known concepts, so every
label of theirs can be judged exactly; a few free channels per layer are judged too, by the
toy world's AP ground truth. This module runs the methods (DnD's rows, its ablations read
off the full run's records, CLIP-Dissect, a constant label) and writes the tables; the
judges and scores are :mod:`dnd.benchmarks.planted_judging`'s. :func:`planted_demo` is the
short version ``dnd demo`` ends with.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dnd.benchmarks.common import md_table
from dnd.benchmarks.planted_judging import (
    FREE,
    KEYWORD,
    STRICT,
    Calibration,
    Judged,
    Rate,
    Truth,
    by_rank_score,
    calibration,
    dnd_labels,
    first_candidates,
    label1_by,
    most_common_concept,
    paired_difference,
    polysemantic_recall,
    rate,
    secondary_precision,
    top_captions,
)
from dnd.io import atomic_write_text
from dnd.record import UnitRecord
from dnd.toyworld.planted import PLANTED, PlantedUnit

PLANTED_MODEL = "toyworld-planted"
FULL = "DnD (consensus summariser)"
PAPER = "DnD, the paper's Steps 1-3 (`selection: paper`)"
NO_CROPS = "DnD, no attention crops"
PAPER_RULE = "DnD, the paper's selection rule (candidates at every level)"
PHRASES = "DnD, whole phrases as candidates (evidence rule)"
WITH_TRUTH = "DnD, the true concepts among the candidates (selection alone)"
# The reference row's settings on every channel of the layers: more free units, so more
# wrong Labels 1 for the confidence's AUROC to rank.
EVERY = "DnD (consensus summariser), every channel of the layers"
# The DnD rows without an LLM: overrides of the toyworld preset, and their run folders.
ROWS: dict[str, dict[str, Any]] = {
    FULL: {},
    PAPER: {"crop.score": "rescored", "candidates": "phrases", "score.selection": "paper"},
    NO_CROPS: {"crop.max_crops": 0},
    PAPER_RULE: {"score.selection": "paper"},
    PHRASES: {"candidates": "phrases"},
}
ROW_FOLDERS = {FULL: "dnd", PAPER: "dnd-paper", NO_CROPS: "dnd-nocrops",
               PAPER_RULE: "dnd-paper-rule", PHRASES: "dnd-phrases", WITH_TRUTH: "dnd-truth",
               EVERY: "dnd-every-channel"}
NO_SELECTION = "DnD, no best-concept selection"
RANK_ONLY = "DnD, activation rank only (no image-product weight)"
NO_SUMMARISER = "DnD, no summariser (top images' captions)"
CLIP_DISSECT = "CLIP-Dissect (toy CLIP)"
CONSTANT = "constant label (most common truth)"
# Issue 31's goals: (what, scope, threshold, row); scope is a kind, a score name or a work
# count; row is the method it is read off (None: the reference row, the first one;
# LLM_ROW: each LLM-summariser row).
LLM_ROW = "each LLM row"
GOALS = (("Label 1 correct, all planted units", "planted", 0.85, None),
         ("Label 1 correct, monosemantic", "monosemantic", 0.90, None),
         ("Label 1 correct, textual", "textual", 0.90, None),
         ("Label 1 correct, local", "local", 0.70, None),
         ("Label 1 correct, compositional (strict)", "compositional", 0.70, None),
         ("Label 1 correct, polysemantic (either concept)", "polysemantic", 0.90, None),
         ("polysemantic: both concepts in Labels 1-3", "recall", 0.80, None),
         ("Label 1 over-specific", "over-specific", 0.15, None),
         ("Labels 2-3 precision", "precision", 0.85, None),
         ("confidence AUROC (all judged units)", "confidence", 0.85, None),
         ("confidence AUROC (all judged units)", "confidence", 0.85, EVERY),
         ("Label 1 over-specific", "over-specific", 0.15, EVERY),
         ("selection given the true concepts", "planted", 0.95, WITH_TRUTH),
         ("generated images per unit", "generated_images", 20, None),
         ("captioned images per unit", "captioned_images", 20, None),
         ("LLM requests per unit", "llm_requests", 4, LLM_ROW))
# Goals whose value must stay at or under the threshold (the others: at or over it).
AT_MOST = frozenset({"over-specific", "generated_images", "captioned_images", "llm_requests"})


# ----------------------------------------------------------------------------- runner


def _unit_spec(layer: str, free_units: int | None, units: Sequence[PlantedUnit] = PLANTED
               ) -> tuple[list[int], list[int]]:
    """(planted channels among ``units``, the first ``free_units`` other channels) of
    ``layer``; ``free_units`` None: every other channel."""
    from dnd.toyworld.planted import LAYERS, units_of
    from dnd.toyworld.target import DEFAULT_WIDTHS

    planted = [u.unit for u in units_of(layer, units)]
    if not planted:
        raise ValueError(f"layer {layer!r} has no planted unit; planted layers: "
                         f"{', '.join(_planted_layers(units))}")
    width = dict(zip(LAYERS, DEFAULT_WIDTHS, strict=True))[layer]
    taken = set(planted)
    free = [u for u in range(width) if u not in taken]
    if free_units is not None and free_units > len(free):
        raise ValueError(f"layer {layer} has {len(free)} free channels, asked for "
                         f"{free_units}; ask for fewer or for all (free_units: all)")
    return planted, free[:free_units]


def _planted_layers(units: Sequence[PlantedUnit] = PLANTED) -> list[str]:
    from dnd.toyworld.planted import planted_layers

    return planted_layers(units)


def check_trained_for_planted(weights: str | Path = "DEFAULT",
                              units: Sequence[PlantedUnit] = PLANTED) -> None:
    """Refuse weights trained for other planted units than ``units`` (default
    :data:`PLANTED`; or a spec's, ``planted.load_spec``): judging them against other units
    would score wrong truths. Reads the ``training.planted_units`` of the weights'
    ``toy_planted.json`` (for a file: the ``.json`` beside it; for a folder: the one in
    it), in any order; weights without that record are not checked (a warning says so)."""
    import logging

    from dnd.toyworld.target import PLANTED_STEM, WEIGHTS_DIR

    custom = list(units) != PLANTED
    what = "the planted spec's units" if custom else "dnd.toyworld.planted.PLANTED"
    path = (WEIGHTS_DIR / f"{PLANTED_STEM}.json" if weights == "DEFAULT"
            else Path(weights) / f"{PLANTED_STEM}.json" if Path(weights).is_dir()
            else Path(weights).with_suffix(".json"))
    record = (json.loads(path.read_text()).get("training", {}).get("planted_units")
              if path.is_file() else None)
    if not record:
        logging.getLogger(__name__).warning(
            "%s: no record of the planted units these weights were trained for; not checked "
            "against %s", path, "the planted spec" if custom else "PLANTED")
        return
    # Sorted: a spec listing the same units in another order plants the same network.
    trained = sorted((u["layer"], int(u["unit"]), u["kind"], tuple(u["concepts"]))
                     for u in record)
    wanted = sorted((u.layer, u.unit, u.kind, u.concepts) for u in units)
    if trained != wanted:
        extra = [u for u in trained if u not in wanted] or ["none"]
        lacking = [u for u in wanted if u not in trained] or ["none"]
        fix = ("train weights for the spec with `python -m dnd.toyworld.train --only planted "
               "--spec FILE --out DIR` and pass --weights DIR" if custom else
               "retrain with `python -m dnd.toyworld.train --only planted` or restore the "
               "PLANTED they were trained for")
        raise ValueError(f"{path}: these weights were trained for other planted units than "
                         f"{what} ({len(trained)} trained, {len(wanted)} wanted; trained, "
                         f"not wanted: {extra[0]}; wanted, not trained: {lacking[0]}); {fix}")


def run_planted_benchmark(root: str | Path, n_probe: int = 2000, *,
                          layers: Sequence[str] | None = None,
                          free_units: int | None = 16,
                          llm: str | None = None, n_boot: int = 2000, seed: int = 0,
                          weights: str | Path = "DEFAULT", spec: str | Path | None = None,
                          progress: bool = False) -> list[str]:
    """Describe the planted units and the first ``free_units`` free channels (None: every
    one) of each of ``layers`` (default: every planted layer) of ``toyworld-planted`` on
    ``n_probe`` probing renders with every method, judge them and return the tables
    (markdown lines); the reference row's settings also describe every channel of the
    layers (:data:`EVERY`).

    ``llm``: LLM backend of the (slower) LLM-summariser rows; None leaves them out.
    ``n_boot`` resamples (seeded with ``seed``) for every interval. ``weights``: the
    target's weights (``DEFAULT``: the committed ones; or a ``toy_planted.safetensors``
    file, e.g. a fresh training run's, for a run before committing it, or the folder
    holding it). ``spec``: a planted spec file (``planted.load_spec``) whose units are
    judged instead of :data:`PLANTED`, with weights trained for it (checked; the tables'
    first line names both and the command that trains the weights). Also writes
    ``<root>/compare.html`` (every unit's Label 1 per method beside its truth) and
    ``<root>/units.json`` (every unit's Labels 1-3 and verdicts per method).
    """
    from dnd.baselines.clip_dissect import clip_dissect
    from dnd.benchmarks.common import describe_toy_layers, layer_truths
    from dnd.benchmarks.toyworld import concept_set, llm_rows_note
    from dnd.probe import open_probe
    from dnd.report.compare import comparison_page
    from dnd.store import RunStore
    from dnd.toyworld.backends import _toy_encoder
    from dnd.toyworld.planted import SUMMARY, load_spec, train_command
    from dnd.toyworld.probe import probe_scenes

    root = Path(root)
    units = load_spec(spec) if spec is not None else PLANTED
    weights = str(weights)
    layers = list(layers or _planted_layers(units))
    if (free_units is not None and free_units < 0) or n_probe < 1:
        raise ValueError(f"need free_units >= 0 and n_probe >= 1, got {free_units}, "
                         f"{n_probe}")
    check_trained_for_planted(weights, units)
    chosen = {layer: _unit_spec(layer, free_units, units) for layer in layers}
    specs = [(layer, ",".join(map(str, sorted(p + f)))) for layer, (p, f) in chosen.items()]
    base = {"model": PLANTED_MODEL, "weights": weights, "summary": SUMMARY}
    runs, llm_rows, missing = planted_runs(root, n_probe, specs, base, llm=llm,
                                           progress=progress)
    runs[WITH_TRUTH] = with_true_concepts(root, n_probe, specs, base,
                                          [u for u in units if u.layer in layers],
                                          progress=progress)
    every = {layer: _unit_spec(layer, None, units) for layer in layers}
    folder = root / ROW_FOLDERS[EVERY]
    every_run = describe_toy_layers(
        folder, n_probe,
        [(layer, ",".join(map(str, sorted(p + f)))) for layer, (p, f) in every.items()],
        progress=progress, overrides={**base, "image_bank": str(folder / "bank")})
    scenes = probe_scenes(n_probe)
    encoder = _toy_encoder()
    probe = open_probe(f"toyworld:{n_probe}")
    image_emb = encoder.encode_images([probe.load(i) for i in range(len(probe))])
    concepts = concept_set()
    text_emb = encoder.encode_texts(concepts)

    methods = [*runs, NO_SELECTION, RANK_ONLY, NO_SUMMARISER, CLIP_DISSECT, CONSTANT]
    judged: dict[str, list[Judged]] = {m: [] for m in methods}
    free_described = 0
    compare: dict[str, dict] = {}
    crops: dict[str, list[int]] = {}  # kind -> [crop boxes made, crops captioned, images]
    # AP truths of every channel, once per layer (a unit's does not depend on the others)
    ap = {layer: layer_truths(layer, every_run[layer], scenes) for layer in layers}
    for layer, (_, free) in chosen.items():
        res = runs[FULL][layer]
        truths = _truths(layer, units, free, ap[layer])
        free_described += len(free)
        recs = {m: {r.unit: r for r in RunStore(run[layer].run_dir).records(layer)}
                for m, run in runs.items()}
        acts = np.asarray(res.activations.values[:, res.units], dtype=np.float32)
        cd = clip_dissect(acts, image_emb, concepts, text_emb).labels(3)
        cd_of = {u: tuple(cd[i]) for i, u in enumerate(res.units)}
        constant = most_common_concept(truths)
        full = recs[FULL]
        for t in truths:
            for m, rs in recs.items():
                judged[m].append(judge_record(t, rs.get(t.unit)))
            rec = full.get(t.unit)
            if rec and rec.crops:
                c = crops.setdefault(t.kind, [0, 0, 0])
                c[0] += len(rec.crops.crops)
                c[1] += sum(e.box is not None for e in rec.crops.activating)
                c[2] += sum(e.box is None for e in rec.crops.activating)
            judged[NO_SELECTION].append(Judged(t, first_candidates(rec) if rec else ()))
            judged[RANK_ONLY].append(Judged(t, by_rank_score(rec) if rec else ()))
            judged[NO_SUMMARISER].append(Judged(t, top_captions(rec) if rec else ()))
            judged[CLIP_DISSECT].append(Judged(t, cd_of[t.unit]))
            judged[CONSTANT].append(Judged(t, (constant,)))
        on_layer = {m: {j.truth.unit: j for j in js if j.truth.layer == layer}
                    for m, js in judged.items()}
        compare[layer] = {
            "methods": methods, "truths": {t.unit: t.text for t in truths},
            "labels": {m: {u: " \u00b7 ".join(j.labels) for u, j in js.items()}
                       for m, js in on_layer.items()},
            "agrees": {m: {u: j.correct(STRICT) for u, j in js.items()}
                       for m, js in on_layer.items()},
            "links": {t.unit: f"{ROW_FOLDERS[FULL]}/{layer}/report/units/{layer}/{t.unit}.html"
                      for t in truths}}
    atomic_write_text(root / "compare.html", comparison_page(
        "toyworld-planted: DnD, ablations and baselines vs planted truth (Labels 1-3; green: "
        "Label 1 correct, strict judge)", compare))
    atomic_write_text(root / "units.json", json.dumps(_unit_rows(judged), indent=1) + "\n")
    out = weights if Path(weights).is_dir() else Path(weights).parent
    lines = [f"Planted units of the spec `{spec}` (not the committed `PLANTED`), weights "
             f"`{weights}`, trained by `{train_command(spec, out)}`.", ""] if spec else []
    dnd_rows = [m for m in runs if m != WITH_TRUTH]
    work = {m: row_work(runs[m]) for m in dnd_rows}
    every_js = []
    for layer, (_, free_u) in every.items():
        recs = {r.unit: r for r in RunStore(every_run[layer].run_dir).records(layer)}
        every_js += [judge_record(t, recs.get(t.unit))
                     for t in _truths(layer, units, free_u, ap[layer])]
    lines += planted_tables(judged, layers, n_probe=n_probe, n_boot=n_boot, seed=seed,
                            free_described=free_described, dnd_rows=dnd_rows, work=work,
                            llm_rows=llm_rows, every=every_js,
                            every_described=sum(len(p) + len(f) for p, f in every.values()))
    lines += ["", f"### Attention crops in {FULL}", "",
              "Crops made from the units' activation maps (ALGORITHM.md Step 1), and how many "
              "of them were captioned beside the top images: each top image's crop where "
              "the unit fires most inside the original image (`crop.score: in_place`). The "
              "paper's rule enlarges each crop to the network's input and keeps it only if "
              "it then fires as much as an original, which a unit of small things rarely "
              "does.", ""]
    lines += md_table(["kind", "crops made", "crops captioned", "top images captioned"],
                      [[k, str(crops[k][0]), str(crops[k][1]), str(crops[k][2])]
                       for k in _kinds(judged[FULL]) if k in crops])
    return lines + llm_rows_note(llm, llm_rows, missing)


def planted_runs(root: Path, n_probe: int, specs: list[tuple[str, str]], base: dict, *,
                 llm: str | None, progress: bool = False
                 ) -> tuple[dict[str, dict], list[str], str | None]:
    """The DnD rows' runs (row -> layer -> ``RunResult``): :data:`ROWS` and, when the LLM
    backend ``llm`` runs here, the LLM-summariser rows; each row in its folder under
    ``root`` (:data:`ROW_FOLDERS`) with an image bank of its own that its layers share, so
    its work counters count every image it needs. ``base``: overrides of every run.
    Returns (runs, the LLM rows that ran, what the LLM rows need when they cannot run)."""
    from dnd.benchmarks.common import describe_toy_layers
    from dnd.benchmarks.toyworld import LLM_NAMES, _llm_available, _share_llm_cache

    rows = dict(ROWS)
    missing = _llm_available(llm) if llm else None
    llm_rows = []
    if llm and not missing:
        name = LLM_NAMES.get(llm, llm)
        for summarizer, row in (("llm", f"DnD, LLM summariser ({name})"),
                                ("llm+consensus", f"DnD, LLM summariser ({name}) + consensus "
                                                  "phrases")):
            rows[row] = {"summarizer": summarizer, "llm.name": llm}
            ROW_FOLDERS.setdefault(row, f"dnd-{summarizer.replace('+', '-')}-{llm}")
            llm_rows.append(row)
    runs = {}
    for row, overrides in rows.items():
        folder = root / ROW_FOLDERS[row]
        if row in llm_rows:  # the second LLM row pays for no request the first made
            _share_llm_cache(root / ROW_FOLDERS[llm_rows[0]], folder, [la for la, _ in specs])
        runs[row] = describe_toy_layers(folder, n_probe, specs, progress=progress, overrides={
            **base, **overrides, "image_bank": str(folder / "bank")})
    return runs, llm_rows, missing


def truth_candidates(unit: PlantedUnit) -> list[str]:
    """A planted unit's concepts as candidates: each concept, a compositional unit's as
    one conjunction ("blue on a striped background")."""
    if unit.kind == "compositional":
        return [f"{unit.concepts[0]} on a {unit.concepts[1]} background"]
    return list(unit.concepts)


def with_true_concepts(root: Path, n_probe: int, specs: list[tuple[str, str]], base: dict,
                       units: Sequence[PlantedUnit], progress: bool = False) -> dict:
    """The diagnostic row: the default run (:data:`FULL`) copied, every planted unit's
    candidates joined by its true concepts (:func:`truth_candidates`, source ``truth``)
    and its Step 3 run again. Selection alone decides it: every unit has a right answer
    among its candidates. Returns layer -> ``RunResult``."""
    from dnd.benchmarks.common import describe_toy_layers
    from dnd.store import RunStore

    src, folder = root / ROW_FOLDERS[FULL], root / ROW_FOLDERS[WITH_TRUTH]
    if not folder.is_dir():
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("report", "run.lock"))
        for u in units:
            store = RunStore(folder / u.layer)
            rec = store.read_unit(u.layer, u.unit)
            if rec is None or rec.candidates is None:
                continue
            new = [c for c in truth_candidates(u) if c not in rec.candidates.concepts]
            cands = dataclasses.replace(
                rec.candidates, concepts=rec.candidates.concepts + tuple(new),
                sources=rec.candidates.sources + (("truth",),) * len(new))
            store.write_unit(dataclasses.replace(rec, stage="candidates", candidates=cands,
                                                 scoring=None))
    return describe_toy_layers(folder, n_probe, specs, progress=progress,
                               overrides={**base, "image_bank": str(folder / "bank")})


def _truths(layer: str, units: Sequence[PlantedUnit], free: Sequence[int],
            ap: Mapping[int, str | None]) -> list[Truth]:
    """The truths judged on ``layer``: its planted units among ``units``, then its ``free``
    channels whose AP ground truth (``ap``, :func:`layer_truths`) is clear."""
    from dnd.toyworld.planted import units_of

    return ([Truth.of_planted(u) for u in units_of(layer, units)]
            + [Truth(layer, u, FREE, (ap[u],)) for u in free if ap.get(u)])


def judge_record(truth: Truth, rec: UnitRecord | None) -> Judged:
    """A DnD run's Labels 1-3 of one unit, judged, with its scores and candidates."""
    if rec is None:
        return Judged(truth, ())
    scoring = rec.scoring
    return Judged(truth, dnd_labels(rec), scoring.interpretability if scoring else None,
                  scoring.confidence if scoring else None,
                  rec.candidates.concepts if rec.candidates else ())


def row_work(layers: Mapping[str, Any]) -> dict[str, float]:
    """Work per unit of one row (layer -> ``RunResult``): generated and captioned images
    from its runs' work counters (``work.json``, every invocation, so a resumed row counts
    what its first run did), LLM requests and tokens from its unit records (a reply another
    row paid for counts too: it is work the unit's description needs), and the units."""
    from dnd.store import RunStore

    total: Counter[str] = Counter()
    n = 0
    for layer, res in layers.items():
        store = RunStore(res.run_dir)
        total.update({k: v for k, v in store.read_work()["total"].items()
                      if k in ("generated_images", "captioned_images")})
        for rec in store.records(layer):
            if rec.candidates:
                usage = rec.candidates.usage
                total.update({"llm_requests": usage.requests,
                              "prompt_tokens": usage.prompt_tokens,
                              "completion_tokens": usage.completion_tokens})
        n += len(res.units)
    return {"units": n, **{k: total[k] / max(n, 1) for k in (
        "generated_images", "captioned_images", "llm_requests", "prompt_tokens",
        "completion_tokens")}}


def planted_demo(root: str | Path, n_probe: int = 2000, layer: str = "conv4",
                 progress: bool = False) -> list[str]:
    """The short version for ``dnd demo``: the planted units of ``layer`` described with
    the ``toyworld`` preset on ``toyworld-planted`` (run directory ``<root>/<layer>``,
    resumed when it exists), Label 1 correct per kind (strict judge) for DnD and for two
    orderings of the same run's candidates: the summariser's (no best-concept selection)
    and the rank score's alone. Returns markdown lines."""
    from dnd.benchmarks.common import describe_toy_layers
    from dnd.store import RunStore
    from dnd.toyworld.planted import SUMMARY, units_of

    check_trained_for_planted()
    planted = units_of(layer)
    units = ",".join(str(u.unit) for u in planted)
    res = describe_toy_layers(Path(root), n_probe, [(layer, units)], progress=progress,
                              overrides={"model": PLANTED_MODEL, "summary": SUMMARY})[layer]
    recs = {r.unit: r for r in RunStore(res.run_dir).records(layer)}
    rows = {FULL: dnd_labels, NO_SELECTION: first_candidates, RANK_ONLY: by_rank_score}
    judged = {m: [Judged(Truth.of_planted(u), pick(recs[u.unit]) if u.unit in recs else ())
                  for u in planted] for m, pick in rows.items()}
    kinds = _kinds(judged[FULL])
    table = [[m, *(label1_by(js, lambda j: j.truth.kind)[k].cell() for k in kinds),
              rate([j.correct() for j in js]).cell()] for m, js in judged.items()]
    return [f"The {len(planted)} planted units of `{PLANTED_MODEL}` {layer} (each trained to "
            "fire on a known concept), Label 1 correct (strict judge: names the unit's concept, "
            "every part of a compositional one, and no other concept). `dnd tables --only "
            "toyworld_planted` runs the whole benchmark.", "",
            *md_table(["method", *kinds, "all"], table)]


def _unit_rows(judged: dict[str, list[Judged]]) -> list[dict]:
    """Per unit: its truth and, per method, Labels 1-3 and the verdicts."""
    first = next(iter(judged.values()))
    return [{"layer": j.truth.layer, "unit": j.truth.unit, "kind": j.truth.kind,
             "concepts": list(j.truth.concepts),
             "methods": {m: {"labels": list(js[i].labels),
                             "label1_strict": js[i].correct(STRICT),
                             "label1_keyword": js[i].correct(KEYWORD),
                             "interpretability": js[i].interpretability,
                             "confidence": js[i].confidence,
                             "candidates": list(js[i].candidates)}
                         for m, js in judged.items()}}
            for i, j in enumerate(first)]


# ----------------------------------------------------------------------------- tables


def _kinds(judged: Sequence[Judged]) -> list[str]:
    """Kinds present, planted kinds in PLANTED's kind order, free last."""
    from dnd.toyworld.planted import KINDS

    present = {j.truth.kind for j in judged}
    return [k for k in (*KINDS, FREE) if k in present]


def planted_tables(judged: dict[str, list[Judged]], layers: Sequence[str], *, n_probe: int,
                   n_boot: int = 2000, seed: int = 0, free_described: int = 0,
                   dnd_rows: Sequence[str] = (FULL,),
                   work: Mapping[str, Mapping[str, float]] | None = None,
                   llm_rows: Sequence[str] = (), every: Sequence[Judged] = (),
                   every_described: int = 0) -> list[str]:
    """The benchmark's markdown from judged units: ``judged`` maps each method to its
    units, every method holding the same truths in the same order (paired differences
    need it); ``dnd_rows``: the methods with interpretability scores and confidences;
    ``work``: per DnD row, its work per unit (:func:`row_work`); ``llm_rows``: the rows
    whose summariser is an LLM; ``every``: the reference row's settings on every channel of
    the layers (:data:`EVERY`), of which ``every_described`` were described. The first row
    of ``judged`` is the reference of the differences and the goals."""
    methods = list(judged)
    ref = methods[0]
    units = judged[ref]
    for m, js in judged.items():
        if [j.truth for j in js] != [j.truth for j in units]:
            raise ValueError(f"method {m!r} is judged on other units than {ref!r}")
    kinds = _kinds(units)
    planted = [k for k in kinds if k != FREE]
    count = Counter(j.truth.kind for j in units)
    is_planted = [j.truth.kind != FREE for j in units]

    def subset(js: Sequence[Judged], keep: Callable[[Judged], bool]) -> list[Judged]:
        return [j for j in js if keep(j)]

    lines = [
        f"Labels of `{PLANTED_MODEL}` units on {n_probe} probing renders, judged against "
        f"their planted concepts: {sum(is_planted)} planted units ("
        + ", ".join(f"{count[k]} {k}" for k in planted) + f") in {', '.join(layers)}"
        + (f", and {count[FREE]} free units whose AP ground truth is clear (of "
           f"{free_described} described, AP >= 0.5)" if free_described else "")
        + ". Judges: **keyword** = the label names one of the unit's concepts (keyword "
        "match with synonyms: \"crimson disc\" names \"red circle\"); **strict** = the "
        "same, and for a planted unit every part of a compositional concept and no other "
        "colour, shape, background kind or text (\"red star\" is wrong for a unit that "
        "fires on everything red); free units are judged by the keyword rule under both, "
        "their AP truth being only their best single concept. Intervals: 95% percentile "
        "bootstrap "
        f"over units, {n_boot} resamples, seed {seed}. Rows without \"LLM\" use the "
        "consensus summariser (no LLM).", "",
        "### Label 1 correct per unit kind (strict judge unless marked)", ""]
    head = ["method"]
    for k in kinds:
        head.append(f"{k} (AP truth)" if k == FREE else
                    f"{k}, strict" if k == "compositional" else
                    f"{k}, either concept" if k == "polysemantic" else k)
        if k == "compositional":
            head.append("compositional, keyword")
    head.append("all planted, strict")
    rows = []
    for m in methods:
        by_kind = label1_by(judged[m], lambda j: j.truth.kind, STRICT, n_boot, seed)
        cells = [m]
        for k in kinds:
            cells.append(by_kind[k].cell())
            if k == "compositional":
                comp = subset(judged[m], lambda j: j.truth.kind == "compositional")
                cells.append(rate([j.correct(KEYWORD) for j in comp], n_boot, seed).cell())
        cells.append(rate([j.correct(STRICT) for j in judged[m] if j.truth.kind != FREE],
                          n_boot, seed).cell())
        rows.append(cells)
    lines += md_table(head, rows)

    lines += ["", "### Label 1 correct per layer (planted units, strict judge)", ""]
    rows = []
    for m in methods:
        per_layer = label1_by(subset(judged[m], lambda j: j.truth.kind != FREE),
                              lambda j: j.truth.layer)
        rows.append([m, *(per_layer.get(la, Rate(0, 0)).cell() for la in layers)])
    lines += md_table(["method", *layers], rows)

    lines += ["", f"### {ref}: Label 1 correct per kind and layer (strict judge)", ""]
    rows = []
    for k in kinds:
        per_layer = label1_by(subset(units, lambda j, k=k: j.truth.kind == k),
                              lambda j: j.truth.layer)
        rows.append([k, *(per_layer.get(la, Rate(0, 0)).cell() for la in layers),
                     rate([j.correct(STRICT) for j in units if j.truth.kind == k]).cell()])
    lines += md_table(["kind", *layers, "all"], rows)

    lines += ["", "### Polysemantic recall, Labels 2-3 and over-specific labels (keyword "
              "judge)", "",
              "Both concepts: polysemantic units whose Labels 1-3 name both of their "
              "concepts. Labels 2-3 precision: secondary labels of planted units that name "
              "one of the unit's concepts (any part of a compositional one); methods "
              "without Labels 2-3 show `-`. Over-specific: judged units whose Label 1 also "
              "names a colour, shape, background kind or text the unit does not respond "
              "to (the strict judge counts such a Label 1 wrong; whole-scene captions "
              "always name some).", ""]
    rows = []
    for m in methods:
        no_label1 = sum(not j.labels for j in judged[m])
        rows.append([m, polysemantic_recall(judged[m]).cell(),
                     secondary_precision(judged[m]).cell(),
                     rate([j.over_specific for j in judged[m]]).cell(), str(no_label1)])
    lines += md_table(["method", "polysemantic: both concepts in Labels 1-3",
                       "Labels 2-3 precision (planted)", "Label 1 over-specific",
                       "units without Label 1"], rows)

    lines += ["", f"### {ref} minus each other row: Label 1 accuracy (strict judge)", "",
              "Percentage points, paired over the same units, with the 95% bootstrap "
              "interval; `*`: the interval excludes 0 (the two differ beyond resampling "
              "noise).", ""]
    rows, worse, better = [], [], []
    for m in methods[1:]:
        cells = [m]
        for k in [*planted, "all planted"]:
            keep = [i for i, j in enumerate(units) if _in_scope(j, k)]
            d = paired_difference([units[i].correct() for i in keep],
                                  [judged[m][i].correct() for i in keep], n_boot, seed)
            cells.append(d.cell())
            if d.excludes_zero:
                (worse if d.mean > 0 else better).append(f"{m} on {k} ({d.text})")
        rows.append(cells)
    lines += md_table(["method", *planted, "all planted"], rows)
    lines += ["", (f"Measurably worse than {ref} (interval above 0): "
                   + "; ".join(worse) + ".") if worse else
              f"No row is measurably worse than {ref} on any kind."]
    if better:
        lines += ["", f"Measurably better than {ref} (interval below 0): "
                  + "; ".join(better) + "."]

    lines += ["", "### Where the errors come from: candidates or selection (strict judge)", "",
              "Offered: units with a candidate that names their concept as the strict judge "
              "asks of Label 1 (the summariser put a right answer on the table). Chosen: "
              "of those, units whose Label 1 is right (selection). A method that never "
              "offers the concept has a candidate problem; one that offers it and does not "
              "choose it, a selection problem. The last row adds each planted unit's true "
              "concepts to the default run's candidates and runs Step 3 again: selection "
              "alone.", ""]
    rows = []
    for m in [r for r in dnd_rows if r in judged] + ([WITH_TRUTH] if WITH_TRUTH in judged
                                                      else []):
        cells = [m]
        for k in [*planted, "all planted"]:
            js = [j for j in judged[m] if _in_scope(j, k)]
            offered = [j for j in js if j.offered]
            cells.append(f"{len(offered)}/{len(js)} \u00b7 "
                         + rate([j.correct() for j in offered]).cell())
        rows.append(cells)
    lines += md_table(["method (offered \u00b7 chosen when offered)", *planted, "all planted"],
                      rows)

    lines += ["", "### Calibration: confidence and interpretability score as predictors of a "
              "correct Label 1 (strict judge)", "",
              "AUROC with its 95% bootstrap interval; units without a score are left out. "
              "Confidence (`UnitRecord.scoring.confidence`, the evidence rule's: response x "
              "coverage of Label 1) is not defined under the paper's rule; the "
              "interpretability score is the paper's (mean similarity of the top images).", ""]
    rows, pooled = [], []
    for m in dnd_rows:
        if m not in judged:
            continue
        planted_js = subset(judged[m], lambda j: j.truth.kind != FREE)
        rows.append([m, *(calibration(js, STRICT, n_boot, seed, score).cell()
                          for score in ("confidence", "interpretability")
                          for js in (planted_js, judged[m]))])
        if any(j.confidence is not None for j in judged[m]):
            pooled.append(m)
    if len(pooled) > 1:
        # A row whose Labels 1 are nearly all right has too few wrong ones to measure an
        # AUROC well; pooled, the rows above give the confidence more errors to rank.
        js = [j for m in pooled for j in judged[m]]
        planted_js = subset(js, lambda j: j.truth.kind != FREE)
        rows.append([f"pooled: the {len(pooled)} rows above with a confidence", *(
            calibration(part, STRICT, n_boot, seed, score).cell()
            for score in ("confidence", "interpretability") for part in (planted_js, js))])
    lines += md_table(["method", "confidence, planted units", "confidence, all judged units",
                       "interpretability, planted units", "interpretability, all judged units"],
                      rows)

    if work:
        lines += ["", "### Work per unit", "",
                  "From each row's work counters (`work.json`, `dnd.work`): what the models "
                  "were asked to do, divided by the units the row described (planted and "
                  "free, every layer). Each row has an image bank of its own shared by its "
                  "layers, so a concept two units or layers need is drawn once, as in one "
                  "`dnd describe` run with an empty bank.", ""]
        lines += md_table(["method", "units", "generated images", "captioned images (crops "
                           "included)", "LLM requests", "LLM tokens (prompt + completion)"],
                          [[m, f"{w['units']:.0f}", f"{w['generated_images']:.1f}",
                            f"{w['captioned_images']:.1f}", f"{w['llm_requests']:.2f}",
                            f"{w['prompt_tokens'] + w['completion_tokens']:.0f}"]
                           for m, w in work.items()])

    if every:
        free_js = [j for j in every if j.truth.kind == FREE]
        lines += ["", f"### {EVERY}", "",
                  f"The {ref} row's settings on all {every_described} channels of "
                  f"{', '.join(layers)} (a run of its own, with its own image bank): the "
                  f"{sum(j.truth.kind != FREE for j in every)} planted units and the "
                  f"{len(free_js)} free ones whose AP ground truth is clear. The tables above "
                  "judge the first free channels of each layer only; with every one there are "
                  "more wrong Labels 1 for the confidence's AUROC to rank.", ""]
        lines += md_table(
            ["units judged", "Label 1 correct, planted (strict)", "Label 1 correct, free",
             "Label 1 over-specific", "confidence AUROC, all judged units",
             "interpretability AUROC, all judged units"],
            [[str(len(every)), rate([j.correct(STRICT) for j in every if j.truth.kind != FREE]
                                    ).cell(), rate([j.correct(STRICT) for j in free_js]).cell(),
              rate([j.over_specific for j in every]).cell(),
              *(calibration(every, STRICT, n_boot, seed, s).cell()
                for s in ("confidence", "interpretability"))]])
    lines += ["", f"### Goals of issue 31 ({ref} unless named)", ""]
    lines += md_table(["goal", "target", "reached", "met"],
                      _goal_rows({**judged, **({EVERY: every} if every else {})}, work or {},
                                 n_boot, seed, llm_rows))
    for row in llm_rows:
        alone = rate([j.correct() for j in judged[row] if j.truth.kind != FREE])
        lines.append(f"| {row}: Label 1 correct, all planted units | "
                     f"{'>= 50%' if row == llm_rows[0] else '>= the ' + ref + ' row'} | "
                     f"{alone.cell()} | "
                     + _met(alone.value, 0.5 if row == llm_rows[0] else
                            rate([j.correct() for j in units if j.truth.kind != FREE]).value)
                     + " |")
    return lines


def _in_scope(j: Judged, kind: str) -> bool:
    """Whether ``j`` counts for a column: its kind, or "all planted" (any but free)."""
    return j.truth.kind == kind if kind != "all planted" else j.truth.kind != FREE


def _met(value: float | None, target: float, at_most: bool = False) -> str:
    if value is None:
        return "-"
    return "yes" if (value <= target if at_most else value >= target) else "**no**"



def _goal_rows(judged: Mapping[str, Sequence[Judged]],
               work: Mapping[str, Mapping[str, float]], n_boot: int, seed: int,
               llm_rows: Sequence[str] = ()) -> list[list[str]]:
    """One row per goal of :data:`GOALS` and row it is read off that was judged."""
    ref = next(iter(judged))
    rows = []
    goals = [(what, scope, target, r) for what, scope, target, row in GOALS
             for r in (llm_rows if row == LLM_ROW else [row])]
    for what, scope, target, row in goals:
        units = judged.get(row or ref)
        if units is None:
            continue
        planted = [j for j in units if j.truth.kind != FREE]
        r: Rate | Calibration | None = None
        if scope in AT_MOST - {"over-specific"}:
            if (row or ref) not in work:
                continue
            value: float | None = work[row or ref][scope]
            shown = f"{value:.1f}"
        else:
            if scope == "recall":
                r = polysemantic_recall(units)
            elif scope == "precision":
                r = secondary_precision(units)
            elif scope == "over-specific":
                r = rate([j.over_specific for j in units])
            elif scope == "confidence":
                r = calibration(units, STRICT, n_boot, seed, "confidence")
            elif scope == "planted":
                r = rate([j.correct(STRICT) for j in planted])
            else:
                r = rate([j.correct(STRICT) for j in units if j.truth.kind == scope])
            if isinstance(r, Rate) and not r.n:
                continue
            value = r.auroc if isinstance(r, Calibration) else r.value
            shown = r.cell()
        sign = "<=" if scope in AT_MOST else ">="
        limit = (f"{sign} {target:.2f}" if scope == "confidence" else
                 f"{sign} {target}" if scope in AT_MOST - {"over-specific"} else
                 f"{sign} {100 * target:.0f}%")
        rows.append([what + (f" ({row})" if row else ""), limit, shown,
                     _met(value, target, scope in AT_MOST)])
    return rows
