"""Remove optimizer state updates that only ever serve frozen variables (S3, S4).

A resource that is not itself frozen and has no gradient of its own (an Adam moment, a
momentum slot, a gradient accumulator, an EMA) is dead when

* every gradient its written values derive from belongs to a fully frozen variable, or
* it is optimizer state and its values are, entry by entry, only fully frozen variables'
  values or gradients (an EMA of a frozen weight).

All writes to a dead resource go, in the step and in every body, resets included, so a
fully frozen variable's optimizer state is not touched at all: freezing is a pause.
"""

from __future__ import annotations

from ..analysis.dependence import marked_placeholders
from ..plan import Plan
from ..program import Program
from .result import PassResult


def prune_optimizer_state(program: Program, plan: Plan) -> PassResult:
    start = program.edits
    dep = plan.dependence
    fully = {vf.variable.placeholder for vf in plan.freezes if vf.full}
    if dep is None or not fully:
        return PassResult(program, program.edits != start)
    frozen_bits = sum(1 << i for i, v in plan.gradient_owner.items() if v.placeholder in fully)
    live = dep.g_mask & ~frozen_bits
    exempt = {vf.variable.placeholder for vf in plan.freezes} | marked_placeholders(dep)
    by_placeholder = plan.capture.variable_by_placeholder
    dead: dict[str, int] = {}
    for r, bits in dep.resource_bits.items():
        if r in exempt:
            continue
        g, o = dep.split(bits)
        state = r in by_placeholder and by_placeholder[r].optimizer_state
        if (g and not g & live) or (state and o and not o & live and not g & live):
            dead[r] = g | o
    if not dead:
        return PassResult(program, program.edits != start)
    doomed = [(ir, node) for ir, node in dep.writes
              if node in ir and dep.write_targets(ir, node) & dead.keys()]
    program.remove_nodes(doomed)
    plan.notes.removed_writes.extend(node for _, node in doomed)
    for r, bits in dead.items():
        var = by_placeholder.get(r)
        plan.notes.pruned_state[var.path if var is not None else r] = [
            v.path for i, v in plan.gradient_owner.items() if bits & (1 << i)]
    return PassResult(program, program.edits != start)
