"""What the rewrite cannot see into, refused by name before anything is rewritten (S7).

* Opaque ops: ops that run Python (`tf.py_function`, `tf.numpy_function`), reach a variable
  by its name instead of a handle the graph passes along, or call functions graphfreeze
  does not follow. A `tf.py_function` that calls `kernel.assign_add(...)` moves a frozen
  kernel without any write op in the graph. They are refused unless the user states, with
  `allow_opaque=True`, that they touch no frozen state; the report then lists them.
* Writes without a marked gradient: a frozen trainable variable that the step writes but
  whose gradient graphfreeze never marked (a gradient taken with respect to a tensor such
  as `v.value()`, or a forward function that updates weights) would keep its optimizer
  state moving and count in a clipping norm.
* Custom gradients in forward mode: the rewritten function must still be differentiable
  by the caller's tape; a `tf.custom_gradient` whose Python gradient function refers to
  tensors of the original trace cannot be, so it is refused at rewrite time (found by
  building the caller's gradient once, in a trace that is never run).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import tensorflow as tf

from .. import opkinds
from ..errors import UnsupportedGraphError
from ..plan import Plan
from ..program import Program

#: op type -> why graphfreeze cannot see what it does to state.
OPAQUE_OPS = {
    "EagerPyFunc": "runs Python (tf.py_function)",
    "PyFunc": "runs Python (tf.numpy_function / tf.compat.v1.py_func)",
    "PyFuncStateless": "runs Python (tf.numpy_function(stateful=False))",
    "VarHandleOp": "reaches a variable by its shared name, not through a captured handle",
    "_VarHandlesOp": "reaches variables by their shared names, not through captured handles",
    "RemoteCall": "calls a function on another device, which graphfreeze does not follow",
    "BatchFunction": "calls a batched function, which graphfreeze does not follow",
}

CUSTOM_GRADIENT_ATTR = "_gradient_op_type"


def _function_names(nodedef: Any) -> Iterator[str]:
    for value in nodedef.attr.values():
        if value.HasField("func"):
            yield value.func.name
        for f in value.list.func:
            yield f.name


def _nodedefs(program: Program) -> Iterator[tuple[str | None, Any]]:
    """(function name or None for the step, NodeDef) for every node the step can run:
    its own, and those of every library function it reaches through any attribute (call
    bodies, and also the functions of ops graphfreeze does not follow)."""
    fdefs = program.fdefs
    pending: list[str] = []
    for node in program.main.graph.nodes:
        nd = program.main.nodedef(node)
        yield None, nd
        pending.extend(_function_names(nd))
        if nd.op in fdefs:
            pending.append(nd.op)
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen or name not in fdefs:
            continue
        seen.add(name)
        for nd in fdefs[name].node_def:
            yield name, nd
            pending.extend(_function_names(nd))
            if nd.op in fdefs:
                pending.append(nd.op)


def _where(function: str | None) -> str:
    return f" in function {function!r}" if function else ""


def refuse_opaque_ops(program: Program, plan: Plan, allow: bool) -> None:
    """Raise UnsupportedGraphError naming the first opaque op, unless `allow`; then record
    every opaque op in `plan.notes.opaque_ops`."""
    found = [(f, nd) for f, nd in _nodedefs(program) if nd.op in OPAQUE_OPS]
    if found and not allow:
        function, nd = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UnsupportedGraphError(
            f"{nd.op} node {nd.name!r}{_where(function)}{more} {OPAQUE_OPS[nd.op]}: whatever it "
            "does to variables is invisible in the graph, so graphfreeze cannot guarantee that "
            "frozen state stays unchanged. If it touches no frozen variable, pass "
            "allow_opaque=True (the report lists the op); otherwise move that work out of the "
            "step.")
    plan.notes.opaque_ops.extend(f"{nd.op} node {nd.name!r}{_where(f)}" for f, nd in found)


def refuse_unmarked_writes(program: Program, plan: Plan) -> None:
    """A frozen trainable variable the step writes must have a marked gradient.

    In a forward function (no marked gradient at all) a write is only suspect when the
    function differentiates something or applies an optimizer: a function that stores
    data into a weight is guarded as usual."""
    if not plan.training and not _takes_or_applies_gradients(program, plan):
        return
    marked = {id(m.variable) for _, m, _ in plan.sites}
    for vf in plan.freezes:
        var = vf.variable
        keras_var = var.keras_variable
        trainable = keras_var.trainable if keras_var is not None else var.trainable
        if not trainable or id(var.variable) in marked:
            continue
        for use in program.resource_uses(program.main, (var.placeholder, 0)):
            op = use.ir.op(use.node)
            if not opkinds.is_write(op):
                continue
            if plan.training and not _derives_from_backward(use.ir, use.node):
                continue  # a statistic written from the forward pass (raw BatchNorm moments)
            if plan.training:
                why = ("but graphfreeze found no gradient of it taken by tape.gradient or "
                       "tf.gradients with respect to the variable itself (a gradient taken "
                       "with respect to a tensor, such as v.value() or a read, cannot be "
                       "marked), so its optimizer state and a clipping norm would still see "
                       "it. Take the gradient with respect to the variable")
            else:
                why = ("in a function that differentiates or applies an optimizer but takes no "
                       "gradient graphfreeze can mark (tape.gradient or tf.gradients with "
                       "respect to the variables themselves), so the gradient behind that write "
                       "cannot be masked and the optimizer state of frozen variables would move. "
                       "Take the gradients with respect to the variables in the function you "
                       "freeze (a step that receives gradients as arguments cannot be frozen)")
            raise UnsupportedGraphError(
                f"frozen trainable variable {var.path!r} is written by {op} node "
                f"{use.node!r}{_where(use.ir.name)}, {why}; or leave it out of the rules.")


_BACKWARD_PREFIXES = tuple(f"{scope}/" for scope in opkinds.BACKWARD_SCOPES)


def _is_backward(node: str, op: str) -> bool:
    """The tape's and tf.gradients' name scopes, *Grad and *Backprop* kernels."""
    return node.startswith(_BACKWARD_PREFIXES) or "Backprop" in op or \
        op.rstrip("V0123456789").endswith("Grad")


def _derives_from_backward(ir: Any, write: str) -> bool:
    """Whether the value `write` stores may come from a gradient: a backward op among its
    data ancestors, or an argument of the body it sits in (which could carry one)."""
    pending, seen = [src for src, _ in ir.inputs(write)], set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        op = ir.op(node)
        if _is_backward(node, op) or (op == "Placeholder" and ir.name is not None):
            return True
        pending.extend(src for src, _ in ir.inputs(node))
    return False


def _takes_or_applies_gradients(program: Program, plan: Plan) -> bool:
    """Backward ops anywhere, or a write to a variable known as optimizer state."""
    for ir in program.graphs():
        for node, op in ir.graph.nodes(data="op"):
            if _is_backward(node, op):
                return True
    state = [v.placeholder for v in plan.capture.variables if v.optimizer_state]
    return any(opkinds.is_write(use.ir.op(use.node)) for p in state
               for use in program.resource_uses(program.main, (p, 0)))


def refuse_unplaced_markers(capture: Any, sites: list) -> None:
    """Every gradient capture marked must sit in the traced program, with its variable."""
    placed = {id(m) for _, m, _ in sites}
    for m in capture.markers:
        if id(m) not in placed:
            name = getattr(m.variable, "name", "?")
            raise UnsupportedGraphError(
                f"the gradient of variable {name!r} was taken in a function graphfreeze could "
                f"not locate in the traced program (marker {m.values!r}), so it cannot be "
                "masked; take the gradient in the step itself or in a tf.function it calls.")


def custom_gradient_nodes(program: Program) -> list[str]:
    return [f"{nd.op} node {nd.name!r}{_where(f)}" for f, nd in _nodedefs(program)
            if CUSTOM_GRADIENT_ATTR in nd.attr]


def refuse_undifferentiable(function: Any, custom: list[str]) -> None:
    """Forward mode: take the caller's gradient through the rewritten function once, in a
    throwaway trace, and refuse if a custom gradient cannot be rebuilt there."""
    specs = function.input_signature

    def probe(*flat):
        with tf.GradientTape() as tape:
            for t in flat:
                if t.dtype.is_floating:
                    tape.watch(t)
            out = function(*flat)
        targets = [t for t in tf.nest.flatten(out, expand_composites=True)
                   if isinstance(t, tf.Tensor) and t.dtype.is_floating]
        sources = [t for t in flat if t.dtype.is_floating] + list(tape.watched_variables())
        return tape.gradient(targets, sources) if targets and sources else []

    problem = None
    try:
        probed = tf.function(probe, input_signature=specs, autograph=False).get_concrete_function()
        # Built in a graph, the gradient function does not fail: it captures the tensors of
        # the original trace it refers to, and running it would fail.
        leaked = [e for e, _ in probed.graph.captures if tf.is_symbolic_tensor(e)]
        if leaked:
            problem = f"it refers to {leaked[0].name!r} of the original trace"
    except Exception as e:
        problem = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if problem:
        raise UnsupportedGraphError(
            f"this forward function uses tf.custom_gradient ({', '.join(custom[:3])}), whose "
            "Python gradient function cannot be rebuilt for the rewritten function, so the "
            f"caller's gradient through it would fail ({problem}). Rewrite the training step "
            "that takes the gradient instead (gf.freeze on it), or make the custom gradient "
            "use only its arguments (dy, and the inputs passed to it).")
