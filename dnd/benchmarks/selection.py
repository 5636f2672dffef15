"""`dnd bench selection`: adaptive best-concept selection against the full evaluation.

In generated images per unit, which decide a user's GPU hours whatever the machine, and in
Label 1 agreement, on the toy CNN's ``fc`` and ``conv4``; then a held-out check on
``toyworld-planted``'s planted units, which played no part in choosing the settings.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from dnd.benchmarks.common import describe_toy_layers, write_table

# (screen_images, contenders, contender_margin) settings that `dnd bench selection`
# compares with the full evaluation.
SELECTION_VARIANTS = ((2, 2, 0.0), (2, 2, 0.5), (2, 2, 0.7), (1, 2, 0.7), (2, 1, 0.0))


# The held-out check: toyworld-planted's planted units, which played no part in choosing
# the settings above, with the recommended setting only.
HELD_OUT_VARIANT = (2, 2, 0.7)


def bench_selection(root: str | Path, n_probe: int = 2000,
                    layers: tuple[tuple[str, str], ...] = (("fc", "all"), ("conv4", "0-31")),
                    variants: tuple[tuple[int, int, float], ...] = SELECTION_VARIANTS,
                    model: str = "toyworld-cnn", noise_seed: int | None = None) -> dict:
    """Adaptive best-concept selection against the full evaluation on the toy world: the
    ``toyworld`` preset with ``model`` on ``layers`` with every candidate on all Q images,
    then with each (``score.screen_images``, ``score.contenders``,
    ``score.contender_margin``) of ``variants``, and (``noise_seed``) the full evaluation
    with another generation seed, the evaluation's own noise. Each run is in its own folder
    under ``root`` with a fresh image bank that its layers share (described in order).
    Returns per run and layer the units, the generated images (work counters) and each
    unit's labels."""
    from dnd.store import RunStore

    root = Path(root)
    runs = {"full": {}, **{f"screen {q}, contenders {c}, margin {m:g}": {
        "score.screen_images": q, "score.contenders": c, "score.contender_margin": m}
        for q, c, m in variants}}
    if noise_seed is not None:
        runs[f"full, seed {noise_seed}"] = {"score.seed": noise_seed}
    out = {}
    for name, overrides in runs.items():
        folder = root / re.sub(r"[^a-z0-9.]+", "-", name)
        # A fresh image bank per row, shared by its layers: the later layers draw only the
        # concepts the earlier ones did not.
        results = describe_toy_layers(folder, n_probe, list(layers), progress=False,
                                      overrides={**overrides, "model": model,
                                                 "image_bank": str(folder / "bank")})
        out[name] = {layer: {"units": len(r.units), "work": r.work,
                             "labels": {rec.unit: rec.labels
                                        for rec in RunStore(r.run_dir).records(layer)}}
                     for layer, r in results.items()}
    return out


def selection_table(r: dict) -> list[str]:
    """Per run of a :func:`bench_selection` result: generated images per unit and Label 1
    agreement with the ``full`` run, per layer and over all layers (markdown rows)."""
    full = r["full"]
    layers = list(full)
    lines = ["| run | " + " | ".join(f"{la}: generated images per unit | {la}: Label 1 as "
                                     f"the full evaluation" for la in layers)
             + " | all layers: generated images per unit | all layers: Label 1 as the full "
             "evaluation |",
             "|---|" + "---|---|" * len(layers) + "---|---|"]
    for name, per_layer in r.items():
        cells, same_all, n_all = [], 0, 0
        for la in layers:
            run, ref = per_layer[la], full[la]["labels"]
            same = sum(run["labels"].get(u, ())[:1] == labels[:1] for u, labels in ref.items())
            same_all, n_all = same_all + same, n_all + len(ref)
            cells += [f"{run['work'].generated_images / run['units']:.1f}",
                      f"{same}/{len(ref)} ({100 * same / len(ref):.0f}%)"]
        units = sum(per_layer[la]["units"] for la in layers)
        made = sum(per_layer[la]["work"].generated_images for la in layers)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {made / units:.1f} | "
                     f"{same_all}/{n_all} ({100 * same_all / n_all:.0f}%) |")
    return lines


def selection_bench_lines(r: dict, command: str, n_probe: int,
                          held_out: dict | None = None) -> list[str]:
    """The markdown of ``results/bench-selection-toyworld.md`` for a :func:`bench_selection`
    result (and its ``held_out`` check, when given)."""
    full = r["full"]
    layers = list(full)
    lines = ["# Adaptive best-concept selection on the toy world", "",
             f"Regenerate: `{command}`", "",
             f"`toyworld` preset (consensus summariser, Q = 10 images per candidate), "
             f"{n_probe:,} probing renders, layers "
             + ", ".join(f"`{la}` ({full[la]['units']} units)" for la in layers)
             + ". Each row is a fresh run with an empty image bank, its layers described in "
             "this order and sharing the bank (as `--image-bank` does by default), so a "
             "later layer draws only concepts the earlier ones did not; images are also "
             "deduplicated across the units of a layer. `screen q, contenders c, margin m` "
             "(`--screen-images q --contenders c --contender-margin m`): every candidate gets "
             "q images; a unit whose best on them leads every other candidate (final scores "
             "below m times the best's) is decided there, otherwise its best and those of its "
             "c best within m get the other 10 - q (m = 0: never decided early). Label 1 "
             "agreement is against the full evaluation (the paper's, `--screen-images 0`, the "
             "default). The reference implementation generates 45 "
             "images per unit (4.5 candidates x 10) with no sharing between units.", "",
             *selection_table(r)]
    if held_out is not None:
        ho = held_out["full"]
        q, c, m = HELD_OUT_VARIANT
        lines += ["", "## Held out: the planted units", "",
                  "The settings above were chosen on those units. Here `toyworld-planted`'s "
                  "planted units (trained to fire on known concepts; "
                  + ", ".join(f"`{la}` {ho[la]['units']}" for la in ho)
                  + f"), which played no part in the choice, with `screen {q}, contenders "
                  f"{c}, margin {m:g}` only, and the full evaluation with another generation "
                  "seed: how much Label 1 moves when nothing but the generated images "
                  "change, the evaluation's own noise.", "", *selection_table(held_out)]
    return lines


def write_selection_bench(out_dir: str | Path = "results", *, command: str,
                          n_probe: int = 2000, work_dir: str | Path | None = None) -> Path:
    """Run :func:`bench_selection` (the toy CNN's fc and conv4, then the held-out planted
    units) in a temporary folder and write ``results/bench-selection-toyworld.md``."""
    from dnd.toyworld.planted import PLANTED

    held_layers = tuple((la, ",".join(str(p.unit) for p in PLANTED if p.layer == la))
                        for la in ("conv4", "conv3", "conv2"))
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        r = bench_selection(Path(tmp) / "main", n_probe)
        held = bench_selection(Path(tmp) / "held-out", n_probe, held_layers,
                               (HELD_OUT_VARIANT,), model="toyworld-planted", noise_seed=1)
        lines = selection_bench_lines(r, command, n_probe, held)
    return write_table(Path(out_dir) / "bench-selection-toyworld.md", lines)
