"""More sliced weight-gradient kinds (issue 14 item 1): bias gradients (BiasAddGrad under
NHWC and NCHW, under the Reshapes of a Keras Conv2D, the Sum of a plain `x + b`),
DepthwiseConv2D filter gradients (multipliers, input channels) and batched matmuls
(`tf.matmul` of a rank-3 input). Each partly frozen layer sits between trainable ones; Adam
has built up its moments before freezing. The reference is the seed-002 stop-gradient mask
on a forward pass written by hand with raw TF ops; the plain step computes the full-size
gradient op, the rewritten one only its trainable slice."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batches, make_step
from references import entry_stop_gradients, keep_of

import graphfreeze as gf

N = 4  # batch


class NCHWBias(keras.layers.Layer):
    """tanh(bias_add(x, b)) over channels-first [batch, channels, length]."""

    def build(self, shape):
        self.bias = self.add_weight(shape=(shape[1],), name="bias", initializer="random_normal")

    def call(self, x):
        return tf.tanh(tf.nn.bias_add(x, self.bias, data_format="NCHW"))


class PlainAffine(keras.layers.Layer):
    """tanh(tf.matmul(x, w) [+ b]) with TF's own operators: the bias gradient is Sum +
    Reshape; for a [batch, seq, d] input the matmul is a BatchMatMulV2 that broadcasts w."""

    def __init__(self, units, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.units, self.use_bias = units, use_bias

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], self.units), name="w")
        if self.use_bias:
            self.bias = self.add_weight(shape=(self.units,), name="bias", initializer="random_normal")

    def call(self, x):
        y = tf.matmul(x, self.w)
        return tf.tanh(y + self.bias if self.use_bias else y)


class HeadMatMul(keras.layers.Layer):
    """tanh(tf.matmul(x, w)) per head: [heads, batch, d] @ w [heads, d, out] (a BatchMatMulV2
    whose batch axis is w's axis 0), from and back to [batch, heads, ...]."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[1], shape[2], 4), name="w")

    def call(self, x):
        return tf.transpose(tf.tanh(tf.matmul(tf.transpose(x, (1, 0, 2)), self.w)), (1, 0, 2))


def _conv(x, k, b):
    return tf.tanh(tf.nn.conv2d(x, k, 1, "SAME") + b)


def _depthwise(x, k, b):
    return tf.tanh(tf.nn.depthwise_conv2d(x, k, [1, 1, 1, 1], "SAME") + b)


def _flat_dense(h, p, name):
    return tf.reshape(h, (N, -1)) @ p[f"{name}/kernel"] + p[f"{name}/bias"]


@dataclass
class Case:
    layers: Callable[[], list]  # the Keras model (input first)
    forward: Callable[[dict, tf.Tensor], tf.Tensor]  # the same model by hand
    x: tuple
    y: tuple
    rules: list
    frozen: dict  # variable path -> frozen mask
    op: str
    full: tuple  # the gradient op's output shape in the plain step
    sliced: tuple  # ... and in the rewritten one
    # (op, full, sliced) where an older Keras traces it otherwise (Keras 3.3 adds a bias
    # with AddV2: its gradient is a Sum kept at rank, not BiasAddGrad)
    older: tuple | None = None


def _columns(shape, columns, axis=-1):
    frozen = np.zeros(shape, bool)
    index = [slice(None)] * len(shape)
    index[axis] = columns
    frozen[tuple(index)] = True
    return frozen


def _dense_layers():
    return [keras.Input((5,)), keras.layers.Dense(7, "tanh", name="below"),
            keras.layers.Dense(6, "tanh", name="mid"), keras.layers.Dense(3, name="above")]


def _conv_layer(filters, name):
    return keras.layers.Conv2D(filters, 3, padding="same", activation="tanh", name=name)


def _conv_layers():
    return [keras.Input((6, 6, 2)), _conv_layer(4, "below"), _conv_layer(5, "mid"),
            keras.layers.Flatten(), keras.layers.Dense(3, name="above")]


def _conv_forward(p, x):
    return _flat_dense(_conv(_conv(x, p["below/kernel"], p["below/bias"]),
                             p["mid/kernel"], p["mid/bias"]), p, "above")


def _depthwise_layers():
    return [keras.Input((6, 6, 2)), _conv_layer(4, "below"),
            keras.layers.DepthwiseConv2D(3, depth_multiplier=3, padding="same", activation="tanh",
                                         name="mid"),
            keras.layers.Flatten(), keras.layers.Dense(3, name="above")]


def _depthwise_forward(p, x):
    return _flat_dense(_depthwise(_conv(x, p["below/kernel"], p["below/bias"]),
                                  p["mid/kernel"], p["mid/bias"]), p, "above")


def _seq_layers():
    return [keras.Input((7, 5)), keras.layers.Dense(8, "tanh", name="below"),
            PlainAffine(6, use_bias=False, name="mid"),
            keras.layers.Flatten(), keras.layers.Dense(3, name="above")]


def _seq_forward(p, x):
    h = tf.tanh(tf.einsum("nsi,io->nso", x, p["below/kernel"]) + p["below/bias"])
    return _flat_dense(tf.tanh(tf.einsum("nsi,io->nso", h, p["mid/w"])), p, "above")


CASES = {
    # a grown Dense: its old units 1, 4 (kernel columns and bias entries) frozen
    "dense_bias": Case(
        _dense_layers,
        lambda p, x: tf.tanh(tf.tanh(x @ p["below/kernel"] + p["below/bias"]) @ p["mid/kernel"]
                             + p["mid/bias"]) @ p["above/kernel"] + p["above/bias"],
        (N, 5), (N, 3), [gf.Columns("mid/*", [1, 4])],
        {"mid/kernel": _columns((7, 6), [1, 4]), "mid/bias": _columns((6,), [1, 4])},
        "BiasAddGrad", (6,), (4,), ("Sum", (1, 6), (1, 4))),
    # Keras's Conv2D: BiasAddGrad under two Reshapes
    "conv_bias": Case(
        _conv_layers, _conv_forward,
        (N, 6, 6, 2), (N, 3), [gf.Columns("mid/*", [0, 3])],
        {"mid/kernel": _columns((3, 3, 4, 5), [0, 3]), "mid/bias": _columns((5,), [0, 3])},
        "BiasAddGrad", (5,), (3,), ("Sum", (1, 1, 1, 5), (1, 1, 1, 3))),
    # frozen input channels of a Conv2D (a Mask of whole lines along the kernel's axis 2)
    "conv_input_channels": Case(
        _conv_layers, _conv_forward,
        (N, 6, 6, 2), (N, 3), [gf.Mask("mid/kernel", _columns((3, 3, 4, 5), [1, 2], axis=2))],
        {"mid/kernel": _columns((3, 3, 4, 5), [1, 2], axis=2)},
        "Conv2DBackpropFilter", (3, 3, 4, 5), (3, 3, 2, 5)),
    "nchw_bias": Case(
        lambda: [keras.Input((6, 3)), keras.layers.Dense(4, "tanh", name="below"), NCHWBias(name="mid"),
                 keras.layers.Flatten(), keras.layers.Dense(3, name="above")],
        lambda p, x: _flat_dense(tf.tanh(tf.tanh(tf.einsum("nci,io->nco", x, p["below/kernel"])
                                                 + p["below/bias"]) + p["mid/bias"][:, None]), p, "above"),
        (N, 6, 3), (N, 3), [gf.Rows("mid/bias", [0, 2, 5])],
        {"mid/bias": _columns((6,), [0, 2, 5])}, "BiasAddGrad", (6,), (3,)),
    "sum_bias": Case(
        lambda: [keras.Input((5,)), keras.layers.Dense(7, "tanh", name="below"), PlainAffine(6, name="mid"),
                 keras.layers.Dense(3, name="above")],
        lambda p, x: tf.tanh(tf.tanh(x @ p["below/kernel"] + p["below/bias"]) @ p["mid/w"]
                             + p["mid/bias"]) @ p["above/kernel"] + p["above/bias"],
        (N, 5), (N, 3), [gf.Columns("mid/*", [1, 4])],
        {"mid/w": _columns((7, 6), [1, 4]), "mid/bias": _columns((6,), [1, 4])}, "Sum", (1, 6), (1, 4)),
    "depthwise_multiplier": Case(
        _depthwise_layers, _depthwise_forward,
        (N, 6, 6, 2), (N, 3), [gf.Columns("mid/kernel", [0, 2])],
        {"mid/kernel": _columns((3, 3, 4, 3), [0, 2])},
        "DepthwiseConv2dNativeBackpropFilter", (3, 3, 4, 3), (3, 3, 4, 1)),
    "depthwise_channels": Case(
        _depthwise_layers, _depthwise_forward,
        (N, 6, 6, 2), (N, 3), [gf.Mask("mid/kernel", _columns((3, 3, 4, 3), [1, 3], axis=2))],
        {"mid/kernel": _columns((3, 3, 4, 3), [1, 3], axis=2)},
        "DepthwiseConv2dNativeBackpropFilter", (3, 3, 4, 3), (3, 3, 2, 3)),
    "batch_matmul_rows": Case(
        _seq_layers, _seq_forward, (N, 7, 5), (N, 3), [gf.Rows("mid/w", [1, 2, 6])],
        {"mid/w": _columns((8, 6), [1, 2, 6], axis=0)}, "BatchMatMulV2", (N, 8, 6), (N, 5, 6)),
    "batch_matmul_columns": Case(
        _seq_layers, _seq_forward, (N, 7, 5), (N, 3), [gf.Columns("mid/w", [0, 3])],
        {"mid/w": _columns((8, 6), [0, 3])}, "BatchMatMulV2", (N, 8, 6), (N, 8, 4)),
}


def _gradient_ops(graph_ops):
    return {(op, tuple(shape)) for op, shape in graph_ops if shape is not None}


def _run(case: Case, jit=False, steps_before=2, steps=3):
    """The Keras model rewritten under `case.rules` after `steps_before` plain steps, and
    the hand-written seed-002 reference from the same weights and Adam moments (the
    reference's moments at frozen entries zeroed: with theirs, Adam would keep moving
    the frozen weights). Returns the rewrite, its gradient ops and the case in the form
    the installed Keras traces (`older` where it is that)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(case.layers())
    data = batches(steps_before + steps, case.x, case.y, seed=3)
    optimizer = keras.optimizers.Adam(1e-2)
    step = make_step(model, optimizer)
    plain = tf.function(step)
    for x, y in data[:steps_before]:
        plain(x, y)
    plain_ops = _gradient_ops((op.type, op.outputs[0].shape) for op in
                              plain.get_concrete_function(*data[0]).graph.get_operations() if op.outputs)
    if (case.op, case.full) not in plain_ops and case.older is not None:
        case = replace(case, op=case.older[0], full=case.older[1], sliced=case.older[2])
    assert (case.op, case.full) in plain_ops, "the plain step computes the full-size gradient"

    variables = model.trainable_variables
    paths = ["/".join(v.path.split("/")[-2:]) for v in variables]
    assert set(case.frozen) <= set(paths), paths
    ref_vars = [tf.Variable(v.numpy()) for v in variables]
    ref_optimizer = keras.optimizers.Adam(1e-2)
    ref_optimizer.build(ref_vars)
    slot_index = {}  # variable path -> indices of its slots in optimizer.variables
    for i, (a, b) in enumerate(zip(optimizer.variables, ref_optimizer.variables, strict=True)):
        assert a.shape == b.shape
        b.assign(a)
        for path in case.frozen:
            if path.replace("/", "_") in a.path:
                slot_index.setdefault(path, []).append(i)
                b.assign(np.where(case.frozen[path], 0, a.numpy()))
    assert all(len(slot_index.get(p, ())) == 2 for p in case.frozen), slot_index
    keeps = {p: tf.constant(keep_of(f)) for p, f in case.frozen.items()}
    mse = keras.losses.MeanSquaredError()

    def ref_step(x, y):
        with tf.GradientTape() as tape:
            params = {p: entry_stop_gradients(v, keeps[p]) if p in keeps else v
                      for p, v in zip(paths, ref_vars)}
            loss = mse(y, case.forward(params, x))
        ref_optimizer.apply_gradients(zip(tape.gradient(loss, ref_vars), ref_vars))
        return loss

    ref_step = tf.function(ref_step, jit_compile=jit or None)
    before = {i: optimizer.variables[i].numpy().copy() for ids in slot_index.values() for i in ids}
    start = {p: v.numpy().copy() for p, v in zip(paths, variables)}
    rw = gf.rewrite(tf.function(step, jit_compile=True) if jit else step, case.rules, *data[0])
    for x, y in data[steps_before:]:
        np.testing.assert_allclose(rw(x, y).numpy(), ref_step(x, y).numpy(), rtol=1e-4, atol=1e-6)
    atol = 1e-4 if jit else 1e-5
    for path, v, r in zip(paths, variables, ref_vars):
        now, ref = v.numpy(), r.numpy()
        if path in case.frozen:
            frozen = case.frozen[path]
            assert np.array_equal(now[frozen], start[path][frozen]), f"{path}: frozen entries moved"
            assert not np.array_equal(now[~frozen], start[path][~frozen]), f"{path} did not train"
            np.testing.assert_allclose(now[~frozen], ref[~frozen], atol=atol, rtol=1e-5, err_msg=path)
            for i in slot_index[path]:  # S4: the slots of frozen entries are paused
                slot = optimizer.variables[i].numpy()
                assert np.array_equal(slot[frozen], before[i][frozen]), f"{path}: slot {i} moved"
        else:
            np.testing.assert_allclose(now, ref, atol=atol, rtol=1e-5, err_msg=path)
    assert not rw.plan.notes.unsliced, rw.plan.notes.unsliced
    assert len(rw.plan.notes.sliced_writes) == 3 * len(case.frozen)
    return rw, _gradient_ops((d["op"], d["shapes"][0] if d["shapes"] else None)
                             for _, d in rw.graph.nodes(data=True)), case


@pytest.mark.parametrize("name", sorted(CASES))
def test_partly_frozen_middle_layer_gradient_is_sliced(name):
    _, ops, case = _run(CASES[name])
    assert (case.op, case.full) not in ops, f"full-size {case.op} left"
    assert (case.op, case.sliced) in ops, sorted(o for o in ops if o[0] == case.op)


@pytest.mark.parametrize("name", ["conv_bias", "depthwise_channels", "batch_matmul_columns"])
def test_sliced_kinds_under_xla(name):
    rw, ops, case = _run(CASES[name], jit=True)
    assert rw.function._jit_compile is True
    assert (case.op, case.full) not in ops and (case.op, case.sliced) in ops


def test_depthwise_kernel_rows_are_gathered_from_the_full_gradient():
    """Frozen kernel rows (axis 0, the filter's height) are not channels: no cut applies,
    the full filter gradient is computed and its trainable rows gathered, still equal to
    the reference."""
    case = CASES["depthwise_multiplier"]
    frozen = _columns((3, 3, 4, 3), [0], axis=0)
    case = Case(case.layers, case.forward, case.x, case.y, [gf.Rows("mid/kernel", [0])],
                {"mid/kernel": frozen}, case.op, case.full, case.full)
    _, ops, case = _run(case)
    assert (case.op, case.full) in ops


def test_batch_matmul_heads_are_gathered_from_the_full_gradient():
    """Frozen heads of a per-head weight [heads, d, out] are lines along the batched matmul's
    batch axis: no cut applies, its full gradient is computed and the trainable heads
    gathered, still equal to the reference."""
    def forward(p, x):
        h = tf.tanh(tf.einsum("nsi,io->nso", x, p["below/kernel"]) + p["below/bias"])
        return _flat_dense(tf.tanh(tf.einsum("nsi,sio->nso", h, p["mid/w"])), p, "above")

    case = Case(lambda: [keras.Input((3, 5)), keras.layers.Dense(6, "tanh", name="below"),
                         HeadMatMul(name="mid"), keras.layers.Flatten(), keras.layers.Dense(3, name="above")],
                forward, (N, 3, 5), (N, 3), [gf.Rows("mid/w", [1])],
                {"mid/w": _columns((3, 6, 4), [1], axis=0)}, "BatchMatMulV2", (3, 6, 4), (3, 6, 4))
    _, ops, case = _run(case)
    assert (case.op, case.full) in ops
