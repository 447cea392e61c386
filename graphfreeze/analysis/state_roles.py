"""Which variables a training step uses as optimizer state, read off what the graph does.

Globs and layer rules match model state only (weights, and statistics such as BatchNorm's
moving averages). Whether a captured variable is optimizer state must not depend on where
the Python object that owns it lives (a dict, a list, a trainer object), so besides the
Keras objects capture finds, the traced program decides. A variable without a gradient of
its own is optimizer state when

* it is written with values derived from gradients: slots, accumulators
  (`dependence.optimizer_state`);
* it is a step counter: its writes add a constant (`AssignAddVariableOp` of a `Const`, or
  `v.assign(v + c)` as Keras writes it), unconditionally or inside the optimizer's `If`
  branches, or reset it to a constant (a loss scale's growth counter);
* it is a scalar whose value reaches what is written to a variable with a gradient, or to
  gradient-derived state, without passing through a gradient: a learning rate, the
  iteration count of a bias correction, a loss scale;
* it is written, entry by entry, from a weight or its gradient (the ownership lane of the
  dependence analysis) and its value never reaches a gradient: an exponential moving
  average of weights. A copy that the loss reads (a target network, tied weights) is
  part of the model.

Everything else stays model state: a BatchNorm moving statistic is written from
reductions of activations, so it is none of the above.
"""

from __future__ import annotations

from collections import defaultdict

from .. import opkinds
from ..ir import IR, RETVAL, Tensor
from ..program import Program
from .dependence import Dependence, marked_placeholders
from .dependence import optimizer_state as gradient_derived_state

_VALUE_READS = opkinds.RESOURCE_READS - opkinds.SHAPE_QUERIES - {"VarIsInitializedOp"}


def optimizer_state(program: Program, dep: Dependence, sites: list, variables: dict) -> set[str]:
    """Placeholders of the variables the program uses as optimizer state (see module doc)."""
    marked = marked_placeholders(dep)
    slots = gradient_derived_state(dep, {}, variables)
    updated = marked | slots
    writes: dict[str, list[tuple[IR, str]]] = defaultdict(list)
    for ir, node in dep.writes:
        for target in dep.write_targets(ir, node):
            writes[target].append((ir, node))
    markers = {(id(ir), name) for ir, m, _ in sites for name in (m.values, m.indices) if name}
    found = set(slots)
    for p, var in variables.items():
        if p in marked or p in found or not var.model_state:
            continue
        if _counter(dep, p, writes.get(p, [])):
            found.add(p)
            continue
        scalar = var.shape == ()
        averages_weights = bool(dep.split(dep.resource_bits.get(p, 0))[1])
        if not (scalar or averages_weights):
            continue
        reaches_gradient, feeds = _value_flow(program, dep, p, markers)
        if (scalar and feeds & updated) or (averages_weights and not reaches_gradient):
            found.add(p)
    return found


def _counter(dep: Dependence, placeholder: str, writes: list[tuple[IR, str]]) -> bool:
    """Every write adds a constant to the variable or resets it to a constant, and one adds."""
    kinds = [_counter_write(dep, placeholder, ir, node) for ir, node in writes]
    return "add" in kinds and all(kinds)


def _counter_write(dep: Dependence, placeholder: str, ir: IR, node: str) -> str | None:
    op = ir.op(node)
    value = _through_casts(ir, ir.inputs(node)[1]) if len(ir.inputs(node)) > 1 else None
    if value is None or op not in ("AssignAddVariableOp", "AssignVariableOp"):
        return None
    if op == "AssignAddVariableOp":
        return "add" if ir.const_value(value) is not None else None
    if ir.const_value(value) is not None:
        return "reset"
    if ir.op(value[0]) not in ("AddV2", "Add"):  # Keras writes assign_add as v.assign(v + c)
        return None
    terms = [_through_casts(ir, t) for t in ir.inputs(value[0])]
    constants = [t for t in terms if ir.const_value(t) is not None]
    reads = [t for t in terms if ir.op(t[0]) == "ReadVariableOp"
             and placeholder in dep.owners(ir, ir.inputs(t[0])[0])]
    return "add" if len(constants) == 1 and len(reads) == 1 else None


def _through_casts(ir: IR, tensor: Tensor) -> Tensor:
    while ir.op(tensor[0]) in opkinds.CASTS:
        tensor = ir.inputs(tensor[0])[0]
    return tensor


def _value_flow(program: Program, dep: Dependence, placeholder: str,
                markers: set[tuple[int, str]]) -> tuple[bool, set[str]]:
    """Where the values read from a variable go, along data edges and across calls,
    stopping at gradient markers: (whether one reaches a marker, the placeholders of the
    variables written with them)."""
    reads = [(use.ir, (use.node, 0)) for use in program.resource_uses(program.main, (placeholder, 0))
             if use.ir.op(use.node) in _VALUE_READS]
    reaches_gradient, feeds = False, set[str]()
    visited = {(id(ir), t) for ir, t in reads}
    frontier = reads
    while frontier:
        following = []
        for ir, tensor in frontier:
            for dst, index in ir.consumers(tensor):
                if (id(ir), dst) in markers:
                    reaches_gradient = True
                elif opkinds.is_write(ir.op(dst)):
                    feeds |= dep.write_targets(ir, dst)
                else:
                    following.extend(_onwards(program, ir, dst, index))
        fresh = {(id(g), t): (g, t) for g, t in following if (id(g), t) not in visited}
        visited.update(fresh)
        frontier = list(fresh.values())
    return reaches_gradient, feeds


def _onwards(program: Program, ir: IR, node: str, index: int) -> list[tuple[IR, Tensor]]:
    """The tensors a value entering input `index` of `node` flows on to: the node's outputs,
    a called body's argument, or what a body's output becomes at its call sites."""
    op = ir.op(node)
    if op == RETVAL:
        return _returned(program, ir, ir.graph.nodes[node]["index"])
    callees = program.callees(ir, node)
    if callees:
        out = [(program.bodies[c.name], (program.bodies[c.name].args[index - c.offset], 0))
               for c in callees if index >= c.offset]
        return out + [(ir, (node, index))] if op in opkinds.LOOPS else out
    if op in opkinds.SHAPE_QUERIES:
        return []
    return [(ir, (node, k)) for k in range(max(len(ir.graph.nodes[node]["dtypes"]), 1))]


def _returned(program: Program, body: IR, k: int) -> list[tuple[IR, Tensor]]:
    """Where output k of a body goes: the calling op's output k, and for a loop body also
    its own argument k on the next iteration (a loop condition's output is a predicate)."""
    out: list[tuple[IR, Tensor]] = []
    for caller, call, callee in program.call_sites[body.name]:
        if caller.op(call) in opkinds.LOOPS:
            if callee.attr != "body":
                continue
            out.append((body, (body.args[k], 0)))
        out.append((caller, (call, k)))
    return out
