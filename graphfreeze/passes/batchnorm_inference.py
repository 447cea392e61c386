"""Optional: run fully frozen BatchNorm in inference mode, as Keras `trainable=False` does,
in the forward pass and in the backward pass.

A frozen running statistic s (BatchNorm's moving mean or variance) is recognised by how
it is written: as an exponential moving average of a batch statistic M,

    s <- s * m + M * (1 - m)          (AssignVariableOp)
    s <- s - (s - M) * (1 - m)        (AssignSubVariableOp)

Forward: in training mode the layer normalises with M; in inference mode with s. So every
other use of M becomes a read of s (cast to M's dtype). This runs before guard_writes,
which then removes the (frozen) statistic updates. Nothing here is specific to Keras'
BatchNormalization: any frozen running statistic updated that way switches to its stored
value.

Backward: the traced step also differentiates M. In training mode the gradient w.r.t. the
layer's input x has terms through the batch mean and variance; in inference mode it is
gamma / sqrt(s_var + eps) * upstream and nothing else. The ops that normalise now read
s, so their own gradients are already the inference-mode ones (they read the forward
values, which are now s); what must go is the gradient that still flows back through the
ops computing M (Keras: tf.nn.moments). TensorFlow builds those backward ops under the
forward ops' name scope ("gradient_tape/<scope>/..." for a GradientTape,
"gradients/<scope>/..." for tf.gradients), and nothing else links a backward op to its
forward op in a graph (with static shapes the gradients of Mean and Squeeze read only
constants). So the ops computing M must be alone in their scope (checked: every forward
op there feeds only M, M's update and backward ops); every contribution the backward ops
of that scope make to a gradient outside it is cut (dropped from the AddN that sums the
gradient of x). The forward moments and their backward are then dead code.

A statistic whose computation is differentiable (it reads a variable that has a
gradient) but whose backward cannot be found this way is refused by name rather than
left half in training mode.

FusedBatchNorm{,V2,V3} in training mode (TF1-style layers) computes M inside the op and
reads it again in its gradient op through the reserve-space outputs; such a layer is
switched whole: is_training=False with the stored statistics as inputs, and its
FusedBatchNormGrad* op likewise, fed the stored statistics.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .. import opkinds
from ..analysis.dependence import marked_placeholders
from ..errors import UnsupportedGraphError
from ..ir import IR, Tensor
from ..plan import Plan
from ..program import Program
from .build import Builder
from .masks import slug
from .result import PassResult

PASS = "batchnorm_inference"


def batchnorm_inference(program: Program, plan: Plan) -> PassResult:
    start = program.edits
    if not plan.batchnorm_inference:
        return PassResult(program, program.edits != start)
    marked = marked_placeholders(plan.dependence) if plan.dependence is not None else set()
    # per graph: the scope of each replaced statistic's computation -> (statistics, updates)
    replaced: dict[int, tuple[IR, dict[str, tuple[list[Tensor], set[str]]]]] = {}
    fused: dict[int, tuple[IR, dict[str, dict[int, Tensor]]]] = {}
    for vf in plan.freezes:
        var = vf.variable
        if not vf.full or var.placeholder in marked:
            continue
        for ir, node, index in program.resource_uses(program.main, (var.placeholder, 0)):
            op = ir.op(node)
            if index != 0 or op not in ("AssignVariableOp", "AssignSubVariableOp"):
                continue
            statistic = _batch_statistic(ir, ir.inputs(node)[1], ir.inputs(node)[0])
            if statistic is None:
                continue
            stored, update = _use_stored_value(ir, plan, node, statistic, var)
            if ir.op(statistic[0]) in opkinds.FUSED_BATCH_NORMS and statistic[1] in (1, 2):
                fused.setdefault(id(ir), (ir, {}))[1].setdefault(statistic[0], {})[statistic[1]] = stored
                continue
            scope = statistic[0].rpartition("/")[0]
            stats, updates = replaced.setdefault(id(ir), (ir, {}))[1].setdefault(scope, ([], set()))
            stats.append(statistic)
            updates |= update | {node}
    for ir, by_scope in replaced.values():
        for scope, (stats, updates) in by_scope.items():
            _cut_backward(program, ir, plan, scope, stats, updates, marked)
    for ir, by_node in fused.values():
        for node, stored_by_output in by_node.items():
            _fused_inference(ir, plan, node, stored_by_output)
    return PassResult(program, program.edits != start)


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
        if op in opkinds.UPDATE_ARITHMETIC and len(leaves) < 2:
            pending.extend(ir.inputs(t[0]))
        else:
            leaves.append(t)
    return leaves[0] if len(leaves) == 1 else None


def _use_stored_value(ir: IR, plan: Plan, write: str, statistic: Tensor, var) -> tuple[Tensor, set[str]]:
    """Replace the uses of M by the stored statistic; returns it and the update's nodes."""
    b = Builder(ir, PASS, statistic[0], f"graphfreeze/{PASS}/{slug(var.path)}")
    b.after = ir.graph.nodes[statistic[0]]["order"]
    stored = b.read(ir.inputs(write)[0], var.dtype, var.shape, "stored")
    dtype = ir.dtype(statistic)
    if dtype != var.dtype:
        stored = b.cast(stored, dtype, "stored_cast")
    update = _expression_nodes(ir, ir.inputs(write)[1], statistic)
    ir.replace_uses(statistic, stored, exclude=update | set(b.created))
    plan.notes.inserted.extend(b.created)
    return stored, update


def _expression_nodes(ir: IR, value: Tensor, stop: Tensor) -> set[str]:
    nodes, pending = set(), [value]
    while pending:
        t = pending.pop()
        if t == stop or t[0] in nodes or ir.op(t[0]) not in opkinds.UPDATE_ARITHMETIC:
            continue
        nodes.add(t[0])
        pending.extend(ir.inputs(t[0]))
    return nodes


# --------------------------------------------------------------------------- backward


def _backward_pattern(scope: str) -> re.Pattern:
    """Names of the backward ops TensorFlow builds for forward ops in `scope`."""
    return re.compile(r"(^|/)(gradient_tape|gradients)(_\d+)?/" + re.escape(scope) + "/")


def _ancestors(ir: IR, tensors: Iterable[Tensor]) -> set[str]:
    seen: set[str] = set()
    pending = [t[0] for t in tensors]
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        pending.extend(src for src, _ in ir.inputs(node))
    return seen


def _cut_backward(program: Program, ir: IR, plan: Plan, scope: str, stats: list[Tensor],
                  updates: set[str], marked: set[str]) -> None:
    """Drop the gradient that flows back through the ops computing `stats` (in `scope`)."""
    pattern = _backward_pattern(scope)
    backward = {n for n in ir.graph if pattern.search(n)}
    where = f"batch statistic {stats[0][0]!r}" + (f" in function {ir.name!r}" if ir.name else "")
    if not backward:
        if _differentiable(program, ir, stats, marked):
            raise UnsupportedGraphError(
                f"batchnorm_inference: the {where} depends on trainable variables, but graphfreeze "
                f"cannot find the backward ops of its computation (expected under "
                f"'gradient_tape/{scope}/'); the gradient through the frozen BatchNorm would stay "
                "that of training mode. Use batchnorm_inference=False, or Keras trainable=False "
                "on the layer.")
        return
    _check_scope_holds_only(ir, scope, stats, updates, backward, where)
    cut: dict[str, list[int]] = {}
    for node in backward:
        for _, dst, attrs in ir.graph.out_edges(node, data=True):
            if not attrs["control"] and dst not in backward:
                cut.setdefault(dst, []).append(attrs["dst_input"])
    b = Builder(ir, PASS, stats[0][0], f"graphfreeze/{PASS}/{slug(scope)}")
    for dst, indices in cut.items():
        _drop_contribution(ir, b, dst, sorted(indices), where)
    plan.notes.inserted.extend(b.created)


def _differentiable(program: Program, ir: IR, stats: list[Tensor], marked: set[str]) -> bool:
    for node in _ancestors(ir, stats):
        if ir.op(node) in opkinds.RESOURCE_READS and ir.inputs(node):
            if program.resource_owners(ir, ir.inputs(node)[0]) & marked:
                return True
    return False


def _check_scope_holds_only(ir: IR, scope: str, stats: list[Tensor], updates: set[str],
                            backward: set[str], where: str) -> None:
    """Every forward op in `scope` computes a statistic and feeds nothing else; otherwise
    the backward ops in the scope may differentiate something that must keep training."""
    prefix = scope + "/"
    forward = {n for n in ir.graph if n.startswith(prefix) and n not in backward}
    cone = _ancestors(ir, stats)
    for node in forward:
        if ir.op(node) == "Const":
            continue
        outside = [dst for _, dst, attrs in ir.graph.out_edges(node, data=True)
                   if not attrs["control"] and dst not in forward and dst not in backward
                   and dst not in updates]
        if node not in cone or outside:
            raise UnsupportedGraphError(
                f"batchnorm_inference: the {where} is computed in scope {scope!r}, which also "
                f"holds {ir.op(node)} node {node!r}" + (f" used by {outside[0]!r}" if outside else "")
                + "; graphfreeze cannot tell the backward of the statistic from that of other "
                "ops there. Use batchnorm_inference=False, or Keras trainable=False on the layer.")


def _drop_contribution(ir: IR, b: Builder, node: str, indices: list[int], where: str) -> None:
    """`node`'s inputs `indices` carry gradient through the batch statistics: remove them."""
    op = ir.op(node)
    inputs = ir.inputs(node)
    if op in opkinds.SUMS and len(indices) < len(inputs):
        if op == "AddN":
            ir.drop_inputs(node, indices)
            return
        rest = inputs[1 - indices[0]]
        if ir.shape(rest) == ir.shape((node, 0)) and ir.shape(rest) is not None:
            ir.replace_uses((node, 0), rest)
            return
    for k in indices:
        shape = ir.shape(inputs[k])
        if shape is None or None in shape:
            raise UnsupportedGraphError(
                f"batchnorm_inference: {op} node {node!r} takes gradient through the {where} at "
                f"input {k}, of unknown shape {shape}; graphfreeze cannot replace it by zeros.")
        ir.set_input(node, k, b.zeros(shape, ir.dtype(inputs[k]), f"zeros_{slug(node)}_{k}"))


# --------------------------------------------------------------------------- fused


def _fused_inference(ir: IR, plan: Plan, node: str, stored: dict[int, Tensor]) -> None:
    """Switch a training-mode FusedBatchNorm and its gradient op to inference mode."""
    if not ir.attr(node, "is_training").b:
        return
    if set(stored) != {1, 2}:
        raise UnsupportedGraphError(
            f"batchnorm_inference: only one of the running statistics of {ir.op(node)} node "
            f"{node!r} is frozen; freeze both (the whole BatchNorm layer) or neither.")
    with ir.edit(node) as nd:
        nd.attr["is_training"].b = False
        if "exponential_avg_factor" in nd.attr:
            nd.attr["exponential_avg_factor"].f = 1.0
    ir.set_input(node, 3, stored[1])
    ir.set_input(node, 4, stored[2])
    for grad in {dst for k in (3, 4) for dst, _ in ir.consumers((node, k))}:
        if not ir.op(grad).startswith("FusedBatchNormGrad"):
            continue
        with ir.edit(grad) as nd:
            nd.attr["is_training"].b = False
        ir.set_input(grad, 3, stored[1])
        ir.set_input(grad, 4, stored[2])

