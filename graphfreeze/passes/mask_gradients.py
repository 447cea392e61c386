"""Make each frozen variable's gradient zero where it is frozen, at its source.

The marker Identity that capture put on the gradient (in the step or in a body) stays as
the anchor; what flows into it changes:

* fully frozen, dense:   Fill(shape, 0)       - the backward ops that produced the
                                                 gradient lose their last use and die;
* fully frozen, sparse:  Fill([n, *row], 0)   - built from the slice indices only;
* partly frozen, dense:  where(frozen, 0, g)  - the shared bool mask (passes/masks.py);
* partly frozen, sparse: where(frozen[indices], 0, values) - never densified.

Masks select, never multiply: an inf or NaN in a frozen entry's gradient becomes 0, not
NaN (0 * inf), and cannot reach the optimizer.
"""

from __future__ import annotations

from ..plan import Plan
from ..program import Program
from .build import Builder
from .masks import select_frozen, slug
from .result import PassResult

PASS = "mask_gradients"


def mask_gradients(program: Program, plan: Plan) -> PassResult:
    start = program.edits
    for ir, marker, var in plan.sites:
        vf = plan.freeze_of(var.placeholder)
        if vf is None:
            continue
        grad = ir.inputs(marker.values)[0]
        dtype = ir.dtype(grad)
        b = Builder(ir, PASS, marker.values, f"graphfreeze/{PASS}/{slug(var.path)}")
        if marker.indices is not None:  # a sparse gradient (marker.sparse)
            indices = (marker.indices, 0)
            if vf.full:
                new = b.zeros_rows(indices, var.shape[1:], dtype)
            else:
                new = select_frozen(b, vf, 0, grad, indices, name="zero")
        elif vf.full:
            new = b.zeros(var.shape, dtype)
        else:
            new = select_frozen(b, vf, 0, grad, name="zero")
        ir.set_input(marker.values, 0, new)
        plan.notes.inserted.extend(b.created)
    return PassResult(program, program.edits != start)
