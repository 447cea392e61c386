"""Guard every write to a frozen variable's resource.

Fully frozen: the write is deleted. Partly frozen: the value written keeps frozen entries
as they are, so no optimizer term (decoupled weight decay, momentum built up before
freezing, EMA overwrite) can move them:

* AssignVariableOp(v, new)            -> Assign(v, where(frozen, read(v), new))
* Assign{Add,Sub}VariableOp(v, delta) -> delta * keep
* ResourceScatter{Add,Sub}(v, i, u)   -> u * gather(keep, i)
* ResourceScatter{Update,Min,Max}     -> where(gather(frozen, i), gather(v, i), u)
* ResourceScatter{Mul,Div}            -> where(gather(frozen, i), 1, u)
* ResourceScatterNd{Add,Sub,Update}   -> the same with GatherNd

Fused ResourceApply* kernels and strided-slice assignment cannot be guarded entry by
entry from outside; partly freezing a variable they write is refused by name.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from .. import opkinds
from ..errors import UnsupportedGraphError
from ..ir import IR
from ..plan import Plan
from ..program import Program
from ..rules import VariableFreeze
from .build import Builder
from .masks import compress, frozen_const, keep_const, slug
from .resources import check_known_use

PASS = "guard_writes"


def guard_writes(program: Program, plan: Plan) -> Program:
    doomed: list[tuple[IR, str]] = []
    for vf in plan.freezes:
        for ir, node, index in program.resource_uses(program.main, (vf.variable.placeholder, 0)):
            if check_known_use(ir, node, vf.variable.path) == "read":
                continue
            op = ir.op(node)
            if op.startswith(opkinds.FUSED_APPLY_PREFIXES) and index != 0:
                raise UnsupportedGraphError(
                    f"{op} node {node!r} uses frozen variable {vf.variable.path!r} as optimizer "
                    "state of another variable; freeze the variable it updates instead.")
            if vf.full:
                doomed.append((ir, node))
                plan.notes.removed_writes.append(node)
            else:
                _guard_partial(ir, plan, node, index, vf)
                plan.notes.guarded_writes.append(node)
    program.remove_nodes(doomed)
    return program


def _guard_partial(ir: IR, plan: Plan, node: str, index: int, vf: VariableFreeze) -> None:
    op = ir.op(node)
    inputs = ir.inputs(node)
    var = vf.variable
    b = Builder(ir, PASS, node, f"graphfreeze/{PASS}/{slug(var.path)}")

    def const_like(tensor, make):
        return b.adopt(make(ir, vf, ir.dtype(tensor), device=b.device, after=b.after,
                            pass_name=PASS))

    if op == "AssignVariableOp":
        old = b.read(inputs[0], var.dtype, var.shape, "old")
        frozen = b.adopt(frozen_const(ir, vf, device=b.device, after=b.after, pass_name=PASS))
        ir.set_input(node, 1, b.select(frozen, old, inputs[1]))
    elif op in ("AssignAddVariableOp", "AssignSubVariableOp"):
        ir.set_input(node, 1, b.mul(inputs[1], const_like(inputs[1], keep_const)))
    elif op.startswith("ResourceScatterNd"):
        _guard_scatter(ir, b, node, inputs, vf, nd=True)
    elif op.startswith("ResourceScatter"):
        _guard_scatter(ir, b, node, inputs, vf, nd=False)
    else:
        raise UnsupportedGraphError(
            f"{op} node {node!r} writes {var.path!r}, which is partly frozen; graphfreeze "
            "guards Assign*, ResourceScatter* and ResourceScatterNd* writes entry by entry but "
            f"not {op}. Freeze the whole variable, or use a Keras 3 optimizer.")
    plan.notes.inserted.extend(b.created)


def _guard_scatter(ir: IR, b: Builder, node: str, inputs, vf: VariableFreeze, *, nd: bool) -> None:
    op = ir.op(node)
    kind = op[len("ResourceScatterNd" if nd else "ResourceScatter"):]
    resource, indices, updates = inputs[0], inputs[1], inputs[2]
    dtype = ir.dtype(updates)
    gather = b.gather_nd if nd else b.gather_rows
    # ScatterNd indexes whole entries (or leading-axis blocks), so it needs the full mask.
    mask = vf.frozen if nd else compress(vf.frozen, keep_axis0=True)
    frozen = b.adopt(ir.add_const(f"{b.prefix}/frozen_rows", mask, tf.bool, device=b.device,
                                  after=b.after, inserted_by=PASS))
    frozen_at = gather(frozen, indices, "frozen_at")
    if kind in ("Add", "Sub"):
        zero = b.const("zero", np.zeros((), dtype.as_numpy_dtype), dtype)
        new = b.select(frozen_at, zero, updates)
    elif kind in ("Mul", "Div"):
        one = b.const("one", np.ones((), dtype.as_numpy_dtype), dtype)
        new = b.select(frozen_at, one, updates)
    elif kind in ("Update", "Min", "Max"):
        old = b.resource_gather(resource, indices, dtype, "old_rows", nd=nd)
        new = b.select(frozen_at, old, updates)
    else:
        raise UnsupportedGraphError(f"{op} node {node!r} writes a partly frozen variable "
                                    f"{vf.variable.path!r}; {op} is not guarded yet.")
    ir.set_input(node, 2, new)
