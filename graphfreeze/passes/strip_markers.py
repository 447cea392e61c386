"""Remove the gradient markers, wiring their consumers to what flows into them."""

from __future__ import annotations

from ..ir import IR
from ..plan import Plan
from ..program import Program
from .result import PassResult


def strip_markers(program: Program, plan: Plan) -> PassResult:
    start = program.edits
    for ir, marker, _ in plan.sites:
        remove_markers(ir, [marker.values, marker.indices])
    return PassResult(program, program.edits != start)


def remove_markers(ir: IR, names: list) -> None:
    present = [n for n in names if n and n in ir]
    for name in present:
        ir.replace_uses((name, 0), ir.inputs(name)[0])
    ir.remove_nodes(present)
