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
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import networkx as nx

from .bodies import Body
from .errors import FreezeError
from .ir import RETVAL
from .text import format_shape, human

if TYPE_CHECKING:  # the report and diff modules need nothing from here at run time
    from .diff import Diff
    from .report import Report

KINDS = ("frozen", "inserted", "removed", "plain")
# Constants, control-only groupings and a body's synthetic return nodes add clutter, not
# information, to a picture.
HIDDEN_OPS = frozenset({"Const", "NoOp", RETVAL})
FILL = {"frozen": "#9ecae1", "inserted": "#fdae6b", "removed": "#eeeeee", "plain": "#ffffff"}
STROKE = {"frozen": "#08519c", "inserted": "#e6550d", "removed": "#999999", "plain": "#555555"}


class RenderError(FreezeError, RuntimeError):
    """A picture could not be produced (e.g. Graphviz's `dot` is not installed).

    >>> try:                                                            # doctest: +SKIP
    ...     rw.render("step.svg")
    ... except gf.RenderError:
    ...     rw.to_html("step.html")                # the built-in layout needs no Graphviz
    """


@dataclass
class Box:
    """One node of the collapsed picture: a scope (or a single op) and what it holds."""

    key: str
    members: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    order: float = 0.0
    op: str = ""
    scope: str = ""   # the function body's region it is drawn in; its labels omit that prefix

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
        return self._describe(self.key) if len(self.members) > 1 else f"{self.members[0]} [{self.op}]"

    @property
    def label(self) -> str:
        if len(self.members) == 1:
            return f"{'/'.join(self._local(self.members[0]).split('/')[-2:])} [{self.op}]"
        return self._describe(self._local(self.key))

    def _local(self, name: str) -> str:
        """`name` without the prefix of the body region the box is drawn in."""
        return name[len(self.scope) + 1:] if self.scope and name.startswith(self.scope + "/") else name

    def _describe(self, name: str) -> str:
        extra = "".join(f", {self.counts[k]} {k}" for k in ("removed", "inserted", "frozen")
                        if self.counts[k] and self.counts[k] != len(self.members))
        return f"{name}/ ({len(self.members)} ops{extra})"


@dataclass
class Picture:
    """Boxes and the edges between them; each box drawn in the region of the function body
    it belongs to (`home`: box -> cluster path, "" for the step's own top level)."""

    boxes: dict[str, Box]
    edges: list[tuple[str, str]]
    collapsed: bool
    clusters: dict[str, Cluster] = field(default_factory=dict)
    home: dict[str, str] = field(default_factory=dict)

    def first_box(self, path: str) -> str | None:
        """The earliest box (in program order) inside region `path`, at any depth."""
        inside = [k for k, h in self.home.items() if h == path or h.startswith(path + "/")]
        return min(inside, key=lambda k: self.boxes[k].order, default=None)

    def region(self, path: str) -> tuple[list[str], list[str]]:
        """(boxes drawn directly in region `path`, in program order; its child regions)."""
        boxes = sorted((k for k, h in self.home.items() if h == path), key=lambda k: self.boxes[k].order)
        return boxes, [c for c, cl in self.clusters.items() if cl.parent == path]


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


def _children(key: str, depth: int, members: list[str], roots: Set[str],
              ops: dict[str, str]) -> dict[str, list[str]]:
    """The next level of scopes under `key`. In a function's own top level (the step's, or a
    body's) many unscoped ops are grouped by their name's stem (gradient AddN_0..N), or by
    op type when their names share no stems (the numbered placeholders of captures)."""
    children: dict[str, list[str]] = defaultdict(list)
    for n in members:
        children[_prefix(n, depth + 1)].append(n)
    if key == "" or key in roots:
        direct = [n for n in members if n.count("/") == depth]
        if len(direct) > 8:
            stems = {n: n.rsplit("/", 1)[-1].split("_")[0] for n in direct}
            by_type = len(set(stems.values())) > max(8, len(direct) // 2)
            for n in direct:
                children[n].remove(n)
                if not children[n]:
                    del children[n]
                name = f"{ops[n]}*" if by_type else f"{stems[n]}*"
                children[f"{key}/{name}" if key else name].append(n)
    return children


def _collapse(names: list[str], budget: int, roots: Set[str] = frozenset(),
              ops: dict[str, str] | None = None) -> dict[str, str]:
    """node -> group key: split scopes, largest first, while the picture fits `budget`.

    `roots` are the scopes that stand for function bodies: their own top level is split like
    the step's. A scope whose children are mostly single ops (an optimizer's flat scope of
    hundreds of arithmetic ops) stays one box: splitting it would add clutter, not
    structure. A scope with more child scopes than fit is split into groups of similarly
    named children.
    """
    if len(names) <= budget:
        return {n: n for n in names}
    groups: dict[str, list[str]] = {"": list(names)}
    depth = {"": 0}  # a virtual group keeps its parent's depth
    settled: set[str] = set()
    while True:
        candidates = [k for k, m in groups.items() if len(m) > 1 and k not in settled]
        if not candidates:
            break
        key = max(candidates, key=lambda k: len(groups[k]))
        d = depth[key]
        children = _children(key, d, groups[key], roots, ops or {})
        if len(children) == 1:  # a chain of single scopes: descend without splitting
            (child, members), = children.items()
            if child == key:
                settled.add(key)
                continue
            del groups[key]
            groups[child], depth[child] = members, d + 1
            continue
        new_depth = d + 1
        if key:  # the step's top level is always split: it is where the picture starts
            singles = sum(1 for m in children.values() if len(m) == 1)
            room = budget - len(groups) + 1
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


@dataclass
class Cluster:
    """A function body drawn as a region holding its boxes (Graphviz: a subgraph cluster)."""

    path: str                  # the body's scope in the picture: caller's path + "/" + name
    name: str                  # the function's name
    parent: str                # the enclosing cluster's path ("" = the step's top level)
    call: str | None           # the box holding the op that calls it, in the enclosing cluster
    counts: Counter[str] = field(default_factory=Counter)  # kinds of its own ops (not nested bodies')

    @property
    def kind(self) -> str:
        """"removed" when the rewritten program no longer calls the body at all."""
        return "removed" if self.counts["removed"] == sum(self.counts.values()) else "plain"

    @property
    def label(self) -> str:
        n, gone = sum(self.counts.values()), self.counts["removed"]
        return f"{self.name} ({n} ops{f', {gone} removed' if gone else ''})"


def _members(bodies: Sequence[Body]) -> tuple[dict[str, str], dict[str, float], dict[str, str],
                                              list[tuple[str, str]]]:
    """kind, order, op per picture node (a body's nodes named `<body path>/<node>`) and
    the edges, from each body's rewritten graph plus what only its original had."""
    kind, order, op, edges = {}, {}, {}, []
    for body in bodies:
        prefix = f"{body.path}/" if body.path else ""
        new, old = body.rewritten_graph, body.original_graph
        for n, d in new.nodes(data=True):
            if d["op"] not in HIDDEN_OPS:
                kind[prefix + n] = "frozen" if n in body.frozen else \
                    "inserted" if d.get("inserted") else "plain"
                order[prefix + n], op[prefix + n] = d.get("order", 0.0), d["op"]
        for n, d in old.nodes(data=True):
            if n not in new and d["op"] not in HIDDEN_OPS:
                kind[prefix + n], order[prefix + n], op[prefix + n] = "removed", d.get("order", 0.0), d["op"]
        edges += [(prefix + u, prefix + v) for u, v in new.edges()]
        edges += [(prefix + u, prefix + v) for u, v in old.edges() if u not in new or v not in new]
    return kind, order, op, edges


def picture(bodies: Sequence[Body], budget: int = 40) -> Picture:
    """Group the whole program (each body's rewritten graph plus what the rewrite removed
    from it) into at most about `budget` boxes, each body inside its caller's region."""
    kind, order, op, edges = _members(bodies)
    roots = {b.path: b for b in bodies if b.path}
    group = _collapse(sorted(kind), budget, set(roots), op)
    boxes: dict[str, Box] = {}
    for n, key in group.items():
        box = boxes.setdefault(key, Box(key, order=order[n]))
        box.members.append(n)
        box.counts[kind[n]] += 1
        box.order = min(box.order, order[n])
        box.op = op[n]
    links = sorted({(group[u], group[v]) for u, v in edges
                    if u in group and v in group and group[u] != group[v]})
    home = {key: _home(key, roots) for key in boxes}
    for key, box in boxes.items():
        box.scope = home[key]
    own: dict[str, Counter[str]] = defaultdict(Counter)  # body path -> kinds of its own ops
    for n, k in kind.items():
        own[_home(n, roots)][k] += 1
    clusters = {}
    for path in sorted({p for h in home.values() for p in _ancestors(h)}):
        body = roots[path]
        clusters[path] = Cluster(path, body.name, path.rpartition("/")[0], group.get(_call_key(body)),
                                 own[path])
    for path, body in roots.items():  # a body collapsed into one box: a plain call edge
        if path in boxes:
            caller = group.get(_call_key(body))
            if caller is not None and caller != path:
                links.append((caller, path))
    return Picture(boxes, sorted(set(links)), collapsed=len(boxes) < len(kind), clusters=clusters,
                   home=home)


def _call_key(body: Body) -> str:
    """The picture node of the op that calls `body`, in its caller's region."""
    assert body.call_node is not None, "the step itself has no calling op"
    parent = body.path.rpartition("/")[0]
    return f"{parent}/{body.call_node}" if parent else body.call_node


def _home(key: str, roots: Mapping[str, Any]) -> str:
    """The deepest body region a box is drawn in ("" = the step): the longest root that is
    a proper scope prefix of its key."""
    parts = key.split("/")
    for k in range(len(parts) - 1, 0, -1):
        candidate = "/".join(parts[:k])
        if candidate in roots:
            return candidate
    return ""


def _ancestors(path: str) -> list[str]:
    """A region's path and those of the regions around it (not the top level)."""
    parts = path.split("/") if path else []
    return ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]


# ----------------------------------------------------------------------------- DOT


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


# ----------------------------------------------------------------------------- SVG


_BOX_W, _BOX_H, _GAP_X, _GAP_Y, _PAD, _HEAD, _PER_ROW = 190, 30, 14, 34, 20, 24, 6


def _rows(pic: Picture, keys: list[str]) -> list[list[str]]:
    """Longest-path layering of `keys` over the edges among them (edges against program
    order dropped); wide layers wrap onto several rows."""
    order = {k: pic.boxes[k].order for k in keys}
    dag = nx.DiGraph()
    dag.add_nodes_from(keys)
    dag.add_edges_from((a, b) for a, b in pic.edges if a in order and b in order and order[a] < order[b])
    layer: dict[str, int] = {}
    for node in nx.topological_sort(dag):
        layer[node] = max((layer[p] + 1 for p in dag.predecessors(node)), default=0)
    per_layer: dict[int, list[str]] = defaultdict(list)
    for key in sorted(keys, key=lambda k: order[k]):
        per_layer[layer[key]].append(key)
    return [per_layer[y][i:i + _PER_ROW] for y in sorted(per_layer)
            for i in range(0, len(per_layer[y]), _PER_ROW)]


def _place(pic: Picture, path: str) -> tuple[float, float, dict[str, tuple[float, float]],
                                            list[tuple[str, float, float, float, float]]]:
    """Lay out region `path`: its boxes in rows, then each body it calls as a framed region
    below them. Returns (width, height, box -> (x, y), [(cluster, x, y, w, h)]), relative."""
    keys, children = pic.region(path)
    rows = _rows(pic, keys)
    blocks = [(c, *_place(pic, c)) for c in children]
    width = max([len(r) * (_BOX_W + _GAP_X) for r in rows] +
                [bw + 2 * _PAD for _, bw, _, _, _ in blocks] + [0])
    pos, frames, y = {}, [], 0.0
    for row in rows:
        offset = (width - len(row) * (_BOX_W + _GAP_X)) / 2
        for i, key in enumerate(row):
            pos[key] = (offset + i * (_BOX_W + _GAP_X), y)
        y += _BOX_H + _GAP_Y
    for child, bw, bh, bpos, bframes in blocks:
        fw, fh = bw + 2 * _PAD, bh + _HEAD + _PAD
        x0 = (width - fw) / 2
        frames.append((child, x0, y, fw, fh))
        pos.update({k: (x0 + _PAD + bx, y + _HEAD + by) for k, (bx, by) in bpos.items()})
        frames += [(c, x0 + _PAD + fx, y + _HEAD + fy, w, h) for c, fx, fy, w, h in bframes]
        y += fh + _GAP_Y
    return width, max(y - _GAP_Y, 0.0), pos, frames


def _short(text: str, limit: int = 34) -> str:
    return text if len(text) <= limit else text[:15] + "…" + text[-(limit - 16):]


def to_svg(pic: Picture, title: str = "") -> str:
    """A self-contained SVG of the picture (no Graphviz needed); each function body a framed
    region below the boxes of its caller, with a dashed line from the op that calls it."""
    content_w, content_h, rel, rel_frames = _place(pic, "")
    width, height = content_w + 2 * _PAD, content_h + 2 * _PAD + _HEAD
    pos = {k: (x + _PAD, y + _PAD + _HEAD) for k, (x, y) in rel.items()}
    frames = [(c, x + _PAD, y + _PAD + _HEAD, w, h) for c, x, y, w, h in rel_frames]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graphfreeze-graph" width="{width:.0f}" '
           f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial" '
           f'font-size="10">', f'<text x="{_PAD}" y="{_PAD + 4}" font-size="13">{html.escape(title)}</text>']
    for path, x, y, w, h in frames:
        cl = pic.clusters[path]
        dash = ' stroke-dasharray="6,4"' if cl.kind == "removed" else ""
        out.append(f'<g class="cluster {cl.kind}"><title>{html.escape(cl.path)}</title>'
                   f'<rect x="{x:.0f}" y="{y:.0f}" width="{w:.0f}" height="{h:.0f}" rx="8" '
                   f'fill="none" stroke="{STROKE[cl.kind]}"{dash}/><text x="{x + 8:.0f}" y="{y + 16:.0f}" '
                   f'font-size="11">{html.escape(_short(cl.label, 70))}</text></g>')
    out.append('<g fill="none" stroke="#9a9a9a" stroke-width="1">')
    for a, b in pic.edges:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        x1, y1, x2, y2 = x1 + _BOX_W / 2, y1 + _BOX_H, x2 + _BOX_W / 2, y2
        mid = (y1 + y2) / 2
        out.append(f'<path d="M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} {x2:.0f},{y2:.0f}"/>')
    for path, x, y, _, _ in frames:
        call = pic.clusters[path].call
        if call in pos:
            x1, y1 = pos[call][0] + _BOX_W / 2, pos[call][1] + _BOX_H
            out.append(f'<path class="call" stroke-dasharray="4,3" d="M{x1:.0f},{y1:.0f} '
                       f'L{x + 24:.0f},{y:.0f}"/>')
    out.append("</g>")
    for key, box in pic.boxes.items():
        x, y = pos[key]
        kind = box.kind
        dash = ' stroke-dasharray="4,3"' if kind == "removed" or box.counts["removed"] else ""
        out.append(f'<g class="box {kind}"><title>{html.escape(box.title)}</title>'
                   f'<rect x="{x:.0f}" y="{y:.0f}" width="{_BOX_W}" height="{_BOX_H}" rx="4" '
                   f'fill="{FILL[kind]}" stroke="{STROKE[kind]}"{dash}/><text x="{x + 6:.0f}" '
                   f'y="{y + 19:.0f}">{html.escape(_short(box.label))}</text></g>')
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


def to_html(report: Report, diff: Diff, pic: Picture, title: str, svg: str | None = None) -> str:
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
    functions = "".join(
        f"<tr><td>{esc(b.name)}{' (the step)' if b.is_step else ''}</td><td>{esc(b.parent or '-')}</td>"
        f"<td class='num'>{b.ops_before:,}</td><td class='num'>{b.ops_after:,}</td>"
        f"<td class='num'>{human(sum(b.flops_removed.values()))}</td>"
        f"<td class='num'>{human(sum(b.flops_added.values()))}</td></tr>" for b in report.bodies)
    legend = "".join(f"<span style='background:{FILL[k]}'>{k}</span>" for k in KINDS)
    note = " (collapsed by name scope)" if pic.collapsed else ""
    if pic.clusters:
        note += "; each function body is a framed region below its caller"
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
<pre>{esc(str(diff))}</pre>
<h2>Per function (the step and the bodies it calls)</h2>
<div class="scroll"><table id="functions"><thead><tr><th>function</th><th>called from</th>
<th>ops before</th><th>ops after</th><th>est. FLOPs removed</th><th>added</th></tr></thead>
<tbody>{functions}</tbody></table></div></section>
<section id="graph"><h2>Rewritten program{note}</h2><p class="legend">{legend}</p>
<div class="graph">{svg or to_svg(pic, title)}</div></section>
</body></html>
"""
