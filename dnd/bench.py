"""`dnd bench`: speed and memory measurements written to results/.

``dnd bench describe`` times the whole pipeline on the toy world, stage by stage, and with
``--compare naive`` also the per-unit baseline, checking both give the same records.

``dnd bench activations`` measures the one-pass activation stage at scale. A
synthetic probing set (N random 4x4 images held as a uint8 array) goes through a network
whose probed layer has U units; the numbers are the activation file on disk, the growth of
peak RSS during the pass (the memory the stage itself needs, beyond the models), and
throughput. Speed does not depend on the images' content.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import re
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dnd.activations import compute_activations
from dnd.io import atomic_write_text
from dnd.probe import ArrayProbe
from dnd.record import STAGES, UnitRecord
from dnd.target import IMAGENET_MEAN, IMAGENET_STD, Preprocess, Target
from dnd.work import COUNTS, REFERENCE_PER_UNIT, Work, count_models, counting_target


def write_table(path: Path, lines: list[str]) -> Path:
    """Write a benchmark's markdown ``lines`` to ``path`` (atomically) and print them."""
    atomic_write_text(path, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def bench_activations(n_images: int = 50_000, n_units: int = 2048, batch_size: int = 256,
                      seed: int = 0) -> dict:
    """One activation pass over ``n_images`` synthetic images for ``n_units`` units.

    Returns a dict: disk MB of the activations, peak-RSS growth MB during the pass,
    images/s, and the top-10 lookup time for all units.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n_images, 4, 4, 3), dtype=np.uint8)
    probe = ArrayProbe(name="synthetic", ids=[f"s/{i}" for i in range(n_images)],
                       images=images, source=f"synthetic:{n_images}:{seed}")
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, n_units, 3, padding=1), nn.ReLU())
    target = Target.from_module(net, Preprocess(resize=4, crop=4, mean=IMAGENET_MEAN,
                                                 std=IMAGENET_STD), name="bench-conv",
                                weights_id=f"seed{seed}")
    with tempfile.TemporaryDirectory() as tmp:
        before = _peak_rss_mb()
        start = time.perf_counter()
        acts = compute_activations(target, probe, ["1"], Path(tmp), batch_size=batch_size,
                                   progress=False)["1"]
        seconds = time.perf_counter() - start
        grown = _peak_rss_mb() - before
        disk = (Path(acts.path) / "values.f16").stat().st_size / 2**20
        start = time.perf_counter()
        acts.top_images(range(n_units), 10)
        topk_seconds = time.perf_counter() - start
    return {"n_images": n_images, "n_units": n_units, "disk_mb": disk,
            "peak_rss_growth_mb": grown, "images_per_s": n_images / seconds,
            "pass_seconds": seconds, "top10_seconds": topk_seconds,
            "probe_array_mb": images.nbytes / 2**20}


def write_activation_bench(out_dir: str | Path = "results", **kw) -> Path:
    """Run :func:`bench_activations` and write ``results/bench-activations-<machine>.md``."""
    r = bench_activations(**kw)
    machine = _machine()
    lines = [
        f"# Activation stage at scale ({machine})", "",
        "Regenerate: `dnd bench activations"
        + (f" --images {r['n_images']}" if r["n_images"] != 50_000 else "")
        + (f" --units {r['n_units']}" if r["n_units"] != 2048 else "") + "`", "",
        f"Synthetic probing set of {r['n_images']:,} images (4x4, held in a "
        f"{r['probe_array_mb']:.0f} MB array), a layer of {r['n_units']:,} units, "
        "float16 memory-mapped activations.", "",
        "| measure | value |", "| --- | --- |",
        f"| activations on disk | {r['disk_mb']:.1f} MB (target <= ~250 MB) |",
        f"| peak RSS growth during the pass | {r['peak_rss_growth_mb']:.1f} MB |",
        f"| throughput | {r['images_per_s']:,.0f} images/s ({r['pass_seconds']:.1f} s) |",
        f"| top-10 images of every unit | {r['top10_seconds']:.1f} s |", "",
        "The RSS growth is what the stage needs beyond the model. It includes the memory "
        f"map's own file-backed pages (at most the {r['disk_mb']:.0f} MB on disk, which the "
        "kernel may drop at any time); the rest is one batch of layer outputs. The array "
        "is never copied into RAM as a whole.",
    ]
    return write_table(Path(out_dir) / f"bench-activations-{machine}.md", lines)


# ---------------------------------------------------------------------------- describe


def _describe_once(config, run_dir: Path, target, probe, models, per_unit: bool) -> dict:
    """One timed describe run; its stage seconds, item counts and records."""
    from dnd.pipeline import describe
    from dnd.store import RunStore
    from dnd.toyworld.probe import clear_render_cache

    clear_render_cache()  # each run renders its probing images itself, as a fresh run would
    start = time.perf_counter()
    if per_unit:
        seconds, failed, n_units, work = describe_per_unit(config, run_dir, target, probe,
                                                           models)
    else:
        result = describe(config, run_dir, target=target, probe=probe, models=models,
                          progress=False)
        seconds, failed, n_units = result.seconds, result.failed, len(result.units)
        work = result.work
    total = time.perf_counter() - start
    if len(failed) == n_units:  # nothing was measured
        raise RuntimeError(f"bench run failed for every unit, e.g.: "
                           f"{next(iter(failed.values()))}")
    records = {r.unit: r for r in RunStore(run_dir).records(config.layer)}
    took = work.seconds.get
    return {"total_seconds": total, "stage_seconds": seconds, "failed": failed,
            "n_units": n_units, "n_probe": len(probe), "work": work,
            "captioned": (work.captioned_images, took("captioner", 0.0)),
            "generated": (work.generated_images, took("generator", 0.0)),
            "encoded": (work.encoded_images, took("encoder", 0.0)),
            "llm_requests": (work.llm_requests, took("llm", 0.0)),
            "records": records}


def describe_per_unit(config, run_dir: Path, target, probe, models
                      ) -> tuple[dict[str, float], dict[int, str], int, Work]:
    """The speed baseline: the reference implementation's way, with models loaded once.

    The pipeline's own stages, composed differently: every unit goes alone through every
    stage, with no caption or LLM cache, a fresh generated-image cache per unit (so every
    image is generated again), and the LLM's requests sent one after another. It gives the
    same records as :func:`dnd.pipeline.describe`, only slower. Returns (stage -> seconds,
    unit -> failure, number of units, its work counts).
    """
    from dnd.cache import FeatureCache
    from dnd.config import parse_units
    from dnd.executor import advance, build_stages
    from dnd.pipeline import activation_pass
    from dnd.record import UnitRecord
    from dnd.stages.base import RunContext
    from dnd.store import RunStore
    from dnd.target import num_units

    store = RunStore(run_dir)
    store.save_config(config)
    units = parse_units(config.units, num_units(target, config.layer))
    work = Work()
    models = count_models(models, work)
    if models.llm is not None:
        models = dataclasses.replace(models, llm=_OneAtATime(models.llm))
    failed = {}
    with counting_target(target, work):
        start = time.perf_counter()
        acts = activation_pass(config, store, target, probe, progress=False)
        seconds = {"activations": time.perf_counter() - start}
        for unit in units:
            with tempfile.TemporaryDirectory() as features:
                ctx = RunContext(config, target, probe, acts, models, caption_cache=None,
                                 features=FeatureCache(features), progress=False)
                (rec,) = advance(build_stages(ctx), [UnitRecord(config.layer, unit)], store,
                                 seconds)
            if rec.failed:
                failed[unit] = rec.error
    store.write_labels(config.layer)
    return seconds, failed, len(units), work


class _OneAtATime:
    """A chat backend whose batches are sent one request after another."""

    def __init__(self, llm):
        self.llm = llm

    @property
    def cache_identity(self):
        return self.llm.cache_identity

    def complete_many(self, requests):
        return [self.llm.complete_many([r])[0] for r in requests]


def same_results(a: dict[int, UnitRecord], b: dict[int, UnitRecord]) -> list[str]:
    """Differences between two runs' unit records in what the method decides: captions,
    candidates, labels, the selection order and failures. Empty when the runs agree."""

    def decided(rec: UnitRecord | None) -> dict:
        sc = rec and rec.scoring
        return {"captions": rec and rec.captions, "labels": rec and rec.labels,
                "error": rec and rec.error,
                "candidates": rec and rec.candidates and rec.candidates.concepts,
                "selection order": sc and sc.selection and sc.selection.order}

    diffs = []
    for unit in sorted(set(a) | set(b)):
        da, db = decided(a.get(unit)), decided(b.get(unit))
        diffs += [f"unit {unit}: {k} {da[k]!r} != {db[k]!r}" for k in da if da[k] != db[k]]
    return diffs


def bench_describe(units: str = "all", n_probe: int = 2000, layer: str = "fc",
                   compare_naive: bool = False, llm: str | None = None,
                   llm_latency: float | None = None,
                   work_dir: str | Path | None = None) -> dict:
    """End-to-end ``describe`` on the toy world (``toyworld`` preset) with per-stage timing.

    ``llm`` names an LLM backend (e.g. ``smollm2``) to summarise captions with instead of
    the preset's consensus summariser; ``llm_latency`` (seconds) instead summarises through
    the ``openai`` backend with a local server that answers every request after that
    latency (:mod:`dnd.latency_server`: the API regime). With ``compare_naive`` the same
    units are described
    again by the per-unit baseline (:func:`describe_per_unit`); the result has both runs
    and the differences between their records (there should be none). Models, target and
    probing set are loaded once and shared. Returns {"batched": run, "naive": run or None,
    "differences": [...]}.
    """
    from dnd.latency_server import MODEL, LatencyServer

    if llm is not None and llm_latency is not None:
        raise ValueError("give llm (a real LLM) or llm_latency (the latency server), not both")
    with contextlib.ExitStack() as stack:
        # No image bank: both paths generate their images, as a first run on a machine does.
        overrides = {"layer": layer, "units": units, "probe": [f"toyworld:{n_probe}"],
                     "image_bank": "none"}
        if llm is not None:
            overrides.update(summarizer="llm", llm={"name": llm})
        if llm_latency is not None:
            server = stack.enter_context(LatencyServer(llm_latency))
            stack.enter_context(_env(LATENCY_KEY_ENV, "local"))  # any non-empty key
            overrides.update(summarizer="llm", llm={"name": "openai", "options": {
                "model": MODEL, "base_url": server.base_url, "api_key_env": LATENCY_KEY_ENV,
                "max_concurrency": 256}})
        r = _bench_describe(overrides, compare_naive, work_dir)
    r.update(layer=layer, units=units, n_probe=n_probe, llm=llm, llm_latency=llm_latency)
    return r


# The latency server's API key variable (its value is a placeholder: the server checks none).
LATENCY_KEY_ENV = "DND_LATENCY_SERVER_KEY"


@contextlib.contextmanager
def _env(name: str, value: str):
    """Set environment variable ``name`` while the block runs (an unset one is unset
    again)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _bench_describe(overrides: dict, compare_naive: bool, work_dir) -> dict:
    """:func:`bench_describe` for a config given as ``toyworld`` preset ``overrides``."""
    from dnd.backends.base import resolve_device
    from dnd.backends.factory import load_llm, load_models
    from dnd.config import load_config
    from dnd.probe import open_probe
    from dnd.target import load_target

    config = load_config(preset="toyworld", overrides=overrides)
    device = resolve_device(config.device)
    target = load_target(config.model, config.weights)
    target.to(device)
    probe = open_probe(config.probe)
    models = load_models(config, device, load_llm(config))
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        before = _peak_rss_mb()
        batched = _describe_once(config, Path(tmp) / "batched", target, probe, models, False)
        batched["peak_rss_growth_mb"] = _peak_rss_mb() - before
        naive = None
        if compare_naive:
            naive = _describe_once(config, Path(tmp) / "naive", target, probe, models, True)
    diffs = same_results(batched["records"], naive["records"]) if naive else []
    return {"batched": batched, "naive": naive, "differences": diffs, "device": str(device)}


def _per_s(count_seconds: tuple[int, float]) -> str:
    n, s = count_seconds
    if s <= 0:
        return f"- ({n:,})"
    rate = n / s
    return f"{rate:,.{1 if rate >= 10 else 3}f}/s ({n:,} in {s:.1f} s)"


def describe_bench_lines(r: dict, command: str) -> list[str]:
    """The markdown of ``results/bench-toyworld-<machine>.md`` for a :func:`bench_describe`
    result ``r``."""
    b, n = r["batched"], r["naive"]
    runs = [("batched (dnd)", b)] + ([("per unit (naive)", n)] if n else [])

    def units_per_min(run):
        return 60 * run["n_units"] / run["total_seconds"]

    latency = r.get("llm_latency")
    if latency is not None:
        summariser = f"LLM API, {latency:g} s per request"
        summariser_text = (f"the LLM summariser through the `openai` backend, answered by "
                           f"the local latency server (`dnd.latency_server`: every request "
                           f"after {latency:g} s, deterministic replies, no model)")
    elif r["llm"]:
        summariser = f"LLM `{r['llm']}`"
        summariser_text = f"the LLM summariser with `{r['llm']}`"
    else:
        summariser, summariser_text = "consensus, no LLM", "the consensus summariser (no LLM)"
    uses_llm = bool(r["llm"]) or latency is not None
    lines = [f"# describe on the toy world ({_machine()}, {r['device']})", "",
             f"Regenerate: `{command}`", "",
             f"`toyworld` preset, layer `{r['layer']}`, units `{r['units']}` "
             f"({b['n_units']} units), {r['n_probe']:,} probing renders, candidates from "
             f"{summariser_text}; "
             "models loaded once and shared by the runs.", "",
             "| measure | " + " | ".join(name for name, _ in runs) + " |",
             "| --- |" + " --- |" * len(runs),
             "| units per minute, end to end | "
             + " | ".join(f"{units_per_min(run):,.1f}" for _, run in runs) + " |",
             "| total wall seconds | "
             + " | ".join(f"{run['total_seconds']:.1f}" for _, run in runs) + " |"]
    for stage in STAGES:
        lines.append(f"| {stage} stage, s | "
                     + " | ".join(f"{run['stage_seconds'].get(stage, 0.0):.1f}"
                                  for _, run in runs) + " |")
    lines += [
        "| target forward (activation pass) | "
        + " | ".join(_per_s((run["n_probe"], run["stage_seconds"]["activations"]))
                     for _, run in runs) + " |",
        "| images captioned | " + " | ".join(_per_s(run["captioned"]) for _, run in runs)
        + " |",
        f"| units summarised ({summariser}) | "
        + " | ".join(_per_s((run["n_units"], run["stage_seconds"].get("candidates", 0.0)))
                     for _, run in runs) + " |",
        *(["| LLM requests answered (after the run's deduplication) | "
           + " | ".join(_per_s(run["llm_requests"]) for _, run in runs) + " |",
           *(f"| {what} per unit (unit records, cached replies included) | "
             + " | ".join(f"{llm_usage(run['records'])[key]:,.1f}" for _, run in runs)
             + " |" for what, key in (("LLM requests", "requests"),
                                       ("prompt tokens", "prompt_tokens"),
                                       ("completion tokens", "completion_tokens")))]
          if uses_llm else []),
        "| images generated | " + " | ".join(_per_s(run["generated"]) for _, run in runs)
        + " |",
        "| images encoded (CLIP) | " + " | ".join(_per_s(run["encoded"]) for _, run in runs)
        + " |",
        "| units that failed (kept in the records, compared too) | "
        + " | ".join(str(len(run["failed"])) for _, run in runs) + " |",
        f"| peak RSS growth, batched run | {b['peak_rss_growth_mb']:.0f} MB |"
        + " |" * (len(runs) - 1),
    ]
    lines += ["", "Work per unit (`dnd.work`: what the models were asked to do, the same on "
              "any machine; a run's totals are in its `work.json`), beside the reference "
              "implementation's loop (measured on 8 toy `fc` units at its settings: Q = 10 "
              "images per concept, 50 denoising steps, K = 10, T = 5; `-`: not measured):",
              "", "| work per unit | " + " | ".join(name for name, _ in runs)
              + " | reference |", "| --- |" + " --- |" * (len(runs) + 1)]
    for key in COUNTS:
        ref = REFERENCE_PER_UNIT.get(key)
        lines.append(f"| {key.replace('_', ' ')} | "
                     + " | ".join(f"{run['work'].per_unit(run['n_units'])[key]:,.1f}"
                                  for _, run in runs)
                     + f" | {'-' if ref is None else f'{ref:,.1f}'} |")
    if n:
        ratio = units_per_min(b) / units_per_min(n)
        same = ("identical captions, candidates, labels, selection order and failures for "
                "every unit"
                if not r["differences"] else
                f"{len(r['differences'])} difference(s), e.g. {r['differences'][0]}")
        lines += ["", f"Speed-up of the batched pipeline over the per-unit path: "
                  f"**{ratio:.1f}x** units per minute. Records: {same}."]
    lines += ["", "The per-unit path is `dnd.bench.describe_per_unit`: the same stages with "
              "every unit alone through every stage, no cross-unit batching or caches, one "
              "LLM call at a time (the reference implementation's way, with models loaded "
              "once)."]
    return lines


def llm_usage(records: dict[int, UnitRecord]) -> dict[str, float]:
    """Mean LLM requests and prompt/completion tokens per unit, from the unit records'
    ``candidates.usage`` (requests answered from the cache count too: they are the work a
    unit's description needs)."""
    usages = [rec.candidates.usage for rec in records.values() if rec.candidates]
    keys = ("requests", "prompt_tokens", "completion_tokens")
    n = max(len(records), 1)
    return {k: sum(getattr(u, k) for u in usages) / n for k in keys}


def _machine() -> str:
    return f"{platform.machine()}-cpu{torch.get_num_threads()}"


def write_describe_bench(out_dir: str | Path = "results", *, command: str, **kw) -> Path:
    """Run :func:`bench_describe` and write ``results/bench-toyworld-<machine>.md``."""
    r = bench_describe(**kw)
    lines = describe_bench_lines(r, command)
    latency = r.get("llm_latency")
    llm = (f"latency{latency:g}s-" if latency is not None else
           f"{r['llm']}-" if r["llm"] else "")
    return write_table(Path(out_dir) / f"bench-toyworld-{llm}{_machine()}.md", lines)


# ---------------------------------------------------------------------------- selection

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
    from dnd.toyworld.demo import describe_toy_layers

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
