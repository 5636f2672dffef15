"""`dnd bench textvis`: does text feature visualization name a CLIP unit's concept? And does
the toy CLIP have multimodal units?

Target ``toyworld-clip`` (the toy CLIP's image tower), two layers:

- ``layer4``: the last convolutional stage (512 channels), the layer right before the
  attention pool, as the neurons of the Multimodal Neurons work are the last stage of
  CLIP RN50x4; it has the most units with a clear ground-truth concept;
- ``attnpool``: the image embedding's 64 dimensions, whose direction is exact (the basis
  vector), a check of the search alone.

Units with a clear ground-truth concept (average precision over the probing renders,
:mod:`dnd.toyworld.groundtruth`) are judged: the top text (:func:`dnd.textsearch.search_texts`
with the default settings) names the concept under the toy world's keyword judge
(:func:`dnd.toyworld.groundtruth.mentions`, synonyms allowed). Baselines: the best single
word (the search's best seed), and chance: random texts of the top text's length drawn from
the same vocabulary. The multimodal check (:func:`dnd.toyworld.multimodal.multimodal_table`)
is run on every unit of both layers for every concept the renderer can draw both ways.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from dnd.benchmarks.common import write_table
from dnd.target import load_clip_for_target
from dnd.textsearch import TextScorer, TextVisConfig, search_texts, unit_directions
from dnd.textvis import clip_vocabulary
from dnd.toyworld.multimodal import (
    MULTIMODAL_THRESHOLD,
    multimodal_concepts,
    multimodal_table,
    scene_activations,
)

LAYERS = ("layer4", "attnpool")
RANDOM_DRAWS = 50   # random texts per unit for the chance level
EXAMPLES = 12       # units listed with their texts, per layer


def textvis_bench(n_probe: int = 2000, config: TextVisConfig | None = None,
                  layers: tuple[str, ...] = LAYERS, multimodal: bool = True) -> dict:
    """Per layer: judged units, the search's and the baselines' hits, seconds per unit,
    and (``multimodal``) the multimodal check of every unit. ``config``: the search
    settings (default: :class:`TextVisConfig`'s). Plain data (JSON-ready)."""
    from dnd.toyworld.groundtruth import mentions, unit_ground_truth
    from dnd.toyworld.probe import probe_scenes
    from dnd.toyworld.world import concept_names

    config = config or TextVisConfig()
    clip = load_clip_for_target("toyworld-clip")
    target = clip.target
    scenes = probe_scenes(n_probe)
    pixels = torch.stack([target.preprocess(s.image) for s in scenes])
    vocab = clip_vocabulary(clip)
    scorer = TextScorer(clip.model, clip.tokenizer, config.text_batch)
    rng = np.random.default_rng(0)
    out: dict = {"n_probe": n_probe, "config": config.to_dict(), "vocabulary": len(vocab),
                 "layers": {}}
    for layer in layers:
        acts = scene_activations(target, layer, scenes, "mean")
        truths = [t for t in unit_ground_truth(acts, scenes) if t.clear]
        units = [t.unit for t in truths]
        t0 = time.perf_counter()
        order = np.argsort(-acts[:, units], axis=0, kind="stable")[:config.top_images]
        dirs = unit_directions(target, layer, units, pixels, torch.as_tensor(order.T.copy()))
        found = search_texts(scorer, dirs, units, vocab, config)
        seconds = time.perf_counter() - t0
        rows = []
        for t, r in zip(truths, found, strict=True):
            top = r.texts[0][0]
            n_words = len(top.split())
            chance = np.mean([mentions(" ".join(rng.choice(vocab, n_words)), t.concept)
                              for _ in range(RANDOM_DRAWS)])
            rows.append({"unit": t.unit, "concept": t.concept, "ap": t.score,
                         "texts": r.texts, "seed": r.seed_text, "seed_score": r.seed_score,
                         "top1": bool(mentions(top, t.concept)),
                         "top3": any(mentions(x, t.concept) for x, _ in r.texts[:3]),
                         "seed_names": bool(mentions(r.seed_text, t.concept)),
                         # The judge accepts a text that names other concepts too.
                         "others": sum(mentions(top, c) for c in concept_names()
                                       if c not in t.concept.split()),
                         "chance": float(chance),
                         "nameable": all(any(mentions(w, part) for w in vocab)
                                         for part in t.concept.split()),
                         "monotone": all(b >= a for a, b in zip(r.history, r.history[1:]))})
        entry = {"units": rows, "seconds_per_unit": seconds / max(1, len(units)),
                 "n_units": int(acts.shape[1])}
        if multimodal:
            t0 = time.perf_counter()
            table = multimodal_table(target, layer, range(acts.shape[1]), seed=config.seed)
            entry["multimodal_seconds_per_unit"] = (time.perf_counter() - t0) / acts.shape[1]
            entry["multimodal"] = _multimodal_summary(table, truths)
        out["layers"][layer] = entry
    return out


def _multimodal_summary(table, truths) -> dict:
    """Every (unit, concept) pair that responds to both, the strongest word responses, and
    each clear unit's response to its own concept."""
    oz, wz = table.object_z, table.word_z
    both = [table.response(j, c) for ci, c in enumerate(table.concepts)
            for j in range(len(table.units))
            if oz[ci, j] >= MULTIMODAL_THRESHOLD and wz[ci, j] >= MULTIMODAL_THRESHOLD]
    pairs = sorted(((float(wz[ci, j]), j, c) for ci, c in enumerate(table.concepts)
                    for j in range(len(table.units)) if oz[ci, j] >= MULTIMODAL_THRESHOLD),
                   reverse=True)
    own = [table.response(table.units.index(t.unit), t.concept) for t in truths
           if t.concept in table.concepts]
    return {"both": [r.to_json() for r in both],
            "strongest_word": [table.response(j, c).to_json() for _, j, c in pairs[:5]],
            "picture_pairs": len(pairs),
            "own": [r.to_json() for r in own],
            "max_word_z": float(wz.max()), "concepts": len(table.concepts)}


def _pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.0f}%)" if n else "-"


def textvis_bench_lines(r: dict, command: str) -> list[str]:
    """The markdown of ``results/textvis-toyworld.md``."""
    cfg = r["config"]
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
    lines = [
        "# Text feature visualization on the toy world", "",
        f"Regenerate: `{command}`", "",
        "Target `toyworld-clip` (the toy CLIP's image tower). A unit's direction is what it "
        "writes into the image embedding: its activation-times-gradient contribution to the "
        f"unnormalised embedding, averaged over its top {cfg['top_images']} of "
        f"{r['n_probe']:,} probing renders (for `attnpool`, the embedding itself: the basis "
        "vector). The objective of a text is the cosine of its text embedding with that "
        "direction; the search edits word sequences (add, delete, replace a word; an edit "
        f"is kept only if it raises the objective): {cfg['chains']} chains per unit "
        f"started from its best single words, {cfg['proposals']} proposals per chain and "
        f"step, {cfg['steps']} steps, at most {cfg['max_words']} words, no language-model "
        f"penalty, over the {r['vocabulary']} words of the toy CLIP's training captions "
        "(`dnd.textvis`). Judged: units with a clear ground-truth concept (average "
        "precision >= 0.5 over the probing renders); a text names the concept under the "
        "toy world's keyword judge (synonyms allowed). Baselines: the best single word "
        "(the search's best seed) and chance (random texts of the top text's length from "
        f"the same words, {RANDOM_DRAWS} per unit). Seconds on this machine ({machine}): "
        "direction and search, per judged unit.", "",
        "| layer | units judged | top text names the concept | any of the top 3 | "
        "best single word | chance | seconds per unit |",
        "|---|---|---|---|---|---|---|"]
    for layer, e in r["layers"].items():
        rows = e["units"]
        n = len(rows)
        chance = sum(x["chance"] for x in rows)
        lines.append(
            f"| {layer} | {n} of {e['n_units']} | {_pct(sum(x['top1'] for x in rows), n)} | "
            f"{_pct(sum(x['top3'] for x in rows), n)} | "
            f"{_pct(sum(x['seed_names'] for x in rows), n)} | "
            f"{chance:.1f}/{n} ({100 * chance / max(n, 1):.0f}%) | "
            f"{e['seconds_per_unit']:.2f} |")
    if len(r["layers"]) > 1:
        rows = [x for e in r["layers"].values() for x in e["units"]]
        n, chance = len(rows), sum(x["chance"] for x in rows)
        lines.append(
            f"| all | {n} | {_pct(sum(x['top1'] for x in rows), n)} | "
            f"{_pct(sum(x['top3'] for x in rows), n)} | "
            f"{_pct(sum(x['seed_names'] for x in rows), n)} | "
            f"{chance:.1f}/{n} ({100 * chance / max(n, 1):.0f}%) | |")
    lines.append("")
    for layer, e in r["layers"].items():
        rows = e["units"]
        named = [x for x in rows if x["nameable"]]
        missed = Counter(x["concept"] for x in rows if not x["top1"])
        unnameable = Counter(x["concept"] for x in rows if not x["nameable"])
        why = (": plain backgrounds are captioned by their colour alone, so the toy CLIP "
               "never saw a word for them" if "plain" in unnameable else "")
        note = (f"{sum(unnameable.values())} judged {layer} units have a concept that no "
                f"word of the vocabulary names ({', '.join(sorted(unnameable))}{why}); the "
                f"top text names the concept of {_pct(sum(x['top1'] for x in named), len(named))}"
                " of the others; " if unnameable else "")
        lines.append(f"{layer}: {note}missed concepts: "
                     + (", ".join(f"{c} {k}" for c, k in missed.most_common()) or "none")
                     + f". Top texts also name {np.mean([x['others'] for x in rows]):.1f} "
                     "other toy concepts on average (the judge does not count them against "
                     "a text). The best objective never decreased during any unit's search: "
                     + ("yes." if all(x["monotone"] for x in rows) else "NO."))
        lines.append("")
    for layer, e in r["layers"].items():
        lines += [f"Examples, {layer} (first {EXAMPLES} judged units):", "",
                  "| unit | concept (AP) | top text (cosine) | best single word (cosine) | "
                  "names it |", "|---|---|---|---|---|"]
        for x in e["units"][:EXAMPLES]:
            text, score = x["texts"][0]
            lines.append(f"| {x['unit']} | {x['concept']} ({x['ap']:.2f}) | {text} "
                         f"({score:.3f}) | {x['seed']} ({x['seed_score']:.3f}) | "
                         f"{'yes' if x['top1'] else 'no'} |")
        lines.append("")
    if any("multimodal" in e for e in r["layers"].values()):
        lines += _multimodal_lines(r)
    return lines


def _multimodal_lines(r: dict) -> list[str]:
    lines = [
        "## Multimodal units", "",
        "Every unit's mean activation (spatial mean) on 24 renders of a concept as a "
        "picture (the main object's colour or shape, or the background kind; no word), on "
        "24 renders of the concept's name written by the renderer with the concept absent, "
        "and on controls without the concept (256 ordinary scenes without a word; 256 with "
        "one of the world's own words: cat, dog, sun, hello, toy). A unit responds to both "
        f"when picture minus no-word control and word minus other-word control are each >= "
        f"{MULTIMODAL_THRESHOLD:g} standard deviation of the unit over the ordinary scenes "
        f"(`dnd.toyworld.multimodal.multimodal_check`). Concepts: "
        f"{', '.join(multimodal_concepts())}.",
        "", "| layer | units x concepts checked | pairs where the picture moves the unit | "
        "pairs that respond to both | largest word response, any unit and concept (sd) | "
        "clear units: median picture / word response to their own concept (sd) | "
        "seconds per unit |",
        "|---|---|---|---|---|---|---|"]
    for layer, e in r["layers"].items():
        m = e.get("multimodal")
        if not m:
            continue
        own = m["own"]
        med = (f"{np.median([o['object_z'] for o in own]):+.2f} / "
               f"{np.median([o['word_z'] for o in own]):+.2f} ({len(own)} units)"
               if own else "-")
        lines.append(f"| {layer} | {e['n_units']} x {m['concepts']} | {m['picture_pairs']} | "
                     f"{len(m['both'])} | {m['max_word_z']:+.2f} | {med} | "
                     f"{e['multimodal_seconds_per_unit']:.2f} |")
    lines.append("")
    found = [(layer, b) for layer, e in r["layers"].items()
             for b in e.get("multimodal", {}).get("both", [])]
    if found:
        lines += ["Units that respond to both:", "",
                  "| layer | unit | concept | picture | word | no-word control | other-word "
                  "control | picture (sd) | word (sd) |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {layer} | {b['unit']} | {b['concept']} | {b['object']:.3f} | "
                  f"{b['word']:.3f} | {b['control']:.3f} | {b['other_word']:.3f} | "
                  f"{b['object_z']:+.2f} | {b['word_z']:+.2f} |" for layer, b in found]
    else:
        lines.append("No unit of either layer responds to both, for any concept: the toy "
                     "CLIP has no multimodal units by this measure. Its training captions "
                     "name the written word only for the world's own words (\"with the word "
                     "cat\"), never a colour, shape or background written out, so nothing "
                     "ties a written concept name to the concept. The strongest word "
                     "responses among unit-concept pairs whose picture moves the unit:")
        lines += ["", "| layer | unit | concept | picture | word | no-word control | "
                  "other-word control | picture (sd) | word (sd) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for layer, e in r["layers"].items():
            for b in e.get("multimodal", {}).get("strongest_word", [])[:3]:
                lines.append(f"| {layer} | {b['unit']} | {b['concept']} | {b['object']:.3f} | "
                             f"{b['word']:.3f} | {b['control']:.3f} | {b['other_word']:.3f} | "
                             f"{b['object_z']:+.2f} | {b['word_z']:+.2f} |")
    return lines


def write_textvis_bench(out_dir: str | Path = "results", *, command: str,
                        n_probe: int = 2000) -> Path:
    """Run :func:`textvis_bench` and write ``<out_dir>/textvis-toyworld.md``."""
    lines = textvis_bench_lines(textvis_bench(n_probe), command)
    return write_table(Path(out_dir) / "textvis-toyworld.md", lines)
