"""``dnd evaluate``: added to the main parser by :func:`add_cli` (``dnd tables``, which
regenerates the committed tables, is the benchmarks' command: :mod:`dnd.benchmarks.cli`).

Each subcommand stores its handler as ``func`` (args -> exit status), so the main CLI
dispatches with ``args.func(args)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dnd.evaluation.classifier_search import (
    DEFAULT_CACHE_DIR,
    classifier_search_needs,
    run_classifier_search,
)
from dnd.evaluation.embedders import (
    CachedEmbedder,
    create_embedder,
    embedder_names,
    embedder_needs,
)
from dnd.evaluation.final_layer import (
    constant_labels,
    final_layer_needs,
    final_layer_similarity,
    model_class_names,
)
from dnd.evaluation.labels import read_labels
from dnd.evaluation.milan import (
    GENERIC_LABELS,
    MILAN_TABLE_HEADER,
    RELIABLE_THRESHOLDS,
    milan_scores,
    milan_table_rows,
    read_annotations,
)
from dnd.preflight import check

_EMBEDDER_HELP = (f"text embedder: {', '.join(embedder_names())} (minilm runs offline; the "
                  f"paper uses clip and mpnet)")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand to ``dnd``'s subparsers."""
    ev = subparsers.add_parser("evaluate", help="score unit descriptions (final-layer, "
                               "MILANNOTATIONS, classifier search)",
                               description="Score unit descriptions with the paper's "
                               "evaluation protocols; prints a markdown table.")
    sub = ev.add_subparsers(dest="protocol", required=True)

    f = sub.add_parser("final-layer", help="descriptions of an output layer vs class names",
                       description="Cosine similarity of each output unit's description to "
                       "its class name, mean and bootstrap 95% CI, beside a constant label.")
    _labels_arg(f)
    f.add_argument("--layer", help="keep only this layer's rows of a layer,unit,description "
                   "file (needed when it holds several layers)")
    names = f.add_mutually_exclusive_group(required=True)
    names.add_argument("--model", help="model whose class names are the ground truth "
                       "(e.g. efficientnet-lite0, resnet50)")
    names.add_argument("--class-names", help="text file, one class name per line, line i "
                       "for unit i")
    _embedder_arg(f)
    f.add_argument("--baseline", default="object", help="constant label scored as the "
                   "baseline (default object)")
    f.set_defaults(func=_final_layer)

    m = sub.add_parser("milan", help="descriptions vs MILANNOTATIONS human annotations",
                       description="Mean similarity of descriptions to human annotations, "
                       "per layer, over all and over reliable units (two annotations agree), "
                       "beside the best constant label.")
    m.add_argument("--labels", action="append", required=True, metavar="[LAYER=]PATH",
                   help="descriptions: a layer,unit,description CSV, or LAYER=labels.csv "
                   "for a dnd run's labels (repeatable, one per layer)")
    m.add_argument("--annotations", required=True, help="layer,unit,summary CSV")
    m.add_argument("--embedder", default="minilm", help=_EMBEDDER_HELP + " (default minilm)")
    m.add_argument("--threshold", type=float, help="a unit is reliable when two of its "
                   "annotations have cosine similarity above this (default: the embedder's "
                   "calibrated threshold, "
                   + ", ".join(f"{k} {v}" for k, v in RELIABLE_THRESHOLDS.items())
                   + "; other embedders leave reliable units undetermined)")
    m.add_argument("--generic-label", action="append", metavar="TEXT", help="candidate "
                   "constant label for the baseline (repeatable; default: "
                   f"{', '.join(GENERIC_LABELS)})")
    m.set_defaults(func=_milan)

    c = sub.add_parser("classifier-search", help="AUROC of the unit matched to each class",
                       description="For each class of a labelled probing set, the unit "
                       "whose description is closest to the class name scores the images "
                       "one-vs-rest; prints per-class and mean AUROC.")
    _labels_arg(c)
    c.add_argument("--model", required=True, help="target network, as for dnd describe")
    c.add_argument("--weights", default="DEFAULT", help="weights, as for dnd describe "
                   "(default DEFAULT)")
    c.add_argument("--layer", required=True, help="layer the descriptions are of")
    c.add_argument("--probe", action="append", required=True, help="labelled probing set, "
                   "e.g. cifar10:PATH (repeatable)")
    _embedder_arg(c)
    c.add_argument("--summary", default="mean", choices=["mean", "max"], help="spatial "
                   "summary of a unit's map (default mean)")
    c.add_argument("--batch-size", type=int, default=64, help="images per forward pass "
                   "(default 64)")
    c.add_argument("--workers", type=int, default=0, help="image-loading worker processes "
                   "(default 0)")
    c.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="activation cache "
                   f"(default {DEFAULT_CACHE_DIR})")
    c.set_defaults(func=_classifier_search)


def _labels_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", required=True, help="descriptions: labels.csv of a dnd run "
                   "(Neuron ID,Label 1,...) or a layer,unit,description CSV")


def _embedder_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embedder", action="append", metavar="NAME", help=_EMBEDDER_HELP +
                   " (repeatable; several are averaged or reported side by side; "
                   "default minilm)")


def _embedders(args: argparse.Namespace) -> list:
    return [CachedEmbedder(create_embedder(n)) for n in (args.embedder or ["minilm"])]


def _final_layer(args: argparse.Namespace) -> int:
    check(final_layer_needs(args.model, args.embedder or ["minilm"]))  # before any loads
    labels = read_labels(args.labels, args.layer, single_layer=True)
    if args.model:
        class_names = model_class_names(args.model)
    else:
        class_names = [s.strip() for s in Path(args.class_names).read_text().splitlines()
                       if s.strip()]
    embedders = _embedders(args)
    # Every score is computed before anything is printed: a failure leaves stdout empty.
    rows = []
    for name, lab in ((args.labels, labels),
                      (f'constant "{args.baseline}"',
                       constant_labels([u.unit for u in labels], args.baseline))):
        res = final_layer_similarity(lab, class_names, embedders)
        rows += [f"| {name} | {s.embedder} | {s.mean:.4f} | [{s.low:.4f}, {s.high:.4f}] | "
                 f"{len(res.units)} |" for s in res.scores]
    print("| labels | embedder | mean cosine | 95% CI | units |\n|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


def _milan(args: argparse.Namespace) -> int:
    check(embedder_needs([args.embedder]))
    descriptions = {}
    for spec in args.labels:
        layer, sep, path = spec.rpartition("=")
        for u in read_labels(path, layer if sep else None):
            if u.layer is None:
                raise ValueError(f"{path} has no layer column: pass --labels LAYER={path}")
            descriptions[(u.layer, u.unit)] = u.description
    res = milan_scores(descriptions, read_annotations(args.annotations),
                       create_embedder(args.embedder), name="descriptions",
                       threshold=args.threshold,
                       generic_labels=args.generic_label or GENERIC_LABELS)
    print(f"{len(res.units)} units with a description and annotations, {res.n_unlabelled} "
          f"annotated units without a description. {res.rule}\n")
    print("| " + " | ".join(MILAN_TABLE_HEADER) + " |\n|" + "---|" * len(MILAN_TABLE_HEADER))
    for row in milan_table_rows([res]):
        print("| " + " | ".join(row) + " |")
    return 0


def _classifier_search(args: argparse.Namespace) -> int:
    check(classifier_search_needs(args.model, args.weights, args.embedder or ["minilm"]))
    res = run_classifier_search(read_labels(args.labels, args.layer), args.model, args.layer,
                                args.probe, _embedders(args), args.cache_dir,
                                weights=args.weights, summary=args.summary,
                                batch_size=args.batch_size, workers=args.workers)
    print("| class | unit(s) | description | AUROC |\n|---|---|---|---|")
    for c, u, d, a in zip(res.class_names, res.units, res.descriptions, res.per_class):
        print(f"| {c} | {', '.join(map(str, u))} | {'; '.join(dict.fromkeys(d))} | {a:.4f} |")
    print(f"| **mean** | | | **{res.mean_auroc:.4f}** |")
    return 0
