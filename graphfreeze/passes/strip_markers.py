"""Remove the gradient markers, wiring their consumers to what flows into them."""

from __future__ import annotations

from ..ir import IR
from ..plan import Plan


def strip_markers(ir: IR, plan: Plan) -> IR:
    names = [n for m in plan.capture.markers for n in (m.values, m.indices) if n and n in ir]
    for name in names:
        ir.replace_uses((name, 0), ir.inputs(name)[0])
    ir.remove_nodes(names)
    return ir
