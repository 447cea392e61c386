"""The freeze report: what is frozen, by which rule, and what the rewrite removed."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .bodies import BodyChange, sum_counts
from .errors import FreezeError
from .plan import Plan
from .rules import VariableFreeze
from .scale import VariableScale
from .text import count_list, format_shape, human, text_table
from .variables import VariableInfo


@dataclass(frozen=True)
class VariableRow:
    """One frozen variable, or one whose updates a gf.Scale rule scales."""

    path: str
    shape: tuple[int, ...]
    frozen: int
    total: int
    rules: tuple[str, ...]
    state_pruned: bool
    factor: str = "-"  # gf.Scale factor of the trainable entries ('0.1', or 'min..max')
    trainable: bool = True  # a trainable variable (not BatchNorm statistics and the like)

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

    Op counts and FLOP estimates cover the whole program the rewrite edited: the traced
    step and every function body it calls (a `model.fit` step is a thin wrapper around
    Keras's `one_step_on_data` body; `If`/`While` branches and nested calls are bodies too).
    `bodies` holds the same numbers per function; `rw.report(detail="bodies")` prints them.

    >>> rw.report().frozen                      # doctest: +SKIP
    {'sequential/hidden1/kernel': 150000, 'sequential/hidden1/bias': 300}
    >>> print(rw.report())                      # doctest: +SKIP
    >>> print(rw.report(detail="bodies"))       # doctest: +SKIP
    """

    function: str
    mode: str
    rows: list[VariableRow]
    pruned_state: dict[str, list[str]]
    ops_before: int | None
    ops_after: int | None
    trainable_total: int
    # before, after, removed_backward, removed_optimizer, added, unknown (ops not estimated)
    flops: dict[str, int] = field(default_factory=dict)
    removed_ops: dict[str, int] = field(default_factory=dict)  # op type -> ops removed
    added_ops: dict[str, int] = field(default_factory=dict)    # op type -> ops added
    bodies: list[BodyChange] = field(default_factory=list)     # the step first, then its bodies
    detail: tuple[str, ...] = ("summary",)                     # what str() shows, see DETAILS
    opaque_ops: list[str] = field(default_factory=list)        # let through by allow_opaque=True
    # entries of the trainable variables the function reads (frozen or not); None: unknown
    parameters_total: int | None = None

    @property
    def frozen(self) -> dict[str, int]:
        """Variable path -> number of frozen entries."""
        return {r.path: r.frozen for r in self.rows}

    @property
    def parameters_frozen(self) -> int:
        """Frozen entries over all variables."""
        return sum(r.frozen for r in self.rows)

    def __iter__(self) -> Iterator[VariableRow]:
        return iter(self.rows)

    def records(self) -> Iterator[dict[str, Any]]:
        """One plain dict per frozen variable (pandas-free: `pd.DataFrame(report.records())`)."""
        for r in self.rows:
            yield dict(asdict(r), shape=list(r.shape), rules=list(r.rules))

    @property
    def ops_removed(self) -> int | None:
        """Ops before minus ops after the rewrite (None for a dry run, which traces nothing)."""
        if self.ops_before is None or self.ops_after is None:
            return None
        return self.ops_before - self.ops_after

    def with_detail(self, detail: str | Sequence[str]) -> Report:
        """The same report, printing the sections `detail` names (see `DETAILS`)."""
        return replace(self, detail=detail_names(detail))

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data."""
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
            "removed_ops": self.removed_ops, "added_ops": self.added_ops,
            "bodies": [b.to_dict() for b in self.bodies],
        }

    def to_json(self, **kwargs: Any) -> str:
        """`to_dict()` as JSON; keyword arguments go to `json.dumps`."""
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self) -> str:
        """One line, as PEFT's `print_trainable_parameters`: the entries that train (not
        frozen) out of every entry of the trainable variables the function reads
        (non-trainable state such as BatchNorm statistics is not a parameter).

        >>> rw.report().summary()                 # doctest: +SKIP
        'trainable params: 6,405 || all params: 416,613 || trainable%: 1.5376'
        """
        total = self.parameters_total
        if total is None:
            total = self.trainable_total + sum(r.frozen for r in self.rows if r.trainable)
        share = 100 * self.trainable_total / total if total else 0.0
        return (f"trainable params: {self.trainable_total:,} || all params: {total:,} || "
                f"trainable%: {share:.4f}")

    def summary_lines(self) -> list[str]:
        """The totals under the table."""
        line = f"frozen parameters: {self.parameters_frozen:,} of " \
               f"{self.parameters_frozen + self.trainable_total:,}"
        if self.ops_before is not None:
            line += f"; ops: {self.ops_before:,} -> {self.ops_after:,} ({self.ops_removed:,} removed)"
            if len(self.bodies) > 1:
                n = len(self.bodies) - 1
                line += f" in the step and the {n} function bod{'y' if n == 1 else 'ies'} it calls"
        out = [line]
        if self.removed_ops or self.added_ops:
            out.append(f"op types removed: {count_list(self.removed_ops, 6)}; added: "
                       f"{count_list(self.added_ops, 6)}")
        if self.flops:
            f = self.flops
            out.append(f"estimated FLOPs per step: {human(f['before'])} -> {human(f['after'])}; "
                       f"removed {human(f['removed_backward'])} backward, "
                       f"{human(f['removed_optimizer'])} optimizer; added by the passes "
                       f"{human(f['added'])}")
            if f["unknown"]:
                out.append(f"  ({f['unknown']:,} ops without static shapes are not estimated)")
        if self.pruned_state:
            names = sorted(self.pruned_state)
            out.append(f"optimizer state pruned: {len(names)} variables ({', '.join(names[:4])}"
                       f"{', ...' if len(names) > 4 else ''})")
        if self.opaque_ops:
            out.append(f"opaque ops allowed (allow_opaque=True): {'; '.join(self.opaque_ops)}")
        return out

    def by_layer(self) -> bool:
        """Whether `str()` shows one row per layer: by default when there are more than
        `COLLAPSE_AT` variable rows; `detail="variables"` or `"layers"` decides."""
        if "variables" in self.detail or "layers" in self.detail:
            return "layers" in self.detail
        return len(self.rows) > COLLAPSE_AT

    def __str__(self) -> str:
        scaled = any(r.factor != "-" for r in self.rows)
        by_layer = self.by_layer()
        rows = layer_rows(self.rows) if by_layer else self.rows
        header = ("layer" if by_layer else "variable", "variables" if by_layer else "shape",
                  "frozen/total", "state", *(("factor",) if scaled else ()), "rule(s)")
        body = [(r.path, format_shape(r.shape) if not by_layer else str(len(r.shape)),
                 f"{r.frozen}/{r.total}", r.state, *((r.factor,) if scaled else ()),
                 "; ".join(r.rules)) for r in rows]
        out = [f"graphfreeze report for {self.function} ({self.mode})", *text_table(header, body)]
        if not body:
            out.append("(nothing frozen)")
        elif by_layer:
            out.append(f"({len(self.rows):,} variables in {len(rows):,} layers; "
                       "report(detail='variables') for one row per variable)")
        out += self.summary_lines()
        for name in self.detail:
            out += DETAILS[name](self)
        return "\n".join(out)


def _bodies_section(report: Report) -> list[str]:
    """One row per function: the step, then each body it calls, in call order."""
    if not report.bodies:
        return ["(no per-function numbers: nothing was traced)"]
    header = ("function", "called from", "ops before", "ops after", "est. FLOPs before", "after",
              "removed", "added")
    rows = [(f"{b.name} (the step)" if b.is_step else b.name, b.parent or "-",
             f"{b.ops_before:,}", f"{b.ops_after:,}", human(b.flops_before), human(b.flops_after),
             human(sum(b.flops_removed.values())), human(sum(b.flops_added.values())))
            for b in report.bodies]
    return ["", "per function (each body counted once, also when a loop runs it many times):",
            *text_table(header, rows)]


#: What `str(report)` can show besides the variable table and the totals, by the name
#: `rw.report(detail=...)` takes; a new view is one more entry here.
DETAILS: dict[str, Callable[[Report], list[str]]] = {
    "summary": lambda report: [],
    "bodies": _bodies_section,
    "variables": lambda report: [],  # the table: one row per variable (see Report.by_layer)
    "layers": lambda report: [],     # the table: one row per layer
}

#: Reports with more variable rows than this print one row per layer by default.
COLLAPSE_AT = 30


def layer_rows(rows: Sequence[VariableRow]) -> list[VariableRow]:
    """The rows merged by layer (the path without its last component); `shape` holds one
    entry per variable (the table prints their count), rules and factors are merged."""
    groups: dict[str, list[VariableRow]] = {}
    for r in rows:
        groups.setdefault(r.path.rsplit("/", 1)[0] if "/" in r.path else r.path, []).append(r)
    out = []
    for layer, members in groups.items():
        factors = list(dict.fromkeys(m.factor for m in members))
        out.append(VariableRow(
            layer, tuple(m.total for m in members), sum(m.frozen for m in members),
            sum(m.total for m in members), tuple(dict.fromkeys(x for m in members for x in m.rules)),
            any(m.state_pruned for m in members),  # statistics have no optimizer state
            "/".join(factors) if len(factors) > 1 else factors[0]))
    return out


def detail_names(detail: str | Sequence[str]) -> tuple[str, ...]:
    """`detail` (one name or several) as a tuple of names in `DETAILS`; FreezeError otherwise."""
    names = (detail,) if isinstance(detail, str) else tuple(detail)
    unknown = [d for d in names if d not in DETAILS]
    if unknown:
        raise FreezeError(f"report(detail={detail!r}): unknown detail {unknown[0]!r}; choose from "
                          f"{', '.join(repr(k) for k in DETAILS)}, or a list of them.")
    return names


def program_flops(changes: Sequence[BodyChange]) -> dict[str, int]:
    """FLOP totals over the step and its bodies (each body counted once: a While body's
    work as one iteration, both branches of an If)."""
    removed = sum(sum(c.flops_removed.values()) for c in changes)
    backward = sum(c.flops_removed_backward for c in changes)
    return {"before": sum(c.flops_before for c in changes),
            "after": sum(c.flops_after for c in changes),
            "removed_backward": backward, "removed_optimizer": removed - backward,
            "added": sum(sum(c.flops_added.values()) for c in changes),
            "unknown": sum(c.unknown_flops for c in changes)}


def variable_rows(freezes: Iterable[VariableFreeze], pruned_state: dict[str, list[str]],
                  scales: Iterable[VariableScale] = ()) -> list[VariableRow]:
    """One row per frozen or scaled variable: the frozen ones first, in rule order."""
    owners_pruned = Counter(o for owners in pruned_state.values() for o in owners)
    factor = {id(vs.variable): vs.describe() for vs in scales}
    frozen = {id(vf.variable) for vf in freezes}
    rows = [(vf.variable, VariableRow(
        vf.variable.path, vf.variable.shape, vf.n_frozen, vf.frozen.size, tuple(vf.rules),
        owners_pruned[vf.variable.path] > 0, factor.get(id(vf.variable), "-"),
        vf.variable.trainable)) for vf in freezes]
    rows += [(vs.variable, VariableRow(vs.variable.path, vs.variable.shape, 0, vs.factor.size,
                                       tuple(vs.rules), False, factor[id(vs.variable)]))
             for vs in scales if id(vs.variable) not in frozen]
    # A distributed variable is one row, not one per replica component.
    return [row for var, row in rows if not var.replica]


def all_parameters(variables: Iterable[VariableInfo]) -> int:
    """Entries of trainable model variables, frozen or not."""
    return sum(v.size for v in variables if v.trainable and v.model_state and not v.replica)


def trainable_parameters(variables: Iterable[VariableInfo], freezes: Iterable[VariableFreeze]) -> int:
    """Entries of trainable model variables that are not frozen."""
    frozen = {id(vf.variable): vf.n_frozen for vf in freezes}
    return sum(v.size - frozen.get(id(v), 0) for v in variables
               if v.trainable and v.model_state and not v.replica)


def build_report(plan: Plan, changes: Sequence[BodyChange],
                 detail: str | Sequence[str] = "summary") -> Report:
    """The report of a rewrite; `changes` has one entry per function, the step first."""
    return Report(plan.capture.function_name, "training step" if plan.training else "forward function",
                  variable_rows(plan.freezes, plan.notes.pruned_state, plan.scales),
                  dict(plan.notes.pruned_state),
                  sum(c.ops_before for c in changes), sum(c.ops_after for c in changes),
                  trainable_parameters(plan.capture.variables, plan.freezes),
                  program_flops(changes), sum_counts(c.removed for c in changes),
                  sum_counts(c.added for c in changes), list(changes), detail_names(detail),
                  opaque_ops=list(plan.notes.opaque_ops),
                  parameters_total=all_parameters(plan.capture.variables))
