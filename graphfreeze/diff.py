"""What a rewrite changed: ops added and removed by type, and what the passes inserted."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import networkx as nx


@dataclass
class Diff:
    """Ops added and removed by type between the traced and the rewritten step.

    >>> d = rw.diff()                      # doctest: +SKIP
    >>> d.removed["Conv2DBackpropFilter"]  # doctest: +SKIP
    53
    """

    added: dict[str, int]
    removed: dict[str, int]
    inserted: list[tuple[str, str, str]]          # (node, op type, pass) created by the passes
    modified: list[str]                           # kept nodes whose definition changed
    functions: dict[str, str] = field(default_factory=dict)  # rewritten body -> its new name

    @property
    def n_added(self) -> int:
        return sum(self.added.values())

    @property
    def n_removed(self) -> int:
        return sum(self.removed.values())

    def to_dict(self) -> dict[str, Any]:
        return {"added": self.added, "removed": self.removed,
                "inserted": [{"node": n, "op": op, "pass": p} for n, op, p in self.inserted],
                "modified": self.modified, "functions": self.functions}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        def counts(d: dict[str, int]) -> str:
            items = sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))
            return ", ".join(f"{op} x{n}" for op, n in items) or "none"

        out = [f"ops removed: {self.n_removed:,} ({counts(self.removed)})",
               f"ops added:   {self.n_added:,} ({counts(self.added)})"]
        if self.inserted:
            by_pass = Counter(p for _, _, p in self.inserted)
            out.append("inserted by passes: " + ", ".join(f"{p} {n}" for p, n in sorted(by_pass.items())))
            out += [f"  {node}  [{op}]" for node, op, _ in self.inserted[:12]]
            if len(self.inserted) > 12:
                out.append(f"  ... {len(self.inserted) - 12} more")
        if self.modified:
            out.append(f"nodes modified in place: {len(self.modified)} "
                       f"({', '.join(self.modified[:4])}{', ...' if len(self.modified) > 4 else ''})")
        for old, new in sorted(self.functions.items()):
            out.append(f"function {old} rewritten as {new}")
        return "\n".join(out)


def diff_graphs(original: nx.MultiDiGraph, rewritten: nx.MultiDiGraph,
                functions: dict[str, str] | None = None) -> Diff:
    removed = Counter(op for n, op in original.nodes(data="op") if n not in rewritten)
    added = Counter(op for n, op in rewritten.nodes(data="op") if n not in original)
    inserted = [(n, d["op"], d["inserted"]) for n, d in rewritten.nodes(data=True) if d.get("inserted")]
    modified = [n for n, d in rewritten.nodes(data=True) if d.get("modified") and n in original]
    return Diff(dict(added), dict(removed), inserted, modified, dict(functions or {}))
