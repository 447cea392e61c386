"""The freeze report: what is frozen, by which rule, and what the rewrite removed."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .plan import Plan


@dataclass(frozen=True)
class VariableRow:
    """One frozen variable."""

    path: str
    shape: tuple[int, ...]
    frozen: int
    total: int
    rules: tuple[str, ...]
    state_pruned: bool

    @property
    def fully_frozen(self) -> bool:
        return self.frozen == self.total


@dataclass
class Report:
    """Per frozen variable: path, shape, frozen/total entries, matching rules; plus totals.

    >>> rw.report().frozen                      # doctest: +SKIP
    {'sequential/hidden1/kernel': 150000, 'sequential/hidden1/bias': 300}
    >>> print(rw.report())                      # doctest: +SKIP
    """

    function: str
    mode: str
    rows: list[VariableRow]
    pruned_state: dict[str, list[str]]
    ops_before: int
    ops_after: int
    trainable_total: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def frozen(self) -> dict[str, int]:
        """Variable path -> number of frozen entries."""
        return {r.path: r.frozen for r in self.rows}

    @property
    def parameters_frozen(self) -> int:
        return sum(r.frozen for r in self.rows)

    def __iter__(self) -> Iterator[VariableRow]:
        return iter(self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "function": self.function, "mode": self.mode,
            "variables": [dict(asdict(r), shape=list(r.shape), rules=list(r.rules))
                          for r in self.rows],
            "pruned_state": self.pruned_state,
            "totals": {"parameters_frozen": self.parameters_frozen,
                       "trainable_parameters": self.trainable_total,
                       "ops_before": self.ops_before, "ops_after": self.ops_after,
                       "ops_removed": self.ops_before - self.ops_after, **self.extra},
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        header = ("variable", "shape", "frozen/total", "state", "rule(s)")
        body = [(r.path, "x".join(map(str, r.shape)) or "scalar", f"{r.frozen}/{r.total}",
                 "pruned" if r.state_pruned else "-", "; ".join(r.rules)) for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
        out = [f"graphfreeze report for {self.function} ({self.mode} mode)", line(header),
               line(["-" * w for w in widths])]
        out += [line(row) for row in body] or ["(nothing frozen)"]
        out.append(f"frozen parameters: {self.parameters_frozen:,} of "
                   f"{self.parameters_frozen + self.trainable_total:,}; ops: {self.ops_before:,} -> "
                   f"{self.ops_after:,} ({self.ops_before - self.ops_after:,} removed)")
        if self.pruned_state:
            out.append(f"optimizer state pruned: {len(self.pruned_state)} variables "
                       f"({', '.join(sorted(self.pruned_state)[:4])}"
                       f"{', ...' if len(self.pruned_state) > 4 else ''})")
        return "\n".join(out)


def build_report(plan: Plan, ops_before: int, ops_after: int) -> Report:
    owners_pruned = Counter(o for owners in plan.notes.pruned_state.values() for o in owners)
    rows = [VariableRow(vf.variable.path, vf.variable.shape, vf.n_frozen, vf.frozen.size,
                        tuple(vf.rules), owners_pruned[vf.variable.path] > 0)
            for vf in plan.freezes]
    frozen_ids = {id(vf.variable) for vf in plan.freezes}
    counts = {id(vf.variable): vf.n_frozen for vf in plan.freezes}
    trainable_total = sum(v.size - counts.get(id(v), 0) for v in plan.capture.variables
                          if v.trainable and not v.optimizer_state
                          and (id(v) not in frozen_ids or counts[id(v)] < v.size))
    return Report(plan.capture.function_name, "training" if plan.training else "forward",
                  rows, dict(plan.notes.pruned_state), ops_before, ops_after, trainable_total)
