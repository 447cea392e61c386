"""Pictures of rewritten programs: DOT, a dependency-free SVG, Graphviz output, an HTML report.

A picture shows the whole program: the step, and each function body it calls drawn as a
region inside its caller's (a Graphviz subgraph cluster; a framed region in the built-in
SVG), with a dashed edge from the op that calls it. Large programs are collapsed by name
scope: start from the step's top-level scopes and keep splitting the largest group into its
sub-scopes (a body's region into its own top-level scopes) while the picture stays under a
node budget, so a 15k-op ResNet50 step becomes ~40 boxes: one per residual block, one for
the backward pass, one for the optimizer. Every box keeps counts of what it holds: frozen
variables (blue), nodes inserted by the passes (orange), nodes the rewrite removed (grey,
dashed) and the rest (white).

* picture.py: the `Picture` (boxes, edges, body regions) built from the program's bodies;
* scopes.py: collapsing names into boxes by scope;
* dot.py: DOT text and Graphviz; html.py: the built-in SVG layout and the HTML report.
"""

from .dot import RenderError, graphviz_svg, render_dot, to_dot
from .html import to_html, to_svg
from .picture import Box, Cluster, Picture, picture

__all__ = ["Box", "Cluster", "Picture", "RenderError", "graphviz_svg", "picture", "render_dot",
           "to_dot", "to_html", "to_svg"]
