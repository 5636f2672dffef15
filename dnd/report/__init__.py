"""Static HTML report of a run: ``dnd report RUN_DIR``.

It renders what a run saved, the stages' unit records and the apps' files, and imports
none of the code that made them. Its parts: :mod:`.build` (the index and one page per
unit), :mod:`.images` (the image files pages name), :mod:`.html` (escaping and the page
skeleton), :mod:`.rules` (which units are marked hard to interpret), :mod:`.featurevis`
(``dnd featurevis``'s images and texts), :mod:`.dictionary` (the neurons a dictionary
feature mixes), :mod:`.compare` (labels beside ground truth; the rating study) and
:mod:`.inline` (the same pages in notebooks). This module registers the command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dnd.report.build import build_report
from dnd.report.compare import export_rating

__all__ = ["add_cli", "build_report", "export_rating"]


def add_cli(subparsers) -> None:
    """Add ``dnd report RUN_DIR [--export-rating PATH]`` to the ``dnd`` command."""
    p = subparsers.add_parser(
        "report", help="write a static HTML browser of a run's units",
        description="Write RUN_DIR/report/index.html (one card per unit, searchable) and one "
                    "page per unit showing why its label won. Opens from file://, no network.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `dnd describe` run directory")
    p.add_argument("--export-rating", metavar="PATH",
                   help="also write a rating study to PATH.csv and PATH.json: per unit its "
                        "image files and every method's labels in a seeded random order")
    p.add_argument("--method", metavar="NAME=CSV", action="append", default=[],
                   help="another method's labels for --export-rating (a labels.csv, or a "
                        "layer,unit,description CSV); repeatable")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the method order in --export-rating (default 0)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    methods = {}
    for item in args.method:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            print(f"dnd report: --method needs NAME=CSV, got {item!r}", file=sys.stderr)
            return 2
        methods[name] = path
    try:
        index = build_report(args.run_dir)
        print(f"report: {index}")
        if args.export_rating:
            for path in export_rating(args.run_dir, Path(args.export_rating), seed=args.seed,
                                      methods=methods):
                print(f"rating study: {path}")
    except (FileNotFoundError, ValueError) as e:
        print(f"dnd report: {e}", file=sys.stderr)
        return 2
    return 0
