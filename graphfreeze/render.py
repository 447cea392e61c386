"""Pictures of rewritten graphs: DOT, a dependency-free SVG, Graphviz output, an HTML report.

Large graphs are collapsed by name scope: start from the top-level scopes and keep splitting
the largest group into its sub-scopes while the picture stays under a node budget, so a
15k-op ResNet50 step becomes ~40 boxes: one per residual block, one for the backward pass,
one for the optimizer. Every box
keeps counts of what it holds: frozen variables (blue), nodes inserted by the passes
(orange), nodes the rewrite removed (grey, dashed) and the rest (white).
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import networkx as nx

from .errors import FreezeError
from .text import format_shape

KINDS = ("frozen", "inserted", "removed", "plain")
# Constants and control-only groupings add clutter, not information, to a picture.
HIDDEN_OPS = frozenset({"Const", "NoOp"})
FILL = {"frozen": "#9ecae1", "inserted": "#fdae6b", "removed": "#eeeeee", "plain": "#ffffff"}
STROKE = {"frozen": "#08519c", "inserted": "#e6550d", "removed": "#999999", "plain": "#555555"}


class RenderError(FreezeError, RuntimeError):
    """A picture could not be produced (e.g. Graphviz's `dot` is not installed)."""


@dataclass
class Box:
    """One node of the collapsed picture: a scope (or a single op) and what it holds."""

    key: str
    members: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    order: float = 0.0
    op: str = ""

    @property
    def kind(self) -> str:
        c = self.counts
        if c["removed"] * 2 > len(self.members):  # mostly removed: draw as a removed region
            return "removed"
        for kind in ("frozen", "inserted"):
            if c[kind]:
                return kind
        return "plain"

    @property
    def title(self) -> str:
        """The full description (tooltips)."""
        return self.label if len(self.members) > 1 else f"{self.key} [{self.op}]"

    @property
    def label(self) -> str:
        if len(self.members) == 1:
            return f"{'/'.join(self.key.split('/')[-2:])} [{self.op}]"
        extra = "".join(f", {self.counts[k]} {k}" for k in ("removed", "inserted", "frozen")
                        if self.counts[k] and self.counts[k] != len(self.members))
        return f"{self.key}/ ({len(self.members)} ops{extra})"


@dataclass
class Picture:
    boxes: dict[str, Box]
    edges: list[tuple[str, str]]
    collapsed: bool


def _prefix(name: str, depth: int) -> str:
    return "/".join(name.split("/")[:depth])


def _virtual_groups(key: str, children: dict[str, list[str]], room: int) -> dict[str, list[str]] | None:
    """Too many sibling scopes for the picture: group them by a shared '_'-prefix of their
    names (Keras names ResNet layers conv2_block1_1_conv, conv2_block1_2_conv, ...), as
    finely as `room` allows. None when no prefix length groups them usefully."""
    best = None
    for tokens in range(1, 5):
        grouped: dict[str, list[str]] = defaultdict(list)
        for child, members in children.items():
            last = child.rsplit("/", 1)[-1]
            grouped[f"{key}/{'_'.join(last.split('_')[:tokens])}*"].extend(members)
        if len(grouped) > room:
            break
        if 1 < len(grouped) < len(children):
            best = grouped
    return best


def _collapse(names: list[str], budget: int) -> dict[str, str]:
    """node -> group key: split scopes, largest first, while the picture fits `budget`.

    A scope whose children are mostly single ops (an optimizer's flat scope of hundreds of
    arithmetic ops) stays one box: splitting it would add clutter, not structure. A scope
    with more child scopes than fit is split into groups of similarly named children.
    """
    if len(names) <= budget:
        return {n: n for n in names}
    groups: dict[str, list[str]] = defaultdict(list)
    top_level = [n for n in names if "/" not in n]
    stems = len(top_level) > 8  # many unscoped ops (gradient AddN_0..N): group by name stem
    for n in names:
        groups[f"{n.split('_')[0]}*" if stems and "/" not in n else _prefix(n, 1)].append(n)
    depth = {k: 1 for k in groups}  # a virtual group keeps its parent's depth
    settled: set[str] = set()
    while True:
        candidates = [k for k, m in groups.items() if len(m) > 1 and k not in settled]
        if not candidates:
            break
        key = max(candidates, key=lambda k: len(groups[k]))
        d = depth[key]
        children: dict[str, list[str]] = defaultdict(list)
        for n in groups[key]:
            children[_prefix(n, d + 1)].append(n)
        if len(children) == 1:  # a chain of single scopes: descend without splitting
            (child, members), = children.items()
            if child == key:
                settled.add(key)
                continue
            del groups[key]
            groups[child], depth[child] = members, d + 1
            continue
        singles = sum(1 for m in children.values() if len(m) == 1)
        room = budget - len(groups) + 1
        new_depth = d + 1
        if singles > 8 and singles * 2 > len(children):
            settled.add(key)
            continue
        if len(children) > room:
            virtual = _virtual_groups(key, children, room)
            if virtual is None:
                settled.add(key)
                continue
            children, new_depth = virtual, d
        del groups[key]
        for child, members in children.items():
            groups[child], depth[child] = members, new_depth
    return {n: k for k, members in groups.items() for n in members}


def picture(graph: nx.MultiDiGraph, original: nx.MultiDiGraph | None = None,
            frozen_placeholders: set[str] = frozenset(), budget: int = 40) -> Picture:
    """Group the rewritten graph (plus nodes only in `original`, as removed) into boxes."""
    kind, order, op = {}, {}, {}
    for n, d in graph.nodes(data=True):
        if d["op"] in HIDDEN_OPS:
            continue
        kind[n] = "frozen" if n in frozen_placeholders else "inserted" if d.get("inserted") else "plain"
        order[n], op[n] = d.get("order", 0.0), d["op"]
    edges = [(u, v) for u, v in graph.edges()]
    if original is not None:
        for n, d in original.nodes(data=True):
            if n not in graph and d["op"] not in HIDDEN_OPS:
                kind[n], order[n], op[n] = "removed", d.get("order", 0.0), d["op"]
        edges += [(u, v) for u, v in original.edges() if u not in graph or v not in graph]
    group = _collapse(sorted(kind), budget)
    boxes: dict[str, Box] = {}
    for n, key in group.items():
        box = boxes.setdefault(key, Box(key, order=order[n]))
        box.members.append(n)
        box.counts[kind[n]] += 1
        box.order = min(box.order, order[n])
        box.op = op[n]
    links = sorted({(group[u], group[v]) for u, v in edges
                    if u in group and v in group and group[u] != group[v]})
    return Picture(boxes, links, collapsed=len(boxes) < len(kind))


# ----------------------------------------------------------------------------- DOT


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(pic: Picture, title: str = "graphfreeze") -> str:
    """Valid DOT text for a picture."""
    style = {k: f'style="filled{",dashed" if k == "removed" else ""}", fillcolor="{FILL[k]}", '
                f'color="{STROKE[k]}"' for k in KINDS}
    lines = [f"digraph {_quote(title)} {{", "  rankdir=TB; concentrate=true; nodesep=0.15; ranksep=0.3;",
             '  node [shape=box, fontname="Helvetica", fontsize=10];']
    for key, box in sorted(pic.boxes.items()):
        lines.append(f"  {_quote(key)} [label={_quote(box.label)}, tooltip={_quote(box.title)}, "
                     f"{style[box.kind]}];")
    lines += [f"  {_quote(a)} -> {_quote(b)};" for a, b in pic.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _run_dot(dot_text: str, *args: str) -> subprocess.CompletedProcess | None:
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


# ----------------------------------------------------------------------------- SVG


def _layers(pic: Picture) -> dict[str, int]:
    """Longest-path layering over the group graph, edges against program order dropped."""
    order = {k: b.order for k, b in pic.boxes.items()}
    dag = nx.DiGraph()
    dag.add_nodes_from(pic.boxes)
    dag.add_edges_from((a, b) for a, b in pic.edges if order[a] < order[b])
    layer: dict[str, int] = {}
    for node in nx.topological_sort(dag):
        layer[node] = max((layer[p] + 1 for p in dag.predecessors(node)), default=0)
    return layer


def to_svg(pic: Picture, title: str = "") -> str:
    """A self-contained SVG of the picture (no Graphviz needed)."""
    layer = _layers(pic)
    per_layer: dict[int, list[str]] = defaultdict(list)
    for key in sorted(pic.boxes, key=lambda k: pic.boxes[k].order):
        per_layer[layer[key]].append(key)
    rows: dict[int, list[str]] = {}  # wide layers wrap onto several rows
    for y in sorted(per_layer):
        keys = per_layer[y]
        for start in range(0, len(keys), 6):
            rows[len(rows)] = keys[start:start + 6]
    w, h, gap_x, gap_y, pad = 190, 30, 14, 34, 20
    width = pad * 2 + max(len(r) for r in rows.values()) * (w + gap_x)
    height = pad * 2 + 24 + len(rows) * (h + gap_y)
    pos = {}
    for y, keys in rows.items():
        offset = (width - len(keys) * (w + gap_x)) / 2
        for i, key in enumerate(keys):
            pos[key] = (offset + i * (w + gap_x), pad + 24 + y * (h + gap_y))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graphfreeze-graph" width="{width:.0f}" '
           f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial" '
           f'font-size="10">', f'<text x="{pad}" y="{pad + 4}" font-size="13">{html.escape(title)}</text>',
           '<g fill="none" stroke="#9a9a9a" stroke-width="1">']
    for a, b in pic.edges:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        x1, y1, x2, y2 = x1 + w / 2, y1 + h, x2 + w / 2, y2
        mid = (y1 + y2) / 2
        out.append(f'<path d="M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} {x2:.0f},{y2:.0f}"/>')
    out.append("</g>")
    for key, box in pic.boxes.items():
        x, y = pos[key]
        kind = box.kind
        dash = ' stroke-dasharray="4,3"' if kind == "removed" or box.counts["removed"] else ""
        label = box.label if len(box.label) <= 34 else box.label[:15] + "…" + box.label[-18:]
        out.append(f'<g class="box {kind}"><title>{html.escape(box.title)}</title>'
                   f'<rect x="{x:.0f}" y="{y:.0f}" width="{w}" height="{h}" rx="4" fill="{FILL[kind]}" '
                   f'stroke="{STROKE[kind]}"{dash}/><text x="{x + 6:.0f}" y="{y + 19:.0f}">'
                   f"{html.escape(label)}</text></g>")
    out.append("</svg>")
    return "\n".join(out)


# ----------------------------------------------------------------------------- HTML


_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.legend span { display: inline-block; padding: 2px 8px; margin-right: 8px; border: 1px solid #888; }
.graph { overflow: auto; border: 1px solid #ddd; padding: 8px; max-height: 1400px; }
.scroll { max-height: 300px; overflow: auto; display: inline-block; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 8px; font-size: 12px; }
"""


def to_html(report, diff, pic: Picture, title: str, svg: str | None = None) -> str:
    """One self-contained HTML file: the report table, the diff and the picture (`svg`, e.g.
    Graphviz's, or the built-in layout when None)."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(r.path)}</td><td>{esc(format_shape(r.shape))}</td>"
        f"<td class='num'>{r.frozen:,}</td><td class='num'>{r.total:,}</td>"
        f"<td>{r.state}</td><td>{esc('; '.join(r.rules))}</td></tr>"
        for r in report.rows) or "<tr><td colspan='6'>nothing frozen</td></tr>"
    diff_rows = "".join(
        f"<tr><td>{esc(op)}</td><td class='num'>{diff.removed.get(op, 0)}</td>"
        f"<td class='num'>{diff.added.get(op, 0)}</td></tr>"
        for op in sorted(set(diff.removed) | set(diff.added),
                         key=lambda o: -(diff.removed.get(o, 0) + diff.added.get(o, 0))))
    legend = "".join(f"<span style='background:{FILL[k]}'>{k}</span>" for k in KINDS)
    note = " (collapsed by name scope)" if pic.collapsed else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<section id="report"><h2>Frozen variables</h2>
<div class="scroll"><table id="variables"><thead><tr><th>variable</th><th>shape</th><th>frozen</th>
<th>total</th><th>optimizer state</th><th>rule(s)</th></tr></thead><tbody>{rows}</tbody></table></div>
<pre>{esc(chr(10).join(report.summary_lines()))}</pre></section>
<section id="diff"><h2>What the rewrite changed</h2>
<div class="scroll"><table id="diff-table"><thead><tr><th>op type</th><th>removed</th><th>added</th></tr>
</thead><tbody>{diff_rows}</tbody></table></div>
<pre>{esc(str(diff))}</pre></section>
<section id="graph"><h2>Rewritten graph{note}</h2><p class="legend">{legend}</p>
<div class="graph">{svg or to_svg(pic, title)}</div></section>
</body></html>
"""
