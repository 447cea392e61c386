"""Pictures of rewritten graphs: DOT text, collapsed by name scope when large."""

from __future__ import annotations

from collections import Counter, defaultdict

import networkx as nx

_STYLE = {
    "frozen": 'shape=box, style="filled,bold", fillcolor="#9ecae1", color="#08519c"',
    "inserted": 'shape=ellipse, style=filled, fillcolor="#fdae6b", color="#e6550d"',
    "removed": 'shape=box, style="dashed,filled", fillcolor="#eeeeee", color="#999999", '
               'fontcolor="#777777"',
    "plain": 'shape=box, style=filled, fillcolor="#ffffff"',
}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _scope(name: str, depth: int) -> str:
    parts = name.split("/")
    return "/".join(parts[:depth]) if len(parts) > depth else name


def to_dot(graph: nx.MultiDiGraph, *, original: nx.MultiDiGraph | None = None,
           frozen_placeholders: set[str] = frozenset(), max_nodes: int = 400,
           title: str = "graphfreeze") -> str:
    """DOT text for `graph`; removed nodes (present in `original` only) are drawn dashed.

    Graphs with more than `max_nodes` nodes are collapsed by name scope, deepening the
    scope only while the picture stays under the limit, so a ResNet50 step stays legible.
    """
    kinds: dict[str, str] = {}
    for n, data in graph.nodes(data=True):
        kinds[n] = ("frozen" if n in frozen_placeholders else
                    "inserted" if data.get("inserted") else "plain")
    edges = [(u, v) for u, v in graph.edges()]
    if original is not None:
        for n in original.nodes:
            if n not in graph:
                kinds[n] = "removed"
        edges += [(u, v) for u, v in original.edges() if u not in graph or v not in graph]

    depth, group = 0, {n: n for n in kinds}
    if len(kinds) > max_nodes:
        depth = 1
        while True:
            trial = {n: _scope(n, depth + 1) for n in kinds}
            if len(set(trial.values())) > max_nodes:
                break
            depth += 1
            if depth > 12:
                break
        group = {n: _scope(n, depth) for n in kinds}

    members: dict[str, Counter] = defaultdict(Counter)
    for n, g in group.items():
        members[g][kinds[n]] += 1
    lines = [f"digraph {_quote(title)} {{", "  rankdir=TB;",
             '  node [fontname="Helvetica", fontsize=10];']
    for g, count in sorted(members.items()):
        if count["removed"] == sum(count.values()):
            kind = "removed"
        elif count["frozen"]:
            kind = "frozen"
        elif count["inserted"]:
            kind = "inserted"
        else:
            kind = "plain"
        size = sum(count.values())
        label = g if size == 1 else f"{g}/ ({size} ops" + (
            f", {count['removed']} removed" if count["removed"] else "") + ")"
        lines.append(f"  {_quote(g)} [label={_quote(label)}, {_STYLE[kind]}];")
    seen = set()
    for u, v in edges:
        a, b = group.get(u, u), group.get(v, v)
        if a != b and (a, b) not in seen and a in members and b in members:
            seen.add((a, b))
            lines.append(f"  {_quote(a)} -> {_quote(b)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
