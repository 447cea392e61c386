"""Remove optimizer state updates that only ever serve frozen variables (S3, S4).

A write to a resource that is not itself frozen (an Adam moment, a momentum slot, a
gradient accumulator) is dead when every gradient its values derive from belongs to a
fully frozen variable. All writes to such a resource go, resets included, so a fully
frozen variable's slots are not touched at all: freezing is a pause.
"""

from __future__ import annotations

from .. import opkinds
from ..ir import IR
from ..plan import Plan
from .dependence import write_targets


def prune_optimizer_state(ir: IR, plan: Plan) -> IR:
    if not any(vf.full for vf in plan.freezes):
        return ir
    fully_frozen = {vf.variable.placeholder for vf in plan.freezes if vf.full}
    live = 0
    for bit, var in plan.gradient_owner.items():
        if var is None or var.placeholder not in fully_frozen:
            live |= bit
    frozen = {vf.variable.placeholder for vf in plan.freezes}
    dead = {r: bits for r, bits in plan.dependence.resource_bits.items()
            if bits and not bits & live and r not in frozen}
    if not dead:
        return ir
    doomed = [n for n, op in ir.graph.nodes(data="op") if opkinds.is_write(op)
              and set(write_targets(ir, n, ir.inputs(n))) & dead.keys()]
    by_placeholder = plan.capture.variable_by_placeholder
    for r, bits in dead.items():
        var = by_placeholder.get(r)
        plan.notes.pruned_state[var.path if var is not None else r] = [
            v.path for b, v in plan.gradient_owner.items() if bits & b and v is not None]
    plan.notes.removed_writes.extend(doomed)
    ir.remove_nodes(doomed)
    return ir
