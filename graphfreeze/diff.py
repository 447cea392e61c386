"""What a rewrite changed: ops and estimated FLOPs added and removed by type, over the step
and every function body it calls, and what the passes inserted."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .bodies import BodyChange, sum_counts
from .text import count_list, human


@dataclass
class Diff:
    """Ops added and removed by type between the traced and the rewritten program: the
    step and every function body it calls (`bodies` has the same per function).

    Nodes inside a body are named `<body path>/<node>`, the body path being the chain of
    function names from the step down (e.g. `__inference_one_step_on_data_1112/...`).

    >>> d = rw.diff()                      # doctest: +SKIP
    >>> d.removed["Conv2DBackpropFilter"]  # doctest: +SKIP
    53
    >>> d.flops_removed["MatMul"]          # doctest: +SKIP
    1179648
    """

    added: dict[str, int]
    removed: dict[str, int]
    inserted: list[tuple[str, str, str]]          # (node, op type, pass) created by the passes
    modified: list[str]                           # kept nodes whose definition changed
    functions: dict[str, str] = field(default_factory=dict)  # rewritten body -> its new name
    flops_removed: dict[str, int] = field(default_factory=dict)  # op type -> estimated FLOPs
    flops_added: dict[str, int] = field(default_factory=dict)
    bodies: list[BodyChange] = field(default_factory=list)  # per function, the step first

    @property
    def n_added(self) -> int:
        """Ops added, over all types."""
        return sum(self.added.values())

    @property
    def n_removed(self) -> int:
        """Ops removed, over all types."""
        return sum(self.removed.values())

    def to_dict(self) -> dict[str, Any]:
        """The diff as plain JSON-ready data."""
        return {"added": self.added, "removed": self.removed,
                "inserted": [{"node": n, "op": op, "pass": p} for n, op, p in self.inserted],
                "modified": self.modified, "functions": self.functions,
                "flops_removed": self.flops_removed, "flops_added": self.flops_added,
                "bodies": [b.to_dict() for b in self.bodies]}

    def to_json(self, **kwargs: Any) -> str:
        """`to_dict()` as JSON; keyword arguments go to `json.dumps`."""
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        def flops(d: dict[str, int]) -> str:
            items = sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:6]
            return ", ".join(f"{op} {human(n)}" for op, n in items) or "none"

        out = [f"ops removed: {self.n_removed:,} ({count_list(self.removed)})",
               f"ops added:   {self.n_added:,} ({count_list(self.added)})",
               f"estimated FLOPs removed: {human(sum(self.flops_removed.values()))} "
               f"({flops(self.flops_removed)}); added: {human(sum(self.flops_added.values()))}"]
        if self.inserted:
            by_pass = Counter(p for _, _, p in self.inserted)
            out.append("inserted by passes: " + ", ".join(f"{p} {n}" for p, n in sorted(by_pass.items())))
            out += [f"  {node}  [{op}]" for node, op, _ in self.inserted[:12]]
            if len(self.inserted) > 12:
                out.append(f"  ... {len(self.inserted) - 12} more")
        if self.modified:
            out.append(f"nodes modified in place: {len(self.modified)} "
                       f"({', '.join(self.modified[:4])}{', ...' if len(self.modified) > 4 else ''})")
        for b in self.bodies:
            if b.is_step:
                continue
            fate = "no longer called" if not b.called else \
                f"rewritten as {b.emitted_name}" if b.emitted_name else "unchanged"
            out.append(f"function {b.name} (called from {b.parent}): {fate}; ops {b.ops_before:,} -> "
                       f"{b.ops_after:,}")
        return "\n".join(out)


def diff_program(changes: Sequence[BodyChange], functions: dict[str, str] | None = None) -> Diff:
    """The whole-program diff from per-function changes (the step first)."""
    return Diff(sum_counts(c.added for c in changes), sum_counts(c.removed for c in changes),
                [x for c in changes for x in c.inserted], [x for c in changes for x in c.modified],
                dict(functions or {}), sum_counts(c.flops_removed for c in changes),
                sum_counts(c.flops_added for c in changes), list(changes))
