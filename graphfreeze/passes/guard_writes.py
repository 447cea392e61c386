"""Guard every write to a frozen variable's resource.

Fully frozen: the write is deleted. Partly frozen: the value written keeps frozen entries
as they are, so no optimizer term (decoupled weight decay, momentum built up before
freezing, EMA overwrite) can move them:

* AssignVariableOp(v, new)            -> Assign(v, where(frozen, read(v), new))
* Assign{Add,Sub}VariableOp(v, delta) -> where(frozen, 0, delta)
* ResourceScatter{Add,Sub}(v, i, u)   -> where(frozen[i], 0, u)
* ResourceScatter{Update,Min,Max}     -> where(frozen[i], v[i], u)
* ResourceScatter{Mul,Div}            -> where(frozen[i], 1, u)
* ResourceScatterNd{Add,Sub,Update}   -> the same with GatherNd

Every guard selects with the variable's shared bool mask (passes/masks.py), so an inf or
NaN written at a frozen entry is dropped, never multiplied into NaN.

Fused ResourceApply* kernels that write a partly frozen variable were already run on its
trainable entries (passes/lower_fused_apply.py: a ResourceSparseApply* at the trainable
rows, left as it is here, or Assign* writes guarded as above). Strided-slice assignment
cannot be guarded entry by entry from outside; partly freezing a variable it writes is
refused by name.
"""

from __future__ import annotations

from .. import opkinds
from ..errors import UnsupportedGraphError
from ..ir import IR, Tensor
from ..plan import Plan
from ..program import Program
from ..rules import VariableFreeze
from .build import Builder
from .masks import select_frozen, slug
from .resources import check_known_use
from .result import PassResult

PASS = "guard_writes"


def guard_writes(program: Program, plan: Plan) -> PassResult:
    start = program.edits
    doomed: list[tuple[IR, str]] = []
    sliced = set(plan.notes.sliced_writes)  # written at trainable entries only already
    for vf in plan.freezes:
        for ir, node, index in program.resource_uses(program.main, (vf.variable.placeholder, 0)):
            if check_known_use(ir, node, vf.variable.path) == "read" or node in sliced:
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
    return PassResult(program, program.edits != start)


def _guard_partial(ir: IR, plan: Plan, node: str, index: int, vf: VariableFreeze) -> None:
    op = ir.op(node)
    inputs = ir.inputs(node)
    var = vf.variable
    b = Builder(ir, PASS, node, f"graphfreeze/{PASS}/{slug(var.path)}")
    if op == "AssignVariableOp":
        old = b.read(inputs[0], var.dtype, var.shape, "old")
        ir.set_input(node, 1, select_frozen(b, vf, old, inputs[1]))
    elif op in ("AssignAddVariableOp", "AssignSubVariableOp"):
        ir.set_input(node, 1, select_frozen(b, vf, 0, inputs[1]))
    elif op.startswith("ResourceScatterNd"):
        guard_scatter(ir, b, node, inputs, vf, nd=True)
    elif op.startswith("ResourceScatter"):
        guard_scatter(ir, b, node, inputs, vf, nd=False)
    else:
        raise UnsupportedGraphError(
            f"{op} node {node!r} writes {var.path!r}, which is partly frozen; graphfreeze "
            "guards Assign*, ResourceScatter* and ResourceScatterNd* writes entry by entry but "
            f"not {op}. Freeze the whole variable, or use a Keras 3 optimizer.")
    plan.notes.inserted.extend(b.created)


def guard_scatter(ir: IR, b: Builder, node: str, inputs, vf: VariableFreeze, *, nd: bool) -> None:
    """Make the scatter `node` (inputs `inputs`: resource, indices, updates) leave `vf`'s
    frozen entries as they are: its updates there become the kind's identity (0 for
    Add/Sub, 1 for Mul/Div) or the entries' current values (Update/Min/Max). `nd`: the
    ResourceScatterNd* form, at index tuples."""
    op = ir.op(node)
    kind = op[len("ResourceScatterNd" if nd else "ResourceScatter"):]
    resource, indices, updates = inputs[0], inputs[1], inputs[2]
    at_frozen: Tensor | float
    if kind in ("Add", "Sub"):
        at_frozen = 0
    elif kind in ("Mul", "Div"):
        at_frozen = 1
    elif kind in ("Update", "Min", "Max"):
        at_frozen = b.resource_gather(resource, indices, ir.dtype(updates), "old_rows", nd=nd)
    else:
        raise UnsupportedGraphError(f"{op} node {node!r} writes a partly frozen variable "
                                    f"{vf.variable.path!r}; {op} is not guarded yet.")
    ir.set_input(node, 2, select_frozen(b, vf, at_frozen, updates, indices, nd=nd))
