"""Optional: run fully frozen BatchNorm in inference mode, as Keras `trainable=False` does.

A frozen running statistic s (BatchNorm's moving mean or variance) is recognised by how
it is written: as an exponential moving average of a batch statistic M,

    s <- s * m + M * (1 - m)          (AssignVariableOp)
    s <- s - (s - M) * (1 - m)        (AssignSubVariableOp)

In training mode the layer normalises with M; in inference mode with s. So every other
use of M becomes a read of s (cast to M's dtype), after which the batch moments are dead
code. This runs before guard_writes, which then removes the (frozen) statistic updates.
Nothing here is specific to Keras' BatchNormalization: any frozen running statistic
updated that way switches to using its stored value.
"""

from __future__ import annotations

from ..ir import IR, Tensor
from ..plan import Plan
from ..program import Program
from .build import Builder
from .dependence import marked_placeholders
from .masks import slug

PASS = "batchnorm_inference"
_ARITHMETIC = frozenset({"Mul", "AddV2", "Add", "Sub", "Cast", "Identity"})


def batchnorm_inference(program: Program, plan: Plan) -> Program:
    if not plan.batchnorm_inference:
        return program
    marked = marked_placeholders(plan.dependence) if plan.dependence is not None else set()
    for vf in plan.freezes:
        var = vf.variable
        if not vf.full or var.placeholder in marked:
            continue
        for ir, node, index in program.resource_uses(program.main, (var.placeholder, 0)):
            op = ir.op(node)
            if index != 0 or op not in ("AssignVariableOp", "AssignSubVariableOp"):
                continue
            statistic = _batch_statistic(ir, ir.inputs(node)[1], ir.inputs(node)[0])
            if statistic is not None:
                _use_stored_value(ir, plan, node, statistic, var)
    return program


def _batch_statistic(ir: IR, value: Tensor, resource: Tensor) -> Tensor | None:
    """The one non-constant leaf M of an EMA update expression, other than reads of s."""
    leaves: list[Tensor] = []
    pending = [value]
    while pending:
        t = pending.pop()
        op = ir.op(t[0])
        if op == "Const":
            continue
        if op == "ReadVariableOp" and ir.inputs(t[0])[0] == resource:
            continue
        if op in _ARITHMETIC and len(leaves) < 2:
            pending.extend(ir.inputs(t[0]))
        else:
            leaves.append(t)
    return leaves[0] if len(leaves) == 1 else None


def _use_stored_value(ir: IR, plan: Plan, write: str, statistic: Tensor, var) -> None:
    b = Builder(ir, PASS, statistic[0], f"graphfreeze/{PASS}/{slug(var.path)}")
    b.after = ir.graph.nodes[statistic[0]]["order"]
    stored = b.read(ir.inputs(write)[0], var.dtype, var.shape, "stored")
    dtype = ir.dtype(statistic)
    if dtype != var.dtype:
        stored = b.cast(stored, dtype, "stored_cast")
    update = _expression_nodes(ir, ir.inputs(write)[1], statistic)
    ir.replace_uses(statistic, stored, exclude=update | set(b.created))
    plan.notes.inserted.extend(b.created)


def _expression_nodes(ir: IR, value: Tensor, stop: Tensor) -> set[str]:
    nodes, pending = set(), [value]
    while pending:
        t = pending.pop()
        if t == stop or t[0] in nodes or ir.op(t[0]) not in _ARITHMETIC:
            continue
        nodes.add(t[0])
        pending.extend(ir.inputs(t[0]))
    return nodes
