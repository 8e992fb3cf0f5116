"""Drawings of a Plan: the graph (Graphviz DOT, and SVG when Graphviz is installed), the pipeline
timeline (SVG) and one self-contained HTML report. `Plan.visualize(directory)` writes them all."""

from autopar.viz.dump import Dumps, visualize

__all__ = ["Dumps", "visualize"]
