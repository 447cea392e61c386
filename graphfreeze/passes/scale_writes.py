"""Scale the updates written to variables a `gf.Scale` rule gives a factor (graphfreeze/scale.py).

Runs before `guard_writes`, so that the guards of partly frozen variables select around the
scaled value and a frozen entry is never multiplied (an inf or NaN cannot leak):

* AssignVariableOp(v, new)            -> Assign(v, old + f * (new - old))
* Assign{Add,Sub}VariableOp(v, delta) -> f * delta
* ResourceScatter{Add,Sub}(v, i, u)   -> f[i] * u
* ResourceScatterUpdate(v, i, u)      -> v[i] + f[i] * (u - v[i])
* ResourceScatterNd{Add,Sub,Update}   -> the same with GatherNd

`f` is a scalar constant when every trainable entry has the same factor, else the factors'
compact array (one per graph and variable). Gradients are not touched: the update is.
"""

from __future__ import annotations

from .. import opkinds
from ..errors import UnsupportedGraphError
from ..ir import IR, Tensor
from ..plan import Plan
from ..program import Program
from ..scale import VariableScale
from .build import Builder
from .masks import compact_entries, compact_rows, scalar_like, shared_const, slug
from .resources import check_known_use
from .result import PassResult

PASS = "scale_writes"


def scale_writes(program: Program, plan: Plan) -> PassResult:
    start = program.edits
    for vs in plan.scales:
        for ir, node, _ in program.resource_uses(program.main, (vs.variable.placeholder, 0)):
            if check_known_use(ir, node, vs.variable.path) == "read":
                continue
            _scale(ir, plan, node, vs)
            plan.notes.scaled_writes.append(node)
    return PassResult(program, program.edits != start)


def _factor(b: Builder, vs: VariableScale, dtype) -> Tensor:
    """The factors as a constant of `dtype`: one per graph, variable and dtype."""
    return shared_const(b, ("scale", vs.variable.path, dtype.name),
                        f"graphfreeze/scale/{slug(vs.variable.path)}_{dtype.name}",
                        vs.compact.astype(dtype.as_numpy_dtype), dtype)


def _toward(b: Builder, f: Tensor, old: Tensor, new: Tensor) -> Tensor:
    """old + f * (new - old), with the ops every backend has (Mul, AddV2)."""
    minus_one = scalar_like(b, old, -1, "minus_one")
    step = b.add(new, b.mul(minus_one, old, "neg_old"), "step")
    return b.add(old, b.mul(f, step, "scaled_step"), "scaled")


def _scale(ir: IR, plan: Plan, node: str, vs: VariableScale) -> None:
    op = ir.op(node)
    inputs = ir.inputs(node)
    var = vs.variable
    b = Builder(ir, PASS, node, f"graphfreeze/{PASS}/{slug(var.path)}")
    if op == "AssignVariableOp":
        f = _factor(b, vs, ir.dtype(inputs[1]))
        old = b.read(inputs[0], var.dtype, var.shape, "old")
        ir.set_input(node, 1, _toward(b, f, old, inputs[1]))
    elif op in ("AssignAddVariableOp", "AssignSubVariableOp"):
        ir.set_input(node, 1, b.mul(_factor(b, vs, ir.dtype(inputs[1])), inputs[1], "scaled"))
    elif op.startswith("ResourceScatter") and op.endswith(("Add", "Sub", "Update")):
        nd = op.startswith("ResourceScatterNd")
        resource, indices, updates = inputs[0], inputs[1], inputs[2]
        f = _factor_at(b, vs, indices, ir.dtype(updates), nd=nd)
        if op.endswith("Update"):
            old = b.resource_gather(resource, indices, ir.dtype(updates), "old_rows", nd=nd)
            ir.set_input(node, 2, _toward(b, f, old, updates))
        else:
            ir.set_input(node, 2, b.mul(f, updates, "scaled"))
    else:
        kind = "a fused optimizer kernel" if op.startswith(opkinds.FUSED_APPLY_PREFIXES) else op
        raise UnsupportedGraphError(
            f"{op} node {node!r} writes {var.path!r}, which a gf.Scale rule gives the factor "
            f"{vs.describe()}; graphfreeze scales Assign*, ResourceScatter{{Add,Sub,Update}} and "
            f"their Nd forms, not {kind}. Use a Keras 3 optimizer, or give it its own optimizer "
            "with a scaled learning rate.")
    if not op.startswith("ResourceScatter"):  # a whole-variable write: every value has its shape
        for name in b.created:
            data = ir.graph.nodes[name]
            if data["op"] != "Const" and data["shapes"] == [None]:
                data["shapes"] = [tuple(var.shape)]
    plan.notes.inserted.extend(b.created)


def _factor_at(b: Builder, vs: VariableScale, indices: Tensor, dtype, *, nd: bool) -> Tensor:
    """The factors of the rows (or index tuples) a scatter writes, broadcastable to its updates."""
    f = _factor(b, vs, dtype)
    compact = vs.compact
    if compact.ndim == 0:
        return f
    if not nd:
        return compact_rows(b, f, compact.shape, indices, "factor")
    try:
        return compact_entries(b, f, compact.shape, indices, "factor")
    except ValueError:
        raise UnsupportedGraphError(f"{b.ir.op(b.anchor)} node {b.anchor!r} writes "
                                    f"{vs.variable.path!r} at index tuples of unknown depth; "
                                    "graphfreeze cannot look up their factors.") from None
