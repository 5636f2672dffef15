"""`dnd bench explain`: does `dnd explain` say what is where? Judged on the toy world.

1. Describe every unit of the toy CNN's ``conv4`` with the ``toyworld`` preset (the run's
   labels are what `dnd explain` reads; their own agreement with ground truth is reported
   too).
2. Render scenes with one object (each of the 64 colour-shape pairs, ``per_class`` renders
   each, random background, no text, distractors removed) at a random known place.
3. Semantic dictionary on ``conv4`` (8 x 8 positions, 8 x 8 pixels each): at the object's
   positions (cells at least half covered by its mask) take each position's top labelled
   unit; the render's answer is the label most of them carry. A hit when the answer names
   the object's colour or its shape (the toy world's keyword match with synonyms).
   Baselines: the same with the units' labels randomly permuted (``permutations`` draws
   per render), and the same on the background positions (cells with no object pixel
   within one cell of it).
4. Also per render: integrated gradients of the object's class logit (completeness gap,
   and the share of positive attribution inside the object against its area), the
   contributions of ``conv4``'s units to that class's ``fc`` unit (does the label with the
   largest summed contribution name its colour or shape?), and 4 NMF groups (does the first
   label of the group most on the object, its most weighted labelled unit's, name its
   colour or shape?), each against the permuted-label baseline.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dnd.benchmarks.common import write_table
from dnd.blocks import (
    SemanticDictionary,
    channel_attribution,
    class_output,
    group_labels,
    neuron_groups,
    semantic_dictionary,
    spatial_attribution,
)
from dnd.explain import Explainer

LAYER = "conv4"
SEED_START = 3_000_000  # past the probing renders (2,000,000 + n) and the training seeds


def one_object_scenes(per_class: int = 2) -> list:
    """``per_class`` renders of each colour-shape pair with only that object, no text."""
    from dnd.toyworld.render import draw, render_request
    from dnd.toyworld.world import COLOURS, SHAPES, ObjectRequest, SceneRequest

    scenes, seed = [], SEED_START
    for colour in COLOURS:
        for shape in SHAPES:
            for _ in range(per_class):
                request = SceneRequest(objects=(ObjectRequest(shape=shape, colour=colour),),
                                       text="")
                spec = render_request(request, seed).description
                scenes.append(draw(replace(spec, objects=spec.objects[:1])))
                seed += 1
    return scenes


def cell_masks(mask: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(object cells, background cells), bool [h, w], of an object ``mask`` [H, W] on a
    ``grid`` of h x w cells: at least half of the cell on the object; no object pixel within
    one cell's size of the cell."""
    h, w = grid
    size_y, size_x = mask.shape[0] // h, mask.shape[1] // w
    cover = mask[:h * size_y, :w * size_x].reshape(h, size_y, w, size_x).mean((1, 3))
    touched = cover > 0
    near = touched.copy()  # dilate by one cell (8-neighbourhood)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near |= np.roll(np.roll(touched, dy, 0), dx, 1) & _no_wrap(h, w, dy, dx)
    return cover >= 0.5, ~near


def _no_wrap(h: int, w: int, dy: int, dx: int) -> np.ndarray:
    """Cells that ``np.roll`` by (dy, dx) filled from inside the grid, not wrapped round."""
    ok = np.ones((h, w), bool)
    if dy > 0:
        ok[:dy] = False
    elif dy < 0:
        ok[dy:] = False
    if dx > 0:
        ok[:, :dx] = False
    elif dx < 0:
        ok[:, dx:] = False
    return ok


def majority_label(d: SemanticDictionary, cells: np.ndarray,
                   labels: dict[int, str] | None = None) -> str | None:
    """The label most of ``cells``' top units carry (``labels`` replaces the run's, e.g.
    permuted), ties to the larger summed activation; None when no unit fires there."""
    labels = labels or dict(d.labels)
    count: Counter = Counter()
    mass: Counter = Counter()
    for y, x in zip(*np.nonzero(cells), strict=True):
        unit, value = int(d.units[y, x, 0]), float(d.values[y, x, 0])
        if value > 0:
            count[labels[unit]] += 1
            mass[labels[unit]] += value
    if not count:
        return None
    return max(count, key=lambda lab: (count[lab], mass[lab]))


def _first(top: tuple) -> str | None:
    """The label of a group's most weighted labelled unit (None: none)."""
    return top[0][2] if top else None


def _names(label: str | None, obj) -> tuple[bool, bool]:
    from dnd.toyworld.groundtruth import mentions

    if not label:
        return False, False
    return mentions(label, obj.colour), mentions(label, obj.shape)


def explain_bench(root: str | Path, n_probe: int = 2000, per_class: int = 2, top: int = 3,
                  permutations: int = 20, steps: int = 50, seed: int = 0) -> dict:
    """Run the benchmark of the module docstring with the ``conv4`` run in ``root/conv4``
    (a re-run reuses it); returns counts per measure and a few example sentences."""
    from dnd.benchmarks.common import describe_toy_layers, layer_truths
    from dnd.toyworld.groundtruth import mentions
    from dnd.toyworld.probe import probe_scenes

    root = Path(root)
    t0 = time.perf_counter()
    res = describe_toy_layers(root, n_probe, [(LAYER, "all")], progress=False,
                              overrides={"image_bank": str(root / "bank")})[LAYER]
    describe_s = time.perf_counter() - t0
    explainer = Explainer(res.run_dir, LAYER)
    labels = explainer.labels
    truths = layer_truths(LAYER, res, probe_scenes(n_probe))
    judged = {u: t for u, t in truths.items() if t}
    label_ok = sum(mentions(labels.get(u, ""), t) for u, t in judged.items())
    rng = np.random.default_rng(seed)
    units = sorted(labels)
    perms = [dict(zip(units, rng.permutation([labels[u] for u in units]), strict=True))
             for _ in range(permutations)]
    scenes = one_object_scenes(per_class)
    rows = []
    t0 = time.perf_counter()
    with _one_thread():
        for scene in scenes:
            rows.append(_judge(scene, explainer, labels, perms, top, steps, seed))
    explain_s = time.perf_counter() - t0
    return {"n_probe": n_probe, "per_class": per_class, "top": top, "steps": steps,
            "permutations": permutations, "units": len(res.units), "labelled": len(labels),
            "judged": len(judged), "label_ok": label_ok, "rows": rows,
            "describe_s": describe_s, "explain_s": explain_s / len(scenes),
            "threads": torch.get_num_threads()}


@contextlib.contextmanager
def _one_thread():
    """Torch on one thread inside the block: the renders' tensors are tiny, and two
    threads on a shared 2-core machine spend their time waiting for each other whenever
    another process holds a core (integrated gradients' many small operations are each a
    synchronisation)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _judge(scene, explainer: Explainer, labels: dict[int, str], perms: list[dict],
           top: int, steps: int, seed: int) -> dict:
    """Every view of one render, judged (see the module docstring)."""
    from dnd.toyworld.target import CLASS_NAMES, class_index

    target = explainer.target
    obj = scene.description.main_object
    x, _ = explainer.tensor(scene.image)
    maps, _ = explainer.maps(x)
    d = semantic_dictionary(maps, labels, top, LAYER)
    on, off = cell_masks(scene.object_masks[0], d.grid)
    answer = majority_label(d, on)
    cls = class_index(scene.description)
    att = spatial_attribution(target, x, class_output(target, cls), f"class {cls}",
                              steps=steps)
    pos = np.clip(att.map, 0, None)
    ch = channel_attribution(target, x, LAYER, "fc", cls, explainer.summary, steps,
                             labels_a=labels, label_b=CLASS_NAMES[cls])
    groups = neuron_groups(maps, labels, 4, top, seed, LAYER)
    on_object = int(np.argmax((groups.masks * on).sum((1, 2))))
    factor = groups.factors[on_object:on_object + 1]

    def hit(label: str | None) -> bool:
        return any(_names(label, obj))

    return {
        "object": obj.label, "answer": answer, "names": _names(answer, obj),
        "perm": float(np.mean([hit(majority_label(d, on, p)) for p in perms])),
        "background": hit(majority_label(d, off)) if off.any() else None,
        "positions": [hit(d.labels[int(d.units[y, x_, 0])])
                      for y, x_ in zip(*np.nonzero(on), strict=True) if d.values[y, x_, 0] > 0],
        "gap": att.gap,
        "inside": float(pos[scene.object_masks[0]].sum() / max(pos.sum(), 1e-12)),
        "area": float(scene.object_masks[0].mean()),
        "channel": hit(ch.by_label()[0][0]),
        "channel_perm": float(np.mean([hit(replace(ch, labels_a=p).by_label()[0][0])
                                       for p in perms])),
        "sentence": ch.sentence(),
        "group": hit(_first(groups.top[on_object])),
        "group_perm": float(np.mean([hit(_first(group_labels(factor, p, top)[1][0]))
                                     for p in perms])),
        "group_label": groups.labels[on_object], "error": groups.error}


def _pct(k: float, n: int) -> str:
    return f"{k:.0f}/{n} ({100 * k / n:.0f}%)" if n else "-"


def explain_bench_lines(r: dict, command: str) -> list[str]:
    """The markdown of ``results/explain-toyworld.md``."""
    rows = r["rows"]
    n = len(rows)
    hit = sum(any(x["names"]) for x in rows)
    colour = sum(x["names"][0] for x in rows)
    shape = sum(x["names"][1] for x in rows)
    perm = sum(x["perm"] for x in rows)
    bg = [x["background"] for x in rows if x["background"] is not None]
    positions = [p for x in rows for p in x["positions"]]
    gaps = np.array([x["gap"] for x in rows])
    inside = np.array([x["inside"] for x in rows])
    area = np.array([x["area"] for x in rows])
    goal = "met" if hit >= 0.8 * n else "missed"
    lines = [
        "# `dnd explain` on the toy world", "",
        f"Regenerate: `{command}`", "",
        f"`toyworld-cnn` `{LAYER}`: all {r['units']} units described with the `toyworld` "
        f"preset on {r['n_probe']:,} probing renders ({r['labelled']} with a Label 1; of "
        f"the {r['judged']} units with a clear ground-truth concept, Label 1 names it for "
        f"{_pct(r['label_ok'], r['judged'])}). Then {n} renders with one object "
        f"({r['per_class']} per colour-shape pair, random place and background, no text; "
        "`dnd.benchmarks.explain`). Semantic dictionary: at the object's positions "
        f"of `{LAYER}` (8 x 8 cells, those at least half on the object) the label most of "
        "the positions' top labelled units carry; a hit when it names the object's colour "
        "or shape (keyword match with synonyms). Baselines: the units' labels randomly "
        f"permuted ({r['permutations']} permutations per render, mean), and the background "
        "positions (no object pixel within one cell).", "",
        "| measure | hits | colour | shape |", "|---|---|---|---|",
        f"| dictionary at the object's positions | **{_pct(hit, n)}** | {_pct(colour, n)} | "
        f"{_pct(shape, n)} |",
        f"| same, labels permuted (baseline) | {_pct(perm, n)} | | |",
        f"| same, background positions (baseline) | {_pct(sum(bg), len(bg))} | | |",
        f"| each object position's top unit (not a majority) | "
        f"{_pct(sum(positions), len(positions))} | | |",
        "",
        f"Goal (at least 80% of renders): {goal}.", "",
        "Other views on the same renders:", "",
        "| measure | result | baseline |", "|---|---|---|",
        f"| integrated gradients of the object's class logit, black baseline, "
        f"{r['steps']} steps: completeness gap, median / max | {100 * np.median(gaps):.2f}% "
        f"/ {100 * gaps.max():.2f}% | |",
        "| share of positive pixel attribution on the object (mean) | "
        f"{100 * inside.mean():.0f}% | the object's share of the image: "
        f"{100 * area.mean():.0f}% |",
        f"| channel attribution `{LAYER}` -> `fc` (the object's class unit): the label "
        "with the largest summed contribution names its colour or shape | "
        f"{_pct(sum(x['channel'] for x in rows), n)} | labels permuted: "
        f"{_pct(sum(x['channel_perm'] for x in rows), n)} |",
        "| 4 NMF groups: the label of the most weighted unit of the group most on the "
        "object names its colour or shape | "
        f"{_pct(sum(x['group'] for x in rows), n)} | labels permuted: "
        f"{_pct(sum(x['group_perm'] for x in rows), n)} |",
        f"| NMF reconstruction error (mean) | {100 * np.mean([x['error'] for x in rows]):.1f}% "
        "| |",
        "",
        f"Seconds on this machine: describing `{LAYER}` {r['describe_s']:.0f} s "
        f"({r['threads']} torch threads); all views of one render {r['explain_s']:.2f} s "
        f"({r['steps']} integrated-gradients steps, twice; one torch thread: the tensors are "
        "tiny, and two threads wait for each other whenever another process holds a core).",
        "", "Examples (object: dictionary answer; first group on the object; channel "
        "attribution):", ""]
    # One render of each shape, each in another colour (the diagonal of the class grid).
    for k in range(8):
        if k * 9 * r["per_class"] < n:
            x = rows[k * 9 * r["per_class"]]
            lines.append(f"- {x['object']}: {x['answer'] or '(nothing fires)'}; "
                         f"{x['group_label']}; {x['sentence']}")
    misses = [f"{x['object']} ({x['answer'] or 'nothing fires'})" for x in rows
              if not any(x["names"])]
    if misses:
        lines += ["", "Dictionary misses (object, and the answer at its positions): "
                  + ", ".join(misses) + "."]
    return lines


def write_explain_bench(out_dir: str | Path = "results", *, command: str,
                        n_probe: int = 2000, work_dir: str | Path | None = None) -> Path:
    """Run :func:`explain_bench` in a temporary folder and write
    ``results/explain-toyworld.md``."""
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        lines = explain_bench_lines(explain_bench(Path(tmp), n_probe), command)
    return write_table(Path(out_dir) / "explain-toyworld.md", lines)
