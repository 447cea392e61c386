"""The whole program before and after a rewrite, function body by function body.

A step traced from `model.fit` is a thin wrapper (placeholders and one
StatefulPartitionedCall) around Keras's `one_step_on_data` body, and that body's `If`/`While`
branches and nested calls are bodies of their own. Reports, diffs and pictures describe all
of them: `program_bodies` pairs every body of the traced program with its rewritten version
(by the FunctionDef name it was traced under), places it in the call tree, and
`compare` counts what changed in one body: ops, op types and estimated FLOPs.

What counts as an op of a body is what its FunctionDef holds (`node_def`): the argument
placeholders and the synthetic `_Retval` nodes the IR adds are not ops. For the step itself
every node of its GraphDef counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from . import opkinds
from .flops import op_flops
from .ir import IR, RETVAL
from .program import Program


@dataclass
class Body:
    """One function of the program (the step, or a library function body), before and after.

    `original` is None for a body that did not exist before the rewrite, `rewritten` for one
    the rewrite left uncalled (every op of it counts as removed).
    """

    name: str                      # FunctionDef name as traced; the function's name for the step
    path: str                      # "" for the step, "<caller's path>/<name>" for a body
    parent: str | None             # the calling body's name; None for the step
    call_node: str | None          # the op in the caller that calls it (the first, if several)
    original: IR | None
    rewritten: IR | None
    emitted_name: str | None = None   # the fresh name the rewritten body was emitted under
    frozen: frozenset[str] = frozenset()  # nodes standing for frozen variables
    backward: bool = False         # runs as part of the backward pass (a gradient's body)
    traced_shapes: dict[str, list] = field(default_factory=dict)  # node -> output shapes

    @property
    def is_step(self) -> bool:
        return self.parent is None

    def _graph(self, ir: IR | None) -> nx.MultiDiGraph:
        return ir.graph if ir is not None else nx.MultiDiGraph()

    @property
    def original_graph(self) -> nx.MultiDiGraph:
        return self._graph(self.original)

    @property
    def rewritten_graph(self) -> nx.MultiDiGraph:
        return self._graph(self.rewritten)

    def _not_ops(self) -> set[str]:
        if self.is_step:
            return set()
        return {*(self.original.args if self.original else ()),
                *(self.rewritten.args if self.rewritten else ())}

    def ops(self, graph: nx.MultiDiGraph) -> list[str]:
        """The nodes of `graph` (this body's original or rewritten graph) that are ops."""
        skip = self._not_ops()
        return [n for n, op in graph.nodes(data="op") if op != RETVAL and n not in skip]


@dataclass
class BodyChange:
    """What the rewrite changed in one body (or the step): ops and estimated FLOPs."""

    name: str
    parent: str | None
    emitted_name: str | None
    ops_before: int
    ops_after: int
    removed: dict[str, int]        # op type -> ops removed
    added: dict[str, int]          # op type -> ops added
    flops_before: int
    flops_after: int
    flops_removed: dict[str, int]  # op type -> estimated FLOPs removed
    flops_added: dict[str, int]    # op type -> estimated FLOPs added
    flops_removed_backward: int    # the part of the removed FLOPs that was backward work
    unknown_flops: int             # ops whose FLOPs have no estimate (shapes not static)
    inserted: list[tuple[str, str, str]] = field(default_factory=list)  # (node, op, pass)
    modified: list[str] = field(default_factory=list)  # kept nodes whose definition changed
    called: bool = True            # False: the rewritten program no longer calls it

    @property
    def ops_removed(self) -> int:
        return self.ops_before - self.ops_after

    @property
    def is_step(self) -> bool:
        return self.parent is None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "parent": self.parent, "emitted_name": self.emitted_name,
                "ops_before": self.ops_before, "ops_after": self.ops_after,
                "removed": self.removed, "added": self.added,
                "flops_before": self.flops_before, "flops_after": self.flops_after,
                "flops_removed": self.flops_removed, "flops_added": self.flops_added,
                "flops_removed_backward": self.flops_removed_backward,
                "unknown_flops": self.unknown_flops, "called": self.called}


# ----------------------------------------------------------------------------- pairing


def called_functions(ir: IR, node: str, known: set[str]) -> list[str]:
    """Names of the library functions `node` calls (`known`: names a direct call may use)."""
    op = ir.op(node)
    if op in opkinds.CALL_TARGETS:
        names = []
        for attr in opkinds.CALL_TARGETS[op][0]:
            value = ir.attr(node, attr)
            names += [value.func.name] if value.HasField("func") else [f.name for f in value.list.func]
        return names
    return [op] if op in known else []


def _call_tree(program: Program, names: dict[str, str]) -> dict[str, tuple[str | None, str]]:
    """Reachable body -> (calling body, or None for the step; the call node), breadth first.
    `names` maps the names call ops use (fresh names after emission) to the traced ones."""
    known = set(names)
    tree: dict[str, tuple[str | None, str]] = {}
    pending: list[tuple[str | None, IR]] = [(None, program.main)]
    while pending:
        caller, ir = pending.pop(0)
        for node in sorted(ir.graph, key=lambda n: ir.graph.nodes[n]["order"]):
            for fn in called_functions(ir, node, known):
                body = names.get(fn)
                if body is not None and body not in tree and body in program.bodies:
                    tree[body] = (caller, node)
                    pending.append((body, program.bodies[body]))
    return tree


def _frozen_args(program: Program, body: IR, frozen: set[str]) -> frozenset[str]:
    """The body's resource arguments that stand for a frozen variable of the step."""
    return frozenset(a for a in body.args
                     if body.is_resource((a, 0)) and program.resource_owners(body, (a, 0)) & frozen)


def program_bodies(original: Program, rewritten: Program, renamed: dict[str, str],
                   frozen: set[str], step_name: str,
                   traced_shapes: dict[str, dict[str, list]] | None = None) -> list[Body]:
    """The step and every body reachable before or after the rewrite, in call-tree order.

    `original` must be an unedited load of the traced program, `rewritten` the program the
    passes edited and emission retargeted (`renamed`: traced name -> emitted name), `frozen`
    the step's placeholders of frozen variables."""
    traced_shapes = traced_shapes or {}
    identity = {name: name for name in original.fdefs}
    before = _call_tree(original, identity)
    after = _call_tree(rewritten, {**identity, **{new: old for old, new in renamed.items()}})
    bodies = [Body(step_name, "", None, None, original.main, rewritten.main, frozen=frozenset(frozen),
                   traced_shapes=traced_shapes.get("", {}))]
    by_name: dict[str | None, Body] = {}
    for name in [*before, *(n for n in after if n not in before)]:
        parent, call = before.get(name) or after[name]
        parent_body = by_name.get(parent, bodies[0])
        old = original.bodies.get(name) if name in before else None
        body = Body(
            name, f"{parent_body.path}/{name}".lstrip("/"), parent_body.name, call, old,
            rewritten.bodies[name] if name in after else None, renamed.get(name),
            _frozen_args(original, old, frozen) if old is not None else frozenset(),
            parent_body.backward or call.split("/", 1)[0] in opkinds.BACKWARD_SCOPES,
            traced_shapes.get(name, {}))
        by_name[name] = body
        bodies.append(body)
    return bodies


def traced_shapes(concrete_function: Any) -> dict[str, dict[str, list]]:
    """Output shapes of every op as traced: "" -> the step's, body name -> the body's.

    A body loaded back from its FunctionDef no longer knows the shapes of the variables its
    resource arguments stand for, so its matrix products have unknown shapes; the graphs
    TensorFlow traced the bodies from still know them. Empty where TensorFlow keeps no
    traced graph (e.g. functions loaded from a SavedModel)."""
    def shapes(graph: Any) -> dict[str, list]:
        return {op.name: [None if t.shape.rank is None else tuple(t.shape.as_list())
                          for t in op.outputs] for op in graph.get_operations()}

    out = {"": shapes(concrete_function.graph)}
    pending, seen = [concrete_function.graph], set()
    while pending:
        graph = pending.pop()
        if id(graph) in seen:
            continue
        seen.add(id(graph))
        for name, fn in getattr(graph, "_functions", {}).items():  # TF keeps no public view
            body = getattr(fn, "graph", None)
            if body is not None and name not in out:
                out[name] = shapes(body)
                pending.append(body)
    return out


# ----------------------------------------------------------------------------- comparing


def _shape_source(body: Body, graph: nx.MultiDiGraph) -> dict[str, list]:
    """Traced shapes for the nodes of `graph` that are as traced (not inserted or edited,
    same outputs), to fill in what the IR of a body does not know."""
    out = {}
    for n, shapes in body.traced_shapes.items():
        data = graph.nodes.get(n)
        if data is not None and not data.get("inserted") and not data.get("modified") \
                and len(data.get("dtypes") or ()) == len(shapes):
            out[n] = shapes
    return out


def _flops(body: Body, graph: nx.MultiDiGraph, nodes: list[str], calls: set[str]
           ) -> Iterator[tuple[str, int | None]]:
    """(op type, estimated FLOPs or None) per node; a call's work is counted in its body."""
    traced = _shape_source(body, graph)
    for n in nodes:
        yield graph.nodes[n]["op"], 0 if n in calls else op_flops(graph, n, traced)


def _calls(ir: IR | None, known: set[str]) -> set[str]:
    if ir is None:
        return set()
    return {n for n in ir.graph if called_functions(ir, n, known)}


def compare(body: Body, known_functions: set[str]) -> BodyChange:
    """Ops and estimated FLOPs of one body before and after, and what changed."""
    old, new = body.original_graph, body.rewritten_graph
    before, after = body.ops(old), body.ops(new)
    # a kept node whose op changed (slice_updates turns an Assign into a scatter in place)
    # counts as one op of the old type removed and one of the new type added
    retyped = {n for n in before if n in new and new.nodes[n]["op"] != old.nodes[n]["op"]}
    removed = [n for n in before if n not in new or n in retyped]
    added = [n for n in after if n not in old or n in retyped]
    old_calls, new_calls = _calls(body.original, known_functions), _calls(body.rewritten, known_functions)
    flops_before = flops_after = unknown = backward = 0
    flops_removed: Counter = Counter()
    flops_added: Counter = Counter()
    gone = set(removed)
    for n, (op, f) in zip(before, _flops(body, old, before, old_calls)):
        if f is None:
            unknown += 1
            continue
        flops_before += f
        if n in gone:
            flops_removed[op] += f
            if body.backward or n.split("/", 1)[0] in opkinds.BACKWARD_SCOPES:
                backward += f
    new_ones = set(added)
    for n, (op, f) in zip(after, _flops(body, new, after, new_calls)):
        if f is None:
            unknown += n in new_ones  # a kept op is counted once, before
            continue
        flops_after += f
        if n in new_ones:
            flops_added[op] += f
    prefix = f"{body.path}/" if body.path else ""
    return BodyChange(
        body.name, body.parent, body.emitted_name, len(before), len(after),
        dict(Counter(old.nodes[n]["op"] for n in removed)),
        dict(Counter(new.nodes[n]["op"] for n in added)),
        flops_before, flops_after, {k: v for k, v in flops_removed.items() if v},
        {k: v for k, v in flops_added.items() if v}, backward, unknown,
        [(prefix + n, d["op"], d["inserted"]) for n, d in new.nodes(data=True) if d.get("inserted")],
        [prefix + n for n, d in new.nodes(data=True) if d.get("modified") and n in old],
        body.rewritten is not None)


def compare_all(bodies: list[Body], known_functions: set[str]) -> list[BodyChange]:
    return [compare(b, known_functions) for b in bodies]


def sum_counts(dicts: Any) -> dict[str, int]:
    """Add up per-op-type dicts."""
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return dict(total)
