"""The `autopar viz` subcommand: draws a plan file (it prints, as the other subcommands do).

    autopar viz plan.json --out dump/
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    """Adds `viz` to the `autopar` command's subparsers."""
    p = sub.add_parser("viz", help="draw a plan file: graph, pipeline timeline and an HTML report",
                       description="Read a plan (JSON, from `autopar plan --out`) and write graph.dot (the graph by "
                                   "stage and layer, placements on the ops, collectives on the edges), graph.svg "
                                   "(when Graphviz's dot is installed), timeline.svg (the pipeline schedule "
                                   "simulated per device group) and report.html (all of it in one page).")
    p.add_argument("plan", help="a plan file (JSON)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write into (created if missing)")
    p.add_argument("--no-graphviz", action="store_true", help="do not render graph.svg even when dot is installed")
    p.set_defaults(run=_viz)


def _viz(args: argparse.Namespace) -> int:
    from autopar.plan import Plan
    from autopar.viz import visualize

    written = visualize(Plan.load(args.plan), args.out, graphviz=False if args.no_graphviz else None)
    for path in written.paths():
        print(path)
    return 0
