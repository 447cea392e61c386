"""Forward mode: make frozen values constants for any gradient taken through the function.

After each read of a frozen variable:

* fully frozen:  StopGradient(x)
* partly frozen: where(frozen, StopGradient(x), x)

The select is x bitwise (an inf or NaN at a frozen entry stays what it is, where the
seed-002 trick keep * x + StopGradient(frozen * x) would turn it into NaN), and its
gradient is where(frozen, 0, upstream): SelectV2's gradient routes the upstream gradient
of frozen entries to the StopGradient branch, where it ends.

A read that only feeds a row gather (an embedding lookup) is masked after the gather,
with the mask rows gathered by the same indices, so the caller's gradient stays sparse.
"""

from __future__ import annotations

from .. import opkinds
from ..ir import IR, Tensor
from ..plan import Plan
from ..program import Program
from ..rules import VariableFreeze
from .build import Builder
from .masks import select_frozen, slug
from .resources import check_known_use
from .result import PassResult

PASS = "stop_frozen_reads"


def stop_frozen_reads(program: Program, plan: Plan) -> PassResult:
    start = program.edits
    for vf in plan.freezes:
        for ir, node, _ in program.resource_uses(program.main, (vf.variable.placeholder, 0)):
            if (check_known_use(ir, node, vf.variable.path) != "read"
                    or ir.op(node) not in opkinds.VALUE_READS):
                continue
            if ir.op(node) == "ResourceGather":
                _mask(ir, plan, vf, node, (node, 0), indices=ir.inputs(node)[1])
                continue
            read = (node, 0)
            gathers = [(dst, i) for dst, i in ir.consumers(read) if _is_row_gather(ir, dst, i)]
            if vf.partial and gathers and len(gathers) == len(ir.consumers(read)):
                for dst, _ in gathers:
                    _mask(ir, plan, vf, dst, (dst, 0), indices=ir.inputs(dst)[1])
            else:
                _mask(ir, plan, vf, node, read, indices=None)
    return PassResult(program, program.edits != start)


def _is_row_gather(ir: IR, node: str, index: int) -> bool:
    if ir.op(node) != "GatherV2" or index != 0:
        return False
    axis = ir.const_value(ir.inputs(node)[2])
    return axis is not None and int(axis) == 0 and ir.attr(node, "batch_dims").i == 0


def _mask(ir: IR, plan: Plan, vf: VariableFreeze, anchor: str, x: Tensor,
          indices: Tensor | None) -> None:
    consumers = ir.consumers(x)
    if not consumers:
        return
    b = Builder(ir, PASS, anchor, f"graphfreeze/{PASS}/{slug(vf.variable.path)}")
    if vf.full:
        y = b.stop_gradient(x)
    else:
        y = select_frozen(b, vf, b.stop_gradient(x), x, indices)
    ir.replace_uses(x, y, exclude=b.created)
    plan.notes.inserted.extend(b.created)
