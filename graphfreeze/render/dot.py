"""DOT text for a picture, and Graphviz's `dot` run on it (SVG to inline, or a file)."""

from __future__ import annotations

import re
import shutil
import subprocess

from ..errors import FreezeError
from .picture import FILL, KINDS, STROKE, Picture


class RenderError(FreezeError, RuntimeError):
    """A picture could not be produced (e.g. Graphviz's `dot` is not installed).

    >>> try:                                                            # doctest: +SKIP
    ...     rw.render("step.svg")
    ... except gf.RenderError:
    ...     rw.to_html("step.html")                # the built-in layout needs no Graphviz
    """


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(pic: Picture, title: str = "graphfreeze") -> str:
    """Valid DOT text for a picture; each function body a (nested) subgraph cluster, with a
    dashed edge from the op that calls it."""
    style = {k: f'style="filled{",dashed" if k == "removed" else ""}", fillcolor="{FILL[k]}", '
                f'color="{STROKE[k]}"' for k in KINDS}
    # concentrate=true merges edges but cannot clip them at a cluster's border (lhead)
    layout = "compound=true" if pic.clusters else "concentrate=true"
    lines = [f"digraph {_quote(title)} {{", f"  rankdir=TB; {layout}; nodesep=0.15; ranksep=0.3;",
             '  node [shape=box, fontname="Helvetica", fontsize=10];']

    def region(path: str, indent: str) -> None:
        boxes, children = pic.region(path)
        for key in boxes:
            box = pic.boxes[key]
            lines.append(f"{indent}{_quote(key)} [label={_quote(box.label)}, tooltip={_quote(box.title)}, "
                         f"{style[box.kind]}];")
        for child in children:
            cl = pic.clusters[child]
            dashed = ",dashed" if cl.kind == "removed" else ""
            lines.extend([f"{indent}subgraph {_quote('cluster_' + child)} {{",
                      f'{indent}  label={_quote(cl.label)}; tooltip={_quote(cl.path)}; labeljust="l"; '
                      f'style="rounded{dashed}"; color="{STROKE[cl.kind]}"; fontname="Helvetica"; '
                      f"fontsize=11;"])
            region(child, indent + "  ")
            lines.append(f"{indent}}}")

    region("", "  ")
    lines += [f"  {_quote(a)} -> {_quote(b)};" for a, b in pic.edges]
    for path, cl in pic.clusters.items():
        anchor = pic.first_box(path)
        if cl.call is not None and anchor is not None:
            lines.append(f"  {_quote(cl.call)} -> {_quote(anchor)} [lhead={_quote('cluster_' + path)}, "
                         'style=dashed, color="#777777", arrowhead=empty];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _run_dot(dot_text: str, *args: str) -> subprocess.CompletedProcess[bytes] | None:
    """Graphviz's `dot` run on DOT text; None when it is not installed."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    return subprocess.run([exe, *args], input=dot_text.encode(), capture_output=True, check=False)


def graphviz_svg(dot_text: str) -> str | None:
    """Graphviz's SVG for DOT text, ready to inline in HTML; None without Graphviz."""
    result = _run_dot(dot_text, "-Tsvg")
    if result is None or result.returncode != 0:
        return None
    text = result.stdout.decode("utf-8", errors="replace")
    svg = text[text.find("<svg"):]
    # Scale to the page through the viewBox instead of Graphviz's absolute size in points.
    return re.sub(r'<svg width="[^"]*" height="[^"]*"', '<svg class="graphfreeze-graph" width="100%"',
                  svg, count=1)


def render_dot(dot_text: str, path: str) -> str:
    """Render DOT to `path` (format from its extension: svg, png, pdf) with Graphviz."""
    fmt = path.rsplit(".", 1)[-1].lower() if "." in path else "svg"
    result = _run_dot(dot_text, f"-T{fmt}", "-o", path)
    if result is None:
        raise RenderError(
            "rendering needs Graphviz's `dot` program, which is not on PATH; install Graphviz "
            "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz; conda: "
            "conda install graphviz), or use to_dot() / to_html(), which need nothing.")
    if result.returncode != 0:
        raise RenderError(f"dot -T{fmt} failed: {result.stderr.decode(errors='replace').strip()}")
    return path
