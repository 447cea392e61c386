"""The freeze report: what is frozen, by which rule, and what the rewrite removed."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import networkx as nx

from .flops import flops_of
from .plan import Plan
from .text import format_shape, text_table


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

    @property
    def state(self) -> str:
        """What happened to the variable's optimizer state, for tables."""
        return "pruned" if self.state_pruned else "-"


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
    ops_before: int | None
    ops_after: int | None
    trainable_total: int
    flops: dict[str, int] = field(default_factory=dict)  # removed_backward, removed_optimizer, added
    opaque_ops: list[str] = field(default_factory=list)  # let through by allow_opaque=True

    @property
    def frozen(self) -> dict[str, int]:
        """Variable path -> number of frozen entries."""
        return {r.path: r.frozen for r in self.rows}

    @property
    def parameters_frozen(self) -> int:
        return sum(r.frozen for r in self.rows)

    def __iter__(self) -> Iterator[VariableRow]:
        return iter(self.rows)

    def records(self) -> Iterator[dict[str, Any]]:
        """One plain dict per frozen variable (pandas-free: `pd.DataFrame(report.records())`)."""
        for r in self.rows:
            yield dict(asdict(r), shape=list(r.shape), rules=list(r.rules))

    @property
    def ops_removed(self) -> int | None:
        return None if self.ops_before is None else self.ops_before - self.ops_after

    def to_dict(self) -> dict[str, Any]:
        return {
            "function": self.function, "mode": self.mode,
            "variables": list(self.records()),
            "pruned_state": self.pruned_state,
            "opaque_ops": self.opaque_ops,
            "totals": {"parameters_frozen": self.parameters_frozen,
                       "trainable_parameters": self.trainable_total,
                       "ops_before": self.ops_before, "ops_after": self.ops_after,
                       "ops_removed": self.ops_removed,
                       **{f"flops_{k}": v for k, v in self.flops.items()}},
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary_lines(self) -> list[str]:
        """The totals under the table."""
        line = f"frozen parameters: {self.parameters_frozen:,} of " \
               f"{self.parameters_frozen + self.trainable_total:,}"
        if self.ops_before is not None:
            line += f"; ops: {self.ops_before:,} -> {self.ops_after:,} ({self.ops_removed:,} removed)"
        out = [line]
        if self.flops:
            f = self.flops
            out.append(f"estimated FLOPs per step removed: {_human(f['removed_backward'])} backward, "
                       f"{_human(f['removed_optimizer'])} optimizer; added by masks: "
                       f"{_human(f['added'])}")
        if self.pruned_state:
            names = sorted(self.pruned_state)
            out.append(f"optimizer state pruned: {len(names)} variables ({', '.join(names[:4])}"
                       f"{', ...' if len(names) > 4 else ''})")
        if self.opaque_ops:
            out.append(f"opaque ops allowed (allow_opaque=True): {'; '.join(self.opaque_ops)}")
        return out

    def __str__(self) -> str:
        header = ("variable", "shape", "frozen/total", "state", "rule(s)")
        body = [(r.path, format_shape(r.shape), f"{r.frozen}/{r.total}", r.state,
                 "; ".join(r.rules)) for r in self.rows]
        out = [f"graphfreeze report for {self.function} ({self.mode})", *text_table(header, body)]
        if not body:
            out.append("(nothing frozen)")
        return "\n".join(out + self.summary_lines())


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(n)


def removed_flops(original: nx.MultiDiGraph, rewritten: nx.MultiDiGraph) -> dict[str, int]:
    """Estimated FLOPs per step: removed backward work (the tape's gradient ops), removed
    optimizer work (everything else removed), and work added by inserted ops."""
    removed = [n for n in original if n not in rewritten]
    backward = [n for n in removed if n.startswith("gradient_tape/")]
    optimizer = [n for n in removed if not n.startswith("gradient_tape/")]
    added = [n for n, d in rewritten.nodes(data=True) if d.get("inserted")]
    return {"removed_backward": flops_of(original, backward)[0],
            "removed_optimizer": flops_of(original, optimizer)[0],
            "added": flops_of(rewritten, added)[0]}


def variable_rows(freezes, pruned_state: dict[str, list[str]]) -> list[VariableRow]:
    owners_pruned = Counter(o for owners in pruned_state.values() for o in owners)
    # A distributed variable is one row, not one per replica component.
    return [VariableRow(vf.variable.path, vf.variable.shape, vf.n_frozen, vf.frozen.size,
                        tuple(vf.rules), owners_pruned[vf.variable.path] > 0) for vf in freezes
            if not vf.variable.replica]


def trainable_parameters(variables, freezes) -> int:
    """Entries of trainable model variables that are not frozen."""
    frozen = {id(vf.variable): vf.n_frozen for vf in freezes}
    return sum(v.size - frozen.get(id(v), 0) for v in variables
               if v.trainable and v.model_state and not v.replica)


def build_report(plan: Plan, ops_before: int | None, ops_after: int | None,
                 flops: dict[str, int] | None = None) -> Report:
    return Report(plan.capture.function_name, "training step" if plan.training else "forward function",
                  variable_rows(plan.freezes, plan.notes.pruned_state), dict(plan.notes.pruned_state),
                  ops_before, ops_after, trainable_parameters(plan.capture.variables, plan.freezes),
                  flops or {}, opaque_ops=list(plan.notes.opaque_ops))
