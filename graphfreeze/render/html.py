"""Drawings that need nothing installed: a self-contained SVG layout of a picture, and the
one-file HTML report (variables, the diff, per-function counts and the picture)."""

from __future__ import annotations

import html
from collections import defaultdict
from typing import TYPE_CHECKING

import networkx as nx

from ..text import format_shape, human
from .picture import FILL, KINDS, STROKE, Picture

if TYPE_CHECKING:  # the report and diff modules need nothing from here at run time
    from ..diff import Diff
    from ..report import Report


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
