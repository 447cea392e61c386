"""Make each frozen variable's gradient zero where it is frozen, at its source.

The marker Identity that capture put on the gradient (in the step or in a body) stays as
the anchor; what flows into it changes:

* fully frozen, dense:   Fill(shape, 0)       - the backward ops that produced the
                                                 gradient lose their last use and die;
* fully frozen, sparse:  Fill([n, *row], 0)   - built from the slice indices only;
* partly frozen, dense:  g * keep             - keep is a constant of g's dtype;
* partly frozen, sparse: values * gather(keep, indices) - never densified.
"""

from __future__ import annotations

from ..plan import Plan
from ..program import Program
from .build import Builder
from .masks import keep_const, slug

PASS = "mask_gradients"


def mask_gradients(program: Program, plan: Plan) -> Program:
    for ir, marker, var in plan.sites:
        vf = plan.freeze_of(var.placeholder)
        if vf is None:
            continue
        grad = ir.inputs(marker.values)[0]
        dtype = ir.dtype(grad)
        b = Builder(ir, PASS, marker.values, f"graphfreeze/{PASS}/{slug(var.path)}")
        if marker.sparse:
            indices = (marker.indices, 0)
            if vf.full:
                new = b.zeros_rows(indices, var.shape[1:], dtype)
            else:
                keep = b.adopt(keep_const(ir, vf, dtype, gathered=True, device=b.device,
                                          after=b.after, pass_name=PASS))
                new = b.mul(grad, b.gather_rows(keep, indices, "keep_rows"))
        elif vf.full:
            new = b.zeros(var.shape, dtype)
        else:
            keep = b.adopt(keep_const(ir, vf, dtype, device=b.device, after=b.after,
                                      pass_name=PASS))
            new = b.mul(grad, keep)
        ir.set_input(marker.values, 0, new)
        plan.notes.inserted.extend(b.created)
    return program
