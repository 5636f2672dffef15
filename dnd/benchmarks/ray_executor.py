"""`dnd bench ray`: the Ray executor's coordination overhead on a local cluster, and a worked
estimate of hours on 1, 4 and 8 GPUs.

Measured (toy world, ``toyworld`` preset, layer ``fc``): the same units described three
times in fresh run directories, with the local executor and with the Ray executor on one
and on two actors of a local cluster (one CPU each; the local run also gets one torch
thread, so all three do the same arithmetic). Per Ray run: the actors' start (loading every
model in each), and the coordination overhead per chunk: the time from sending a chunk to
having its records written, less the actor's time in the stages (moving the chunk, the
records and the activations, Ray's scheduling, the driver's record writes). Labels are
compared with the local run's.

The estimate (:func:`estimate_hours`) is arithmetic, not a measurement: the per-GPU stage
rates of the paper's models (``--gpu-rates``; by default assumed figures for one A100-class
GPU, since this bench runs without one: measure yours with ``dnd bench paper-scale``) give
each stage's hours for one GPU (:func:`dnd.benchmarks.paper_scale.project_hours`); with N
GPUs the per-unit stages divide by N, the activation pass (one GPU, in the driver) does not,
and the measured overhead per chunk and an actor start are added.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import torch

from dnd.benchmarks.common import machine, write_table
from dnd.benchmarks.paper_scale import CANDIDATES_PER_UNIT, IMAGES_PER_CONCEPT, Rates, project_hours

# Assumed throughput of one A100-class GPU for the paper's models (items/s): ResNet-50
# fp32 forward with image decoding (2,000/s), BLIP base captions of 32 tokens (100/s),
# Stable Diffusion v1-5 at 512 px, 50 DPM-Solver steps, fp16, batch 8 (1.5 images/s), CLIP
# ViT-B/16 image encoding (1,000/s). Not measured here: replace them with `dnd bench
# paper-scale`'s numbers (--gpu-rates).
ASSUMED_GPU_RATES = Rates(target=2000.0, caption=100.0, generate=1.5, encode=1000.0)
# Assumed time for an actor to load the paper's models (BLIP, SD v1-5, CLIP, ResNet-50)
# from a local disk, seconds.
ASSUMED_ACTOR_START_S = 60.0


def bench_ray(n_probe: int = 1000, units: str = "all", chunk_units: int = 8,
              actors: tuple[int, ...] = (1, 2), work_dir: str | Path | None = None) -> dict:
    """Describe toy ``fc`` ``units`` locally and on Ray with each of ``actors`` actors;
    returns {"runs": [...], "cluster_start_s", "n_probe", "units", "chunk_units"}."""
    from dnd.api import describe
    from dnd.config import load_config
    from dnd.executor import import_ray
    from dnd.store import RunStore
    from dnd.toyworld.probe import clear_render_cache

    ray = import_ray()
    base = load_config(preset="toyworld", overrides={
        "probe": [f"toyworld:{n_probe}"], "units": units, "chunk_units": chunk_units,
        "image_bank": "none"})
    threads = torch.get_num_threads()
    started = time.perf_counter()
    ray.init(num_cpus=max(actors), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    cluster_start = time.perf_counter() - started
    runs = []
    try:
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            configs = [("local", base)] + [
                (f"ray, {n} actor{'s' * (n > 1)}",
                 dataclasses.replace(base, executor="ray", ray_actors=n)) for n in actors]
            labels = None
            for i, (name, config) in enumerate(configs):
                clear_render_cache()
                start = time.perf_counter()
                result = describe(config, Path(tmp) / str(i), progress=False)
                wall = time.perf_counter() - start
                got = {r.unit: r.labels for r in RunStore(Path(tmp) / str(i)).records("fc")}
                labels = labels or got
                n_chunks = math.ceil(len(result.units) / chunk_units)
                s = result.seconds
                runs.append({
                    "name": name, "wall_s": wall, "n_units": len(result.units),
                    "failed": len(result.failed), "n_chunks": n_chunks,
                    "activations_s": s["activations"],
                    "startup_s": s.get("ray startup", 0.0),
                    "overhead_per_chunk_s": s.get("ray overhead", 0.0) / n_chunks,
                    "same_labels": got == labels, "actors": config.ray_actors})
    finally:
        torch.set_num_threads(threads)
        ray.shutdown()
    return {"runs": runs, "cluster_start_s": cluster_start, "n_probe": n_probe,
            "units": units, "chunk_units": chunk_units}


def estimate_hours(n_gpus: int, rates: Rates, *, overhead_per_chunk_s: float,
                   units: int = 2048, chunk_units: int = 256, probe_images: int = 50_000,
                   actor_start_s: float = ASSUMED_ACTOR_START_S) -> dict[str, float]:
    """Hours to describe ``units`` units on ``n_gpus`` GPUs (one actor each), by part.

    One-GPU stage hours from :func:`dnd.benchmarks.paper_scale.project_hours` (the paper's work per
    unit, no reuse of generated images across units: an upper bound); the per-unit stages
    (everything but the activation pass, which the driver runs on one GPU) divide by
    ``n_gpus``, LLM requests included (each actor sends its own; an API's rate limit can
    cap this); plus the actors' start and ``overhead_per_chunk_s`` per chunk, chunks
    shared among the actors. Returns {part: hours, "total": hours}."""
    one = project_hours(rates, units=units, probe_images=probe_images)
    per_unit = {k: v for k, v in one.items() if k not in ("activations", "total")}
    chunks_per_actor = math.ceil(math.ceil(units / chunk_units) / n_gpus)
    out = {"activations (driver, 1 GPU)": one["activations"],
           "per-unit stages": sum(per_unit.values()) / n_gpus,
           "actor start": actor_start_s / 3600,
           "Ray coordination": chunks_per_actor * overhead_per_chunk_s / 3600}
    out["total"] = sum(out.values())
    return out


def ray_bench_lines(r: dict, command: str, rates: Rates, rates_source: str) -> list[str]:
    local = r["runs"][0]
    lines = [
        f"# Ray executor on a local cluster ({machine()})", "",
        f"Regenerate: `{command}`", "",
        f"`toyworld` preset, layer `fc`, units `{r['units']}` ({local['n_units']} units), "
        f"{r['n_probe']:,} probing renders, consensus summariser (no LLM), "
        f"`--chunk-units {r['chunk_units']}` ({local['n_chunks']} chunks), no image bank; "
        "each run in a fresh run directory. The local run has one torch thread, as each "
        "Ray actor (one CPU each), so all runs do the same arithmetic. Starting the "
        f"local cluster (`ray.init`, once): {r['cluster_start_s']:.1f} s.", "",
        "| executor | wall s | activation pass s (driver) | actors' start s | per-unit "
        "stages, wall s | units per minute in them | coordination overhead per chunk, s | "
        "failed units | labels as the local run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in r["runs"]:
        is_ray = run["name"] != "local"
        stages = run["wall_s"] - run["activations_s"] - run["startup_s"]
        lines.append(
            f"| {run['name']} | {run['wall_s']:.1f} | {run['activations_s']:.1f} | "
            f"{run['startup_s']:.1f} | {stages:.1f} | {60 * run['n_units'] / stages:.1f} | "
            + (f"{run['overhead_per_chunk_s']:.3f}" if is_ray else "-")
            + f" | {run['failed']} | {'yes' if run['same_labels'] else '**no**'} |")
    ray_runs = [x for x in r["runs"] if x["name"] != "local"]
    overhead = max(x["overhead_per_chunk_s"] for x in ray_runs)
    lines += [
        "", "Coordination overhead per chunk: the time from sending a chunk to an actor to "
        "having its records written by the driver, less the actor's time in the stages. "
        "The actors' start is each actor loading every model (here the toy models; the "
        "paper's take about a minute from a local disk). Per-unit stages, wall: the run's "
        "wall time less the activation pass and the actors' start (it includes the report). "
        "On a machine with two CPU cores, two single-threaded actors share them with the "
        "driver, and two actors racing on the same uncached images draw some twice, so "
        "this machine cannot show how throughput grows with actors; each actor on its "
        "own GPU can.", "",
        "## Worked estimate: ResNet-50 `layer4` (2,048 units), 50,000 probing images", "",
        "An **estimate**, not a measurement. Inputs:", "",
        f"- per-GPU throughput, items/s: target {rates.target:,.0f}, captioner "
        f"{rates.caption:,.0f}, generator {rates.generate:,.2f}, encoder "
        f"{rates.encode:,.0f} ({rates_source});",
        f"- work per unit at the paper's settings: {CANDIDATES_PER_UNIT} candidates x "
        f"{IMAGES_PER_CONCEPT} generated images, each re-scored by the target and encoded "
        "by CLIP; 10 captions; 17 LLM requests at 8 per second per actor (an API with 8 in "
        "flight at 1 s each); no generated image reused across units (an upper bound: on "
        "the toy `fc` dnd generates 21.4 per unit, `results/bench-toyworld-x86_64-cpu2.md`);",
        f"- chunks of 256 units, one actor per GPU, the largest measured overhead per "
        f"chunk above ({overhead:.3f} s), actors' start {ASSUMED_ACTOR_START_S:.0f} s "
        "(assumed).", "",
        "| GPUs | activation pass h | per-unit stages h | actors' start h | Ray "
        "coordination h | total h |", "| --- | --- | --- | --- | --- | --- |"]
    for n in (1, 4, 8):
        h = estimate_hours(n, rates, overhead_per_chunk_s=overhead)
        lines.append(f"| {n} | {h['activations (driver, 1 GPU)']:.2f} | "
                     f"{h['per-unit stages']:.2f} | {h['actor start']:.3f} | "
                     f"{h['Ray coordination']:.5f} | **{h['total']:.2f}** |")
    lines += ["", "Generation dominates the per-unit stages; they divide by the GPUs "
              "because each actor takes whole chunks. Hours for other settings: "
              "`dnd.benchmarks.ray_executor.estimate_hours`."]
    return lines


def write_ray_bench(out_dir: str | Path = "results", *, command: str,
                    rates: Rates | None = None, n_probe: int = 1000) -> Path:
    """Run :func:`bench_ray` and write ``results/bench-ray-toyworld-<machine>.md``."""
    r = bench_ray(n_probe=n_probe)
    source = ("given with --gpu-rates" if rates is not None else
              "assumed A100-class figures, not measured here: no GPU; "
              "`dnd bench paper-scale` measures them")
    lines = ray_bench_lines(r, command, rates or ASSUMED_GPU_RATES, source)
    return write_table(Path(out_dir) / f"bench-ray-toyworld-{machine()}.md", lines)
