"""What a picture holds: boxes (a scope or a single op) with counts of what they hold,
edges between them, and the function bodies drawn as regions (clusters) inside their
caller's. Every drawing (DOT, the built-in SVG, HTML) starts from a `Picture`."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..bodies import Body
from ..ir import RETVAL
from .scopes import collapse

KINDS = ("frozen", "inserted", "removed", "plain")
# Constants, control-only groupings and a body's synthetic return nodes add clutter, not
# information, to a picture.
HIDDEN_OPS = frozenset({"Const", "NoOp", RETVAL})
FILL = {"frozen": "#9ecae1", "inserted": "#fdae6b", "removed": "#eeeeee", "plain": "#ffffff"}
STROKE = {"frozen": "#08519c", "inserted": "#e6550d", "removed": "#999999", "plain": "#555555"}


@dataclass
class Box:
    """One node of the collapsed picture: a scope (or a single op) and what it holds."""

    key: str
    members: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    order: tuple[int, int] = (0, 0)
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


def _members(bodies: Sequence[Body]) -> tuple[dict[str, str], dict[str, tuple[int, int]], dict[str, str],
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
                order[prefix + n], op[prefix + n] = d["order"], d["op"]
        for n, d in old.nodes(data=True):
            if n not in new and d["op"] not in HIDDEN_OPS:
                kind[prefix + n], order[prefix + n], op[prefix + n] = "removed", d["order"], d["op"]
        edges += [(prefix + u, prefix + v) for u, v in new.edges()]
        edges += [(prefix + u, prefix + v) for u, v in old.edges() if u not in new or v not in new]
    return kind, order, op, edges


def picture(bodies: Sequence[Body], budget: int = 40) -> Picture:
    """Group the whole program (each body's rewritten graph plus what the rewrite removed
    from it) into at most about `budget` boxes, each body inside its caller's region."""
    kind, order, op, edges = _members(bodies)
    roots = {b.path: b for b in bodies if b.path}
    group = collapse(sorted(kind), budget, set(roots), op)
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
