"""`dnd bench describe`: the whole pipeline on the toy world, stage by stage.

Times ``describe`` on the toy world (the ``toyworld`` preset) and, with ``--compare
naive``, the per-unit baseline (:func:`describe_per_unit`: the reference implementation's
way, with the same stages), checking both give the same records. ``--llm`` summarises with
a real local LLM, ``--llm-latency`` through an API answered by the local latency server
(:mod:`dnd.benchmarks.latency_server`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from dnd.benchmarks.common import machine, peak_rss_mb, write_table
from dnd.loading import count_models, counting_target
from dnd.record import STAGES, UnitRecord
from dnd.work import COUNTS, REFERENCE_PER_UNIT, Work


def _describe_once(config, run_dir: Path, target, probe, models, per_unit: bool) -> dict:
    """One timed describe run; its stage seconds, item counts and records."""
    from dnd.api import describe
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
    the ``openai`` backend with a local server that answers every request after that latency
    (:mod:`dnd.benchmarks.latency_server`: the API regime). With ``compare_naive`` the same
    units are described again by the per-unit baseline (:func:`describe_per_unit`); the
    result has both runs and the differences between their records (there should be none).
    Models, target and probing set are loaded once and shared. Returns {"batched": run,
    "naive": run or None, "differences": [...]}.
    """
    from dnd.benchmarks.latency_server import MODEL, LatencyServer

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
    from dnd.config import load_config
    from dnd.loading import load_llm, load_models
    from dnd.probe import open_probe
    from dnd.target import load_target

    config = load_config(preset="toyworld", overrides=overrides)
    device = resolve_device(config.device)
    target = load_target(config.model, config.weights)
    target.to(device)
    probe = open_probe(config.probe)
    models = load_models(config, device, load_llm(config))
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        before = peak_rss_mb()
        batched = _describe_once(config, Path(tmp) / "batched", target, probe, models, False)
        batched["peak_rss_growth_mb"] = peak_rss_mb() - before
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
                           f"the local latency server (`dnd.benchmarks.latency_server`: every "
                           f"request after {latency:g} s, deterministic replies, no model)")
    elif r["llm"]:
        summariser = f"LLM `{r['llm']}`"
        summariser_text = f"the LLM summariser with `{r['llm']}`"
    else:
        summariser, summariser_text = "consensus, no LLM", "the consensus summariser (no LLM)"
    uses_llm = bool(r["llm"]) or latency is not None
    lines = [f"# describe on the toy world ({machine()}, {r['device']})", "",
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
    lines += ["", "The per-unit path is `dnd.benchmarks.describe.describe_per_unit`: the same "
              "stages with every unit alone through every stage, no cross-unit batching or "
              "caches, one LLM call at a time (the reference implementation's way, with models "
              "loaded once)."]
    return lines


def llm_usage(records: dict[int, UnitRecord]) -> dict[str, float]:
    """Mean LLM requests and prompt/completion tokens per unit, from the unit records'
    ``candidates.usage`` (requests answered from the cache count too: they are the work a
    unit's description needs)."""
    usages = [rec.candidates.usage for rec in records.values() if rec.candidates]
    keys = ("requests", "prompt_tokens", "completion_tokens")
    n = max(len(records), 1)
    return {k: sum(getattr(u, k) for u in usages) / n for k in keys}


def write_describe_bench(out_dir: str | Path = "results", *, command: str, **kw) -> Path:
    """Run :func:`bench_describe` and write ``results/bench-toyworld-<machine>.md``."""
    r = bench_describe(**kw)
    lines = describe_bench_lines(r, command)
    latency = r.get("llm_latency")
    llm = (f"latency{latency:g}s-" if latency is not None else
           f"{r['llm']}-" if r["llm"] else "")
    return write_table(Path(out_dir) / f"bench-toyworld-{llm}{machine()}.md", lines)
