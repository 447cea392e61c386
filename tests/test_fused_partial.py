"""Fused optimizer kernels (TF1, tf_keras legacy) on partly frozen variables (issue 14 item 2):
a ResourceSparseApply* at the trainable rows, or the kernel written out elementwise and
sliced; frozen entries of the variable and of every slot bitwise unchanged (S1, S4), the
trainable ones equal the seed-002 mask under the same kernel (S2)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_step
from references import entry_stop_gradients

import graphfreeze as gf

RNG = np.random.default_rng(0)
X = RNG.normal(size=(4, 6)).astype("float32")
T = RNG.normal(size=(4, 5)).astype("float32")
SHAPE = (6, 5)

# kernel -> (slots, scalar inputs, attrs); the gradient is `grad` (`delta` for descent)
ADAM = {"beta1_power": 0.9 ** 3, "beta2_power": 0.999 ** 3, "lr": 0.05, "beta1": 0.9,
        "beta2": 0.999, "epsilon": 1e-7}
KERNELS = {
    "GradientDescent": ([], {"alpha": 0.1}, {}),
    "Momentum": (["accum"], {"lr": 0.1, "momentum": 0.9}, {}),
    "Momentum_nesterov": (["accum"], {"lr": 0.1, "momentum": 0.9}, {"use_nesterov": True}),
    "KerasMomentum": (["accum"], {"lr": 0.1, "momentum": 0.9}, {}),
    "KerasMomentum_nesterov": (["accum"], {"lr": 0.1, "momentum": 0.9}, {"use_nesterov": True}),
    "Adam": (["m", "v"], ADAM, {}),
    "Adam_nesterov": (["m", "v"], ADAM, {"use_nesterov": True}),
    "AdamWithAmsgrad": (["m", "v", "vhat"], ADAM, {}),
    "AdaMax": (["m", "v"], {k: v for k, v in ADAM.items() if k != "beta2_power"}, {}),
    "RMSProp": (["ms", "mom"], {"lr": 0.05, "rho": 0.9, "momentum": 0.5, "epsilon": 1e-7}, {}),
    "CenteredRMSProp": (["mg", "ms", "mom"], {"lr": 0.05, "rho": 0.9, "momentum": 0.5,
                                              "epsilon": 1e-7}, {}),
    "Adagrad": (["accum"], {"lr": 0.1}, {}),
    "Adagrad_no_slot_update": (["accum"], {"lr": 0.1}, {"update_slots": False}),
    "AdagradV2": (["accum"], {"lr": 0.1, "epsilon": 1e-7}, {}),
    "Adadelta": (["accum", "accum_update"], {"lr": 1.0, "rho": 0.95, "epsilon": 1e-6}, {}),
    "AddSign": (["m"], {"lr": 0.1, "alpha": 1.0, "sign_decay": 0.9, "beta": 0.9}, {}),
    "PowerSign": (["m"], {"lr": 0.1, "logbase": float(np.e), "sign_decay": 0.9, "beta": 0.9}, {}),
    # sparse counterpart only (rows)
    "Ftrl": (["accum", "linear"], {"lr": 0.1, "l1": 0.01, "l2": 0.01, "lr_power": -0.5}, {}),
    "FtrlV2": (["accum", "linear"], {"lr": 0.1, "l1": 0.01, "l2": 0.01, "l2_shrinkage": 0.01,
                                     "lr_power": -0.5}, {"multiply_linear_by_lr": True}),
    "ProximalAdagrad": (["accum"], {"lr": 0.1, "l1": 0.01, "l2": 0.01}, {}),
    "ProximalGradientDescent": ([], {"alpha": 0.1, "l1": 0.01, "l2": 0.01}, {}),
    "AdagradDA": (["gradient_accumulator", "gradient_squared_accumulator"],
                  {"lr": 0.1, "l1": 0.01, "l2": 0.01}, {}),
}
SPARSE_ONLY = ["Ftrl", "FtrlV2", "ProximalAdagrad", "ProximalGradientDescent", "AdagradDA"]
WITH_SPARSE = {"Momentum", "KerasMomentum", "RMSProp", "CenteredRMSProp", "Adagrad", "AdagradV2",
               "Adadelta", *SPARSE_ONLY}


def _rules(kind, name="w"):
    frozen = np.zeros(SHAPE, bool)
    if kind == "rows":
        frozen[[0, 2, 5]] = True
        return [gf.Rows(name, [0, 2, 5])], frozen
    if kind == "columns":
        frozen[:, [1, 3]] = True
        return [gf.Columns(name, [1, 3])], frozen
    frozen = np.random.default_rng(3).random(SHAPE) < 0.5
    return [gf.Mask(name, frozen)], frozen


class _Kernel:
    """A variable `w` and its slots (built up: positive accumulators, signed moments)
    updated by one raw fused kernel from the gradient of a loss linear in `w`, so that
    the gradient does not depend on the weights and the reference may move its frozen
    entries without changing what its trainable entries see."""

    def __init__(self, key, prefix=""):
        self.op = "ResourceApply" + key.split("_")[0]
        self.slots_names, self.scalars, self.attrs = KERNELS[key]
        rng = np.random.default_rng(1)
        self.w = tf.Variable(rng.normal(size=SHAPE).astype("float32"), name=prefix + "w")
        signed = ("m", "mg", "linear", "gradient_accumulator")
        self.slots = [tf.Variable((rng.uniform(0.1, 1.0, SHAPE) * (0.2 if s == "mg" else 1) *
                                   (rng.choice([-1, 1], SHAPE) if s in signed else 1)
                                   ).astype("float32"), name=prefix + s)
                      for s in self.slots_names]

    def apply(self, grad):
        kwargs = {s: v.handle for s, v in zip(self.slots_names, self.slots)}
        kwargs.update({k: tf.constant(v, tf.float32) for k, v in self.scalars.items()})
        if self.op == "ResourceApplyAdagradDA":
            kwargs["global_step"] = tf.constant(3, tf.int64)
        gradient = "delta" if self.op in ("ResourceApplyGradientDescent",
                                          "ResourceApplyProximalGradientDescent") else "grad"
        getattr(tf.raw_ops, self.op)(var=self.w.handle, **{gradient: grad}, **kwargs,
                                     **self.attrs)

    def step(self, keep=None):
        def step(x):
            with tf.GradientTape() as tape:
                w = self.w if keep is None else entry_stop_gradients(self.w, keep)
                loss = tf.reduce_sum((x @ w) * T)
            self.apply(tape.gradient(loss, self.w))
            return loss
        return step

    def state(self):
        return [v.numpy().copy() for v in [self.w, *self.slots]]


def _fused_on(rw, placeholder):
    return sorted(rw.ir.op(n) for n, op in rw.graph.nodes(data="op")
                  if op.startswith(("ResourceApply", "ResourceSparseApply"))
                  and rw.ir.inputs(n)[0][0] == placeholder)


# kernels with no elementwise form only for rows: on the others they are refused
# (test_refused_by_name)
@pytest.mark.parametrize("key, kind", [
    (key, kind) for key in sorted(KERNELS) for kind in ("rows", "columns", "mask")
    if kind == "rows" or key.split("_")[0] not in SPARSE_ONLY])
def test_raw_kernel_on_trainable_entries_equals_seed002(key, kind):
    _raw_case(key, kind)


@pytest.mark.parametrize("key", sorted(k for k in KERNELS if k.split("_")[0] not in SPARSE_ONLY))
def test_written_out_kernels_compile_with_xla(key):
    """Under jit_compile every kernel is written out (XLA has no sparse kernels), and what
    is inserted compiles."""
    _raw_case(key, "rows", jit=True)


def _raw_case(key, kind, jit=False):
    kernel, reference = _Kernel(key), _Kernel(key, "ref_")
    rules, frozen = _rules(kind)
    before = kernel.state()
    step = tf.function(kernel.step(), jit_compile=True) if jit else kernel.step()
    rw = gf.rewrite(step, rules, X)
    # the reference runs TF's own kernel (AdamWithAmsgrad has none under XLA)
    ref_step = tf.function(reference.step(tf.constant((~frozen).astype("float32"))))
    for _ in range(3):
        rw(X)
        ref_step(X)
    for got, was, want in zip(kernel.state(), before, reference.state()):
        assert np.array_equal(got[frozen], was[frozen])                  # S1, S4: bitwise
        np.testing.assert_allclose(got[~frozen], want[~frozen], rtol=2e-5, atol=1e-6)  # S2
    assert not np.array_equal(kernel.state()[0][~frozen], before[0][~frozen])
    placeholder = rw.plan.freezes[0].variable.placeholder
    base = key.split("_")[0]
    if kind == "rows" and base in WITH_SPARSE and not jit:
        assert _fused_on(rw, placeholder) == ["ResourceSparseApply" + base]
    else:  # written out, then sliced (rows, columns) or guarded (a dense mask)
        assert _fused_on(rw, placeholder) == []
    if kind != "mask":
        assert rw.plan.notes.sliced_writes and not rw.plan.notes.unsliced
    assert rw.function._jit_compile is (True if jit else None)


@pytest.mark.parametrize("key, kind, jit, match", [
    ("Ftrl", "columns", False, r"ResourceApplyFtrl .*'w'.*partly frozen.*gf\.Rows"),
    ("ProximalAdagrad", "mask", False, r"ResourceApplyProximalAdagrad .*'w'.*Freeze whole rows"),
    ("AdagradDA", "rows", True, r"ResourceApplyAdagradDA .*'w'.*XLA"),
])
def test_refused_by_name(key, kind, jit, match):
    kernel = _Kernel(key)
    rules, _ = _rules(kind)
    before = kernel.state()
    step = tf.function(kernel.step(), jit_compile=True) if jit else kernel.step()
    with pytest.raises(gf.UnsupportedGraphError, match=match):
        gf.rewrite(step, rules, X)
    assert all(np.array_equal(a, b) for a, b in zip(kernel.state(), before))


@pytest.mark.parametrize("key", ["GradientDescent", "Momentum", "Adam", "AdaMax", "AdagradV2",
                                 "Adadelta"])
def test_scaled_fused_kernel_equals_a_scaled_learning_rate(key):
    """gf.Scale on a variable a fused kernel writes: the kernel is written out and its update
    scaled, which for these kernels (the step linear in the rate, the slots not depending on
    it) is the same kernel with the rate times the factor."""
    kernel, reference = _Kernel(key), _Kernel(key, "ref_")
    rate = "alpha" if "alpha" in reference.scalars else "lr"
    reference.scalars = {**reference.scalars, rate: reference.scalars[rate] * 0.5}
    rw = gf.rewrite(kernel.step(), [gf.Scale("w", 0.5)], X)
    ref_step = tf.function(reference.step())
    for _ in range(3):
        rw(X)
        ref_step(X)
    for got, want in zip(kernel.state(), reference.state()):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert rw.plan.notes.scaled_writes
    assert _fused_on(rw, rw.plan.scales[0].variable.placeholder) == []


# ----------------------------------------------------------------------- tf_keras models

tf_keras = pytest.importorskip("tf_keras")
LEGACY = {
    "sgd_momentum": lambda: tf_keras.optimizers.legacy.SGD(0.05, momentum=0.9),
    "adam": lambda: tf_keras.optimizers.legacy.Adam(1e-2),
    "rmsprop": lambda: tf_keras.optimizers.legacy.RMSprop(1e-2, momentum=0.5),
    "rmsprop_centered": lambda: tf_keras.optimizers.legacy.RMSprop(1e-2, momentum=0.5,
                                                                    centered=True),
    "adagrad": lambda: tf_keras.optimizers.legacy.Adagrad(0.1),
}
SPARSE_OP = {"sgd_momentum": "ResourceSparseApplyKerasMomentum", "adam": None,
             "rmsprop": "ResourceSparseApplyRMSProp",
             "rmsprop_centered": "ResourceSparseApplyCenteredRMSProp",
             "adagrad": "ResourceSparseApplyAdagradV2"}
DATA = [(RNG.normal(size=(16, 6)).astype("float32"), RNG.normal(size=(16, 3)).astype("float32"))
        for _ in range(6)]
H2 = (8, 8)


def _h2_rules(kind):
    frozen = np.zeros(H2, bool)
    if kind == "rows":
        frozen[[0, 3, 5]] = True
        return [gf.Rows("h2/kernel", [0, 3, 5])], frozen
    if kind == "columns":
        frozen[:, 2:5] = True
        return [gf.Columns("h2/kernel", slice(2, 5))], frozen
    frozen = np.random.default_rng(5).random(H2) < 0.5
    return [gf.Mask("h2/kernel", frozen)], frozen


class MaskedDense(tf_keras.layers.Dense):
    """The seed-002 mask on the kernel by hand; `keep` (1 = trains) starts all ones, so
    the model trains like a plain one until the mask is set."""

    def build(self, input_shape):
        super().build(input_shape)
        self.keep = tf.Variable(tf.ones(self.kernel.shape), trainable=False, name="keep")

    def call(self, inputs):
        kernel = entry_stop_gradients(self.kernel, self.keep)
        return self.activation(tf.matmul(inputs, kernel) + self.bias)


def _model(masked=False):
    tf_keras.utils.set_random_seed(0)
    middle = MaskedDense if masked else tf_keras.layers.Dense
    return tf_keras.Sequential(  # trainable layers below and above the partly frozen one
        [tf_keras.layers.Dense(8, activation="tanh", name="h1", input_shape=(6,)),
         middle(8, activation="tanh", name="h2"), tf_keras.layers.Dense(3, name="out")])


def _step(model, optimizer):
    return make_step(model, optimizer, lambda y, p: tf.reduce_mean((p - y) ** 2))


def _slots(optimizer, variable):
    return [optimizer.get_slot(variable, n) for n in optimizer.get_slot_names()]


def _wrap(jit=False, strategy=None):
    """How a step runs: a tf.function (jit-compiled), under `strategy` on every replica."""
    def wrap(step):
        if strategy is not None:
            return tf.function(lambda x, y: strategy.reduce(
                "SUM", strategy.run(step, args=(x, y)), axis=None), jit_compile=jit or None)
        return tf.function(step, jit_compile=jit or None)
    return wrap


def _pair(make_opt, frozen, wrap, pause_slots=True, scope=contextlib.nullcontext):
    """The model and the seed-002 reference, both after three plain steps (state built up
    before freezing) and then given the model's weights and slots; the reference's slots
    then pause at frozen entries as zeros, under which its update there is exactly 0
    (with its own it would keep moving them)."""
    with scope():
        model, reference = _model(), _model(masked=True)
        opt, ref_opt = make_opt(), make_opt()
    plain, ref_step = wrap(_step(model, opt)), wrap(_step(reference, ref_opt))
    for x, y in DATA[:3]:
        plain(x, y)
        ref_step(x, y)
    for v, r in zip(model.trainable_variables, reference.trainable_variables):  # one start
        r.assign(v)
        for a, b in zip(_slots(opt, v), _slots(ref_opt, r)):
            b.assign(a)
    ref_h2 = reference.get_layer("h2")
    ref_h2.keep.assign((~frozen).astype("float32"))
    for slot in _slots(ref_opt, ref_h2.kernel) if pause_slots else ():
        slot.assign(np.where(frozen, 0, slot.numpy()))
    return model, reference, opt, ref_opt, ref_step


def _check(model, reference, opt, ref_opt, frozen, before):
    h2, ref_h2 = model.get_layer("h2"), reference.get_layer("h2")
    for got, was, want in zip([h2.kernel, *_slots(opt, h2.kernel)], before,
                              [ref_h2.kernel, *_slots(ref_opt, ref_h2.kernel)]):
        got = got.numpy()
        assert np.array_equal(got[frozen], was[frozen])                   # S1, S4
        assert not np.array_equal(got[~frozen], was[~frozen])             # it trained
        np.testing.assert_allclose(got[~frozen], want.numpy()[~frozen], rtol=1e-5, atol=1e-5)
    for name in ("h1", "out"):
        for a, b in zip(model.get_layer(name).weights, reference.get_layer(name).weights):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h2.bias.numpy(), ref_h2.bias.numpy(), rtol=1e-5, atol=1e-5)


def _run(make_opt, kind, jit=False, pause_slots=True, strategy=None):
    """Freeze h2/kernel by `kind` after three plain steps, train both sides three more,
    check against the reference (under `strategy`: every replica); the rewritten step."""
    rules, frozen = _h2_rules(kind)
    wrap = _wrap(jit, strategy)
    scope = contextlib.nullcontext if strategy is None else strategy.scope
    model, reference, opt, ref_opt, ref_step = _pair(make_opt, frozen, wrap, pause_slots, scope)
    kernel = model.get_layer("h2").kernel
    state = [kernel, *_slots(opt, kernel)]
    before = [v.numpy().copy() for v in state]
    step = _step(model, opt)
    rw = gf.rewrite(wrap(step) if jit or strategy else step, rules, *DATA[0])
    for x, y in DATA[3:]:
        rw(x, y)
        ref_step(x, y)
    _check(model, reference, opt, ref_opt, frozen, before)
    for v, was in zip(state, before):  # S1, S4 on every replica
        for component in getattr(v, "values", [v]):
            assert np.array_equal(component.numpy()[frozen], was[frozen]), component.device
    return rw


@pytest.mark.parametrize("kind", ["rows", "columns", "mask"])
@pytest.mark.parametrize("opt_name", sorted(LEGACY))
def test_tf_keras_legacy_optimizer_on_a_partly_frozen_middle_kernel(opt_name, kind):
    rw = _run(LEGACY[opt_name], kind)
    fused = _fused_on(rw, rw.plan.freezes[0].variable.placeholder)
    if kind == "rows" and SPARSE_OP[opt_name]:
        assert fused == [SPARSE_OP[opt_name]]
        # the weight gradient is computed for the trainable rows only
        products = [d["shapes"][0] for _, d in rw.graph.nodes(data=True) if d["op"] == "MatMul"]
        assert H2 not in products and (5, 8) in products, products
    else:
        assert fused == []


def test_tf_keras_rows_under_xla_are_written_out_and_sliced():
    """XLA has no ResourceSparseApply* kernels: under jit_compile the momentum kernel is
    written out and its update scattered at the trainable rows."""
    rw = _run(LEGACY["sgd_momentum"], "rows", jit=True)
    assert rw.function._jit_compile is True
    ops = {rw.ir.op(n) for n in rw.plan.notes.sliced_writes}
    assert ops == {"ResourceScatterAdd", "ResourceScatterUpdate"}, ops
    assert not [op for _, op in rw.graph.nodes(data="op") if op.startswith("ResourceSparseApply")]


V1 = {"momentum": (lambda: tf.compat.v1.train.MomentumOptimizer(0.05, 0.9),
                   ["ResourceSparseApplyMomentum"]),
      "gradient_descent": (lambda: tf.compat.v1.train.GradientDescentOptimizer(0.05), []),
      "adam": (lambda: tf.compat.v1.train.AdamOptimizer(1e-2), []),
      "rmsprop": (lambda: tf.compat.v1.train.RMSPropOptimizer(1e-2, momentum=0.5),
                  ["ResourceSparseApplyRMSProp"]),
      "adagrad": (lambda: tf.compat.v1.train.AdagradOptimizer(0.1),
                  ["ResourceSparseApplyAdagrad"])}


@pytest.mark.parametrize("opt_name", sorted(V1))
def test_tf_compat_v1_optimizers(opt_name):
    make, want = V1[opt_name]
    # Adagrad (no epsilon) divides by its accumulator: a zero one would be 0/0 in the
    # reference; with the gradient 0 its update at frozen entries is 0 anyway
    rw = _run(make, "rows", pause_slots=opt_name != "adagrad")
    assert _fused_on(rw, rw.plan.freezes[0].variable.placeholder) == want


@pytest.mark.parametrize("kind", ["rows", "columns"])
def test_tf_keras_fit_with_a_legacy_optimizer(kind):
    """gf.keras.freeze in tf_keras's own fit, momentum built up before freezing."""
    rules, frozen = _h2_rules(kind)
    model, reference, opt, ref_opt, _ = _pair(LEGACY["sgd_momentum"], frozen, _wrap())
    kernel = model.get_layer("h2").kernel
    before = [v.numpy().copy() for v in [kernel, *_slots(opt, kernel)]]
    model.compile(optimizer=opt, loss="mse")
    reference.compile(optimizer=ref_opt, loss="mse")
    gf.keras.freeze(model, *rules)
    x, y = (np.concatenate(d) for d in zip(*DATA[3:]))
    fit = {"batch_size": 16, "epochs": 2, "shuffle": False, "verbose": 0}
    history, ref_history = model.fit(x, y, **fit), reference.fit(x, y, **fit)
    _check(model, reference, opt, ref_opt, frozen, before)
    np.testing.assert_allclose(history.history["loss"], ref_history.history["loss"], rtol=1e-5)
    rw = gf.keras.rewritten(model)
    want = ["ResourceSparseApplyKerasMomentum"] if kind == "rows" else []
    assert _fused_on(rw, rw.plan.freezes[0].variable.placeholder) == want


@pytest.mark.parametrize("kind", ["rows", "columns"])
def test_fused_kernel_in_cond_branches(kind):
    """A LossScaleOptimizer applies the update inside `cond` branches (function bodies): the
    sparse kernel there, or the written-out one guarded (bodies are not sliced)."""
    rw = _run(lambda: tf_keras.mixed_precision.LossScaleOptimizer(LEGACY["sgd_momentum"]()),
              kind)
    bodies = [op for body in rw.program.bodies.values() for _, op in body.graph.nodes(data="op")]
    if kind == "rows":
        assert "ResourceSparseApplyKerasMomentum" in bodies
    else:
        assert rw.plan.notes.unsliced and "ResourceApplyKerasMomentum" in bodies  # other layers


@pytest.mark.parametrize("opt_name, kind", [("sgd_momentum", "rows"), ("adam", "columns")])
def test_under_mirrored_strategy(opt_name, kind):
    from conftest import mirrored

    rw = _run(LEGACY[opt_name], kind, strategy=mirrored())
    sparse = [op for _, op in rw.graph.nodes(data="op") if op.startswith("ResourceSparseApply")]
    assert len(sparse) == (2 if kind == "rows" else 0)  # one per replica
