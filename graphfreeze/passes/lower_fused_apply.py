"""Run fused optimizer kernels that write a partly frozen variable on its trainable entries.

TF1 optimizers (`tf.compat.v1.train.*`) and tf_keras's legacy ones (Keras 2's
`OptimizerV2`) update a variable and its slots in one fused `ResourceApply*` kernel, which
cannot be guarded entry by entry from outside. For a partly frozen variable V (issue 14):

* frozen rows (`gf.Rows`, or any mask that varies along axis 0 only), outside XLA: the
  kernel becomes its `ResourceSparseApply*` counterpart (opkinds.SPARSE_APPLY) with
  `indices` the trainable rows and the gradient cut to them: when it comes straight from
  a weight-gradient product (through Identity ops and the gradient marker only), the
  product is computed for those rows (slice_products.py), else it is gathered. The kernel
  then never touches a frozen row of V or of a slot (S1, S4), and does the work of the
  trainable rows only (S3). The attrs (`use_nesterov`, `update_slots`, `multiply_linear_by_lr`)
  carry over: the sparse kernels have the same ones.
* otherwise (columns, entries; under `jit_compile`, where XLA has no sparse kernels; Adam,
  AdaMax, AddSign, PowerSign and plain gradient descent, which have no sparse form) the
  kernel is written out as what it computes (opkinds.LOWERED_APPLY, the formulas of
  tensorflow/core/kernels/training_ops.cc): reads of V and its slots, elementwise ops,
  and Assign* writes. `guard_writes` then guards V's write and `slice_updates` slices the
  update of V and of its slots to the trainable entries, exactly as for a Keras 3
  optimizer.

A variable a `gf.Scale` rule scales gets its fused kernels written out too, so that
`scale_writes` scales the update they write (its slots keep the unscaled values, as with a
Keras 3 optimizer). Fused kernels with neither form (Ftrl, proximal and DA variants on a
non-row mask, under XLA, or scaled) are refused by name before anything is edited.

The pass runs first: it adds writes, so it solves the dependence analysis again
(analysis/dependence.py) for the passes after it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.python.framework import op_def_registry

from .. import opkinds
from ..errors import UnsupportedGraphError
from ..ir import IR, Tensor
from ..plan import Plan
from ..program import Program
from ..rules import VariableFreeze
from ..variables import VariableInfo
from .build import Builder
from .masks import select_frozen, slug, trainable_indices
from .result import PassResult
from .slice_products import slice_product

PASS = "lower_fused_apply"
_ASSIGN = {"assign": "AssignVariableOp", "add": "AssignAddVariableOp",
           "sub": "AssignSubVariableOp"}


def lower_fused_apply(program: Program, plan: Plan) -> PassResult:
    start = program.edits
    jit = bool(plan.capture.jit_compile)
    targets: dict[str, tuple[VariableInfo, VariableFreeze | None, bool]] = {
        vf.variable.placeholder: (vf.variable, vf, False) for vf in plan.freezes if vf.partial}
    for vs in plan.scales:  # scale_writes scales Assign* writes, not fused kernels
        vf = plan.freeze_of(vs.variable.placeholder)
        if vf is None or not vf.full:
            targets[vs.variable.placeholder] = (vs.variable, vf, True)
    found: list[tuple[IR, str, VariableInfo, VariableFreeze | None, bool]] = []
    for placeholder, (var, vf, scaled) in targets.items():
        for ir, node, index in program.resource_uses(program.main, (placeholder, 0)):
            op = ir.op(node)
            if index != 0 or not op.startswith("ResourceApply"):
                continue  # a fused kernel using V as another variable's state: guard_writes
            sparse = not scaled and vf is not None and vf.axis == 0 and not jit \
                and op in opkinds.SPARSE_APPLY
            if not sparse and op not in opkinds.LOWERED_APPLY:
                raise UnsupportedGraphError(_refusal(op, node, var, vf, scaled, jit))
            found.append((ir, node, var, vf, sparse))
    for ir, node, var, vf, sparse in found:  # every kernel checked first: nothing half-applied
        if sparse:
            assert vf is not None  # sparse only for a partly frozen variable
            _to_sparse(ir, plan, node, vf)
        else:
            _lower(program, ir, plan, node, var, vf)
    if found and plan.dependence is not None:
        plan.dependence.solve_again()
    return PassResult(program, program.edits != start)


def _refusal(op: str, node: str, var: VariableInfo, vf: VariableFreeze | None, scaled: bool,
             jit: bool) -> str:
    lowered = ", ".join(sorted(k[len("ResourceApply"):] for k in opkinds.LOWERED_APPLY))
    if scaled:
        return (f"{op} node {node!r} writes {var.path!r}, which a gf.Scale rule scales; "
                f"graphfreeze scales fused kernels it can write out elementwise ({lowered}), "
                f"not {op}. Give the variable its own optimizer with a scaled learning rate, "
                "or use a Keras 3 optimizer.")
    assert vf is not None  # only a scaled variable comes without a freeze
    why = "XLA (jit_compile=True) has no ResourceSparseApply* kernels" if jit and \
        op in opkinds.SPARSE_APPLY else f"{op} has a sparse counterpart only for whole rows"
    return (f"{op} node {node!r} writes {var.path!r}, which is partly frozen "
            f"({', '.join(vf.rules)}); {why}, and graphfreeze writes out elementwise only "
            f"{lowered}. Freeze whole rows (gf.Rows) outside XLA, freeze the whole variable, "
            "or use a Keras 3 optimizer.")


def _builder(ir: IR, node: str, var: VariableInfo) -> Builder:
    return Builder(ir, PASS, node, f"graphfreeze/{PASS}/{slug(var.path)}")


def _input_names(op: str) -> list[str]:
    return [a.name for a in op_def_registry.get(op).input_arg]


def _to_sparse(ir: IR, plan: Plan, node: str, vf: VariableFreeze) -> None:
    op = ir.op(node)
    sparse = opkinds.SPARSE_APPLY[op]
    names = _input_names(op)
    at = names.index("grad" if "grad" in names else "delta")
    inputs = ir.inputs(node)
    b = _builder(ir, node, vf.variable)
    rows = trainable_indices(b, vf)
    sliced = (len(vf.indices(frozen=False)), *vf.variable.shape[1:])
    grad = slice_product(b, _source(ir, inputs[at]), 0, rows, sliced) \
        or b.gather_rows(inputs[at], rows, "grad_rows")
    new_inputs = [*inputs[:at], grad, rows, *inputs[at + 1:]]
    with ir.edit(node) as nd:
        nd.op = sparse
        nd.attr["Tindices"].type = tf.int32.as_datatype_enum
    ir.graph.nodes[node]["op"] = sparse
    ir.remove_inputs(node, range(len(inputs)))
    for k, (src, out) in enumerate(new_inputs):
        ir.graph.add_edge(src, node, k, src_output=out, dst_input=k, control=False)
    plan.notes.inserted.extend(b.created)
    plan.notes.sliced_writes.append(node)


def _source(ir: IR, tensor: Tensor) -> Tensor:
    """What `tensor` forwards unchanged: through Identity (the gradient marker among them)
    and IdentityN (output k is input k)."""
    while ir.op(tensor[0]) in ("Identity", "IdentityN"):
        inputs = ir.inputs(tensor[0])
        tensor = inputs[tensor[1] if ir.op(tensor[0]) == "IdentityN" else 0]
    return tensor


class _Math:
    """Elementwise arithmetic in a Builder's graph. A value is full-size (V's shape) when
    any input is; the rest are the kernel's scalars (its op definition requires them)."""

    def __init__(self, b: Builder, dtype: tf.DType, shape: tuple[int, ...]):
        self.b, self.dtype, self.shape = b, dtype, shape
        self.full: set[Tensor] = set()
        self.consts: dict[float, Tensor] = {}

    def const(self, value: float) -> Tensor:
        if value not in self.consts:
            self.consts[value] = self.b.const(f"c{len(self.consts)}", np.asarray(
                value, self.dtype.as_numpy_dtype), self.dtype)
        return self.consts[value]

    def mark_full(self, t: Tensor) -> Tensor:
        self.full.add(t)
        return t

    def _op(self, op: str, *xs: Tensor | float) -> Tensor:
        ts = [x if isinstance(x, tuple) else self.const(x) for x in xs]
        out = self.b.elementwise(op, ts, op.lower())
        full = any(t in self.full for t in ts)
        self.b.ir.set_shape(out, self.shape if full else ())
        return self.mark_full(out) if full else out

    def add(self, a, b): return self._op("AddV2", a, b)          # noqa: E704
    def sub(self, a, b): return self._op("Sub", a, b)            # noqa: E704
    def mul(self, a, b): return self._op("Mul", a, b)            # noqa: E704
    def div(self, a, b): return self._op("RealDiv", a, b)        # noqa: E704
    def max(self, a, b): return self._op("Maximum", a, b)        # noqa: E704
    def sqrt(self, a): return self._op("Sqrt", a)                # noqa: E704
    def rsqrt(self, a): return self._op("Rsqrt", a)              # noqa: E704
    def square(self, a): return self._op("Square", a)            # noqa: E704
    def abs(self, a): return self._op("Abs", a)                  # noqa: E704
    def sign(self, a): return self._op("Sign", a)                # noqa: E704
    def exp(self, a): return self._op("Exp", a)                  # noqa: E704

    def toward(self, s, target, rate):
        """s + (target - s) * rate, the kernels' moving average; returns (delta, new)."""
        delta = self.mul(self.sub(target, s), rate)
        return delta, self.add(s, delta)


Write = tuple[str, str, Tensor]  # (resource input name, "assign" | "add" | "sub", value)
Formula = Callable[[_Math, dict, dict], list[Write]]


def _gradient_descent(m: _Math, x: dict, a: dict) -> list[Write]:
    return [("var", "sub", m.mul(x["delta"], x["alpha"]))]


def _momentum(m: _Math, x: dict, a: dict) -> list[Write]:
    g, lr, mu = x["grad"], x["lr"], x["momentum"]
    accum = m.add(m.mul(x["accum"], mu), g)
    step = m.add(m.mul(g, lr), m.mul(m.mul(accum, mu), lr)) if a["use_nesterov"].b \
        else m.mul(accum, lr)
    return [("accum", "assign", accum), ("var", "sub", step)]


def _keras_momentum(m: _Math, x: dict, a: dict) -> list[Write]:
    g, lr, mu = x["grad"], x["lr"], x["momentum"]
    accum = m.sub(m.mul(x["accum"], mu), m.mul(g, lr))
    step = m.sub(m.mul(accum, mu), m.mul(g, lr)) if a["use_nesterov"].b else accum
    return [("accum", "assign", accum), ("var", "add", step)]


def _adam_moments(m: _Math, x: dict) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Adam's step size and first and second moment updates (deltas and new values)."""
    g = x["grad"]
    alpha = m.div(m.mul(x["lr"], m.sqrt(m.sub(1.0, x["beta2_power"]))),
                  m.sub(1.0, x["beta1_power"]))
    dm, new_m = m.toward(x["m"], g, m.sub(1.0, x["beta1"]))
    dv, new_v = m.toward(x["v"], m.square(g), m.sub(1.0, x["beta2"]))
    return alpha, dm, new_m, dv, new_v


def _adam(m: _Math, x: dict, a: dict) -> list[Write]:
    alpha, dm, new_m, dv, new_v = _adam_moments(m, x)
    if a["use_nesterov"].b:
        mixed = m.add(m.mul(x["grad"], m.sub(1.0, x["beta1"])), m.mul(x["beta1"], new_m))
    else:
        mixed = new_m
    step = m.div(m.mul(mixed, alpha), m.add(m.sqrt(new_v), x["epsilon"]))
    return [("m", "add", dm), ("v", "add", dv), ("var", "sub", step)]


def _adam_amsgrad(m: _Math, x: dict, a: dict) -> list[Write]:
    alpha, dm, new_m, dv, new_v = _adam_moments(m, x)
    vhat = m.max(x["vhat"], new_v)
    step = m.div(m.mul(new_m, alpha), m.add(m.sqrt(vhat), x["epsilon"]))
    return [("m", "add", dm), ("v", "add", dv), ("vhat", "assign", vhat), ("var", "sub", step)]


def _adamax(m: _Math, x: dict, a: dict) -> list[Write]:
    g = x["grad"]
    dm, new_m = m.toward(x["m"], g, m.sub(1.0, x["beta1"]))
    v = m.max(m.mul(x["v"], x["beta2"]), m.abs(g))
    rate = m.div(x["lr"], m.sub(1.0, x["beta1_power"]))
    step = m.mul(rate, m.div(new_m, m.add(v, x["epsilon"])))
    return [("m", "add", dm), ("v", "assign", v), ("var", "sub", step)]


def _rmsprop(m: _Math, x: dict, a: dict, centered: bool = False) -> list[Write]:
    g, decay = x["grad"], m.sub(1.0, x["rho"])
    dms, ms = m.toward(x["ms"], m.square(g), decay)
    writes: list[Write] = [("ms", "add", dms)]
    if centered:
        dmg, mg = m.toward(x["mg"], g, decay)
        writes.append(("mg", "add", dmg))
        denom = m.add(m.sub(ms, m.square(mg)), x["epsilon"])
    else:
        denom = m.add(ms, x["epsilon"])
    mom = m.add(m.mul(x["mom"], x["momentum"]), m.div(m.mul(g, x["lr"]), m.sqrt(denom)))
    return [*writes, ("mom", "assign", mom), ("var", "sub", mom)]


def _adagrad(m: _Math, x: dict, a: dict, v2: bool = False) -> list[Write]:
    g = x["grad"]
    writes: list[Write] = []
    accum = x["accum"]
    if a["update_slots"].b:
        sq = m.square(g)
        writes.append(("accum", "add", sq))
        accum = m.add(accum, sq)
    step = m.div(m.mul(g, x["lr"]), m.add(m.sqrt(accum), x["epsilon"])) if v2 \
        else m.mul(m.mul(g, x["lr"]), m.rsqrt(accum))
    return [*writes, ("var", "sub", step)]


def _adadelta(m: _Math, x: dict, a: dict) -> list[Write]:
    g, rho, eps = x["grad"], x["rho"], x["epsilon"]
    decay = m.sub(1.0, rho)
    accum = m.add(m.mul(x["accum"], rho), m.mul(m.square(g), decay))
    update = m.mul(m.mul(m.sqrt(m.add(x["accum_update"], eps)), m.rsqrt(m.add(accum, eps))), g)
    accum_update = m.add(m.mul(x["accum_update"], rho), m.mul(m.square(update), decay))
    return [("accum", "assign", accum), ("var", "sub", m.mul(update, x["lr"])),
            ("accum_update", "assign", accum_update)]


def _sign(m: _Math, x: dict, a: dict, power: bool = False) -> list[Write]:
    g, beta = x["grad"], x["beta"]
    new_m = m.add(m.mul(x["m"], beta), m.mul(g, m.sub(1.0, beta)))
    agree = m.mul(m.sign(g), m.sign(new_m))
    if power:
        scale = m.exp(m.mul(m.mul(x["logbase"], x["sign_decay"]), agree))
    else:
        scale = m.add(x["alpha"], m.mul(x["sign_decay"], agree))
    return [("m", "assign", new_m), ("var", "sub", m.mul(m.mul(x["lr"], scale), g))]


FORMULAS: dict[str, Formula] = {
    "ResourceApplyGradientDescent": _gradient_descent,
    "ResourceApplyMomentum": _momentum,
    "ResourceApplyKerasMomentum": _keras_momentum,
    "ResourceApplyAdam": _adam,
    "ResourceApplyAdamWithAmsgrad": _adam_amsgrad,
    "ResourceApplyAdaMax": _adamax,
    "ResourceApplyRMSProp": _rmsprop,
    "ResourceApplyCenteredRMSProp": lambda m, x, a: _rmsprop(m, x, a, centered=True),
    "ResourceApplyAdagrad": lambda m, x, a: _adagrad(m, x, a),
    "ResourceApplyAdagradV2": lambda m, x, a: _adagrad(m, x, a, v2=True),
    "ResourceApplyAdadelta": _adadelta,
    "ResourceApplyAddSign": _sign,
    "ResourceApplyPowerSign": lambda m, x, a: _sign(m, x, a, power=True),
}
assert set(FORMULAS) == opkinds.LOWERED_APPLY


def _lower(program: Program, ir: IR, plan: Plan, node: str, var: VariableInfo,
           vf: VariableFreeze | None) -> None:
    op = ir.op(node)
    op_def = op_def_registry.get(op)
    inputs = dict(zip(_input_names(op), ir.inputs(node)))
    attrs = ir.nodedef(node).attr
    dtype = tf.as_dtype(attrs["T"].type)
    shape = tuple(var.shape)
    b = _builder(ir, node, var)
    m = _Math(b, dtype, shape)
    resources = {a.name for a in op_def.input_arg if a.type == types_pb2.DT_RESOURCE}
    values: dict[str, Tensor] = {}
    for name, t in inputs.items():  # every read before any write, as in the kernel
        values[name] = m.mark_full(b.read(t, dtype, shape, f"read_{name}")) \
            if name in resources else t
    gradient = "grad" if "grad" in values else "delta"
    m.mark_full(values[gradient])
    known = plan.capture.variable_by_placeholder
    writes = []
    for name, kind, value in FORMULAS[op](m, values, attrs):
        owners = program.resource_owners(ir, inputs[name])
        if vf is not None and name != "var" and not (owners and owners <= known.keys()):
            # a slot no optimizer object names (raw ops on plain tf.Variables): slice_updates
            # cannot know it is V's, so its frozen entries are kept here (S4)
            value = select_frozen(b, vf, values[name] if kind == "assign" else 0.0, value)
        writes.append(ir.add_node(
            f"{b.prefix}/{name}_{kind}", _ASSIGN[kind], [inputs[name], value],
            attrs={"dtype": dtype}, device=ir.device(node), after=b.after,
            inserted_by=PASS))
    # every read before any write, also once slice_updates replaces a read by a gather of
    # the trainable entries (it keeps the read's control edges): Adagrad's step reads the
    # accumulator it also adds to
    reads = [values[name][0] for name in resources]
    for src in [*ir.control_inputs(node), *reads]:
        for w in writes:
            ir.add_control_edge(src, w)
    for _, dst, data in list(ir.graph.out_edges(node, data=True)):
        if data["control"]:
            for w in writes:
                ir.add_control_edge(w, dst)
    ir.remove_nodes([node])
    plan.notes.inserted.extend([*b.created, *writes])
