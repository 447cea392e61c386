"""Where the frozen prefix of a rewritten training step ends (an analysis, not a rewrite).

A tensor is *cacheable* when its value for an example depends only on that example's
inputs and on frozen state: it is computed from the step's inputs, constants and reads of
fully frozen variables (which the rewritten step never writes) by deterministic,
stateless ops that do not mix examples. The *frontier* is the set of cacheable tensors
that depend on the inputs and are used by the rest of the step; computing them once per
batch and feeding them back in is exact.

What stops caching is recorded with the op that stops it, in the order it occurs:

* a random op (Dropout, augmentation): its output changes from epoch to epoch;
* a reduction over the batch axis (BatchNorm in training mode): an example's activation
  depends on the other examples in its batch;
* a read of a variable that is not fully frozen (a trainable variable below the
  frontier), or any other stateful op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import opkinds
from ..ir import IR, RETVAL, Tensor
from ..program import Program

CONST, DATA, BLOCKED = 0, 1, 2


@dataclass
class Stopper:
    """An op at which caching stops, and why."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}"


@dataclass
class Frontier:
    tensors: list[Tensor]                       # what the suffix needs from the prefix
    prefix: set[str]                            # nodes computed before the frontier
    stoppers: list[Stopper] = field(default_factory=list)
    frozen_reads_after: list[str] = field(default_factory=list)  # frozen work left behind


def _reduces_batch(ir: IR, node: str, inputs: list[Tensor]) -> bool:
    if ir.op(node) not in opkinds.REDUCTIONS or len(inputs) < 2:
        return False
    value = ir.const_value(inputs[1])
    if value is None:
        return True  # unknown axes: assume the worst
    axes = {int(a) for a in np.ravel(value)}
    shape = ir.shape(inputs[0])
    return 0 in ({a % len(shape) for a in axes} if shape else axes)


def _body_is_pure(program: Program, ir: IR, node: str, seen: set[str] | None = None) -> bool:
    """Whether a call op's bodies only compute and read (no write, no randomness)."""
    seen = seen if seen is not None else set()
    for callee in program.callees(ir, node):
        if callee.name in seen:
            continue
        seen.add(callee.name)
        body = program.bodies[callee.name]
        for n, op in body.graph.nodes(data="op"):
            if opkinds.is_write(op) or op in opkinds.RANDOM:
                return False
            if program.callees(body, n) and not _body_is_pure(program, body, n, seen):
                return False
            if opkinds.has_side_effect(op) and not program.callees(body, n) and op != RETVAL:
                return False
    return True


def find_frontier(program: Program, inputs: list[str], frozen: dict[str, str],
                  variables: dict[str, str], outputs: list[Tensor]) -> Frontier:
    """Classify the main graph of a rewritten step.

    `inputs` are the step's input placeholders; `frozen` maps the placeholders of fully
    frozen variables to their paths, `variables` all variable placeholders to theirs.
    """
    ir = program.main
    status: dict[str, int] = {}
    origin: dict[str, frozenset[str]] = {}  # frozen variables a constant-status tensor reads
    cause: dict[str, Stopper] = {}          # why a blocked node is blocked, at the root
    left: set[str] = set()
    boundaries: list[Stopper] = []
    for node in ir.topological_order():
        op = ir.op(node)
        ins = ir.inputs(node)
        if op == "Placeholder":
            status[node] = DATA if node in inputs else CONST
            continue
        if not ins:
            if opkinds.has_side_effect(op) or op in opkinds.RANDOM:
                status[node], cause[node] = BLOCKED, Stopper(node, op, "a stateful or random op")
            else:
                status[node] = CONST
            continue
        kinds = [status.get(s, BLOCKED) for s, _ in ins]
        worst = max(kinds)
        reads = frozenset().union(*(origin.get(s, frozenset()) for s, _ in ins))
        if op in opkinds.RESOURCE_READS and ins[0][0] in frozen:
            status[node] = CONST if worst < BLOCKED else BLOCKED
            origin[node] = frozenset([frozen[ins[0][0]]])
            continue
        reason = _intrinsic_reason(program, ir, node, op, ins, worst, variables)
        if reason is None and worst < BLOCKED:
            status[node] = worst
            if worst == CONST:
                origin[node] = reads
            continue
        status[node] = BLOCKED
        if reason is not None:
            cause[node] = Stopper(node, op, reason)
        else:
            cause[node] = next(cause[s] for s, _ in ins if status.get(s) == BLOCKED and s in cause)
        left |= reads  # frozen weights used on data that is not cached
        if DATA in kinds:
            root = cause[node]
            boundaries.append(Stopper(node, op, root.reason if root.node == node
                                      else f"{root.reason} (at {root.node})"))

    needed = {t[0] for t in outputs}
    frontier: list[Tensor] = []
    for node in ir.topological_order():
        if status[node] == BLOCKED or node in needed:
            for t in ir.inputs(node):
                if status.get(t[0]) == DATA and t not in frontier:
                    frontier.append(t)
    for t in outputs:
        if status.get(t[0]) == DATA and t not in frontier:
            frontier.append(t)
    prefix = {n for n, st in status.items() if st == DATA}
    return Frontier(frontier, prefix, boundaries, sorted(left))


def _intrinsic_reason(program: Program, ir: IR, node: str, op: str, ins: list[Tensor], worst: int,
                      variables: dict[str, str]) -> str | None:
    """Why `node` itself cannot be cached, whatever its inputs; None when it could be."""
    if op in opkinds.RESOURCE_READS:
        return f"uses {variables.get(ins[0][0], ins[0][0])!r}, which is not fully frozen"
    if op in opkinds.RANDOM:
        return "a random op (Dropout, augmentation): its output changes between epochs"
    if worst == DATA and _reduces_batch(ir, node, ins):
        return ("reduces over the batch axis (BatchNorm in training mode?): an example's "
                "activation depends on the rest of its batch; freeze BatchNorm with "
                "batchnorm_inference=True")
    if program.callees(ir, node):
        if not _body_is_pure(program, ir, node):
            return f"calls a function ({op}) that writes state or draws random numbers"
        return None
    if opkinds.has_side_effect(op):
        return "a stateful op"
    return None
