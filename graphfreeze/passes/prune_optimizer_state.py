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
from .dependence import Dependence, write_targets


def gradient_sources(plan: Plan, ir: IR) -> tuple[dict, dict[int, str], int]:
    """Bit per marked variable: (tensor -> bit, bit -> variable path, mask of live bits)."""
    sources, owners, live = {}, {}, 0
    for i, (marker, var) in enumerate(plan.markers()):
        bit = 1 << i
        owners[bit] = var.path
        vf = plan.freeze_of(var.placeholder)
        if vf is None or not vf.full:
            live |= bit
        for name in (marker.values, marker.indices):
            if name and name in ir:
                sources[(name, 0)] = bit
    return sources, owners, live


def prune_optimizer_state(ir: IR, plan: Plan) -> IR:
    if not any(vf.full for vf in plan.freezes):
        return ir
    sources, owners, live = gradient_sources(plan, ir)
    dep = Dependence(ir, sources)
    frozen = {vf.variable.placeholder for vf in plan.freezes}
    dead_resources = {r: bits for r, bits in dep.resource_bits.items()
                      if bits and not bits & live and r not in frozen}
    if not dead_resources:
        return ir
    doomed = [n for n in dep.order if opkinds.is_write(ir.op(n))
              and set(write_targets(ir, n, dep.inputs[n])) & dead_resources.keys()]
    by_placeholder = plan.capture.variable_by_placeholder
    for r, bits in dead_resources.items():
        var = by_placeholder.get(r)
        path = var.path if var is not None else r
        plan.notes.pruned_state[path] = [p for b, p in owners.items() if bits & b]
    plan.notes.removed_writes.extend(doomed)
    ir.remove_nodes(doomed)
    return ir
