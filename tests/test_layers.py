"""Layers whose steps hide reads and writes in loops, branches and nested functions
(issue 4): S1 for whole and partial rules, S2 against Keras trainable=False."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_models, make_step, snapshot, twin

import graphfreeze as gf


class Scaled(keras.layers.Layer):
    """A layer whose call runs a nested tf.function that also writes a call counter."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 4), name="w")
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False, name="calls")

    @tf.function
    def _transform(self, x):
        self.calls.assign_add(1.0)
        return tf.tanh(x @ self.w)

    def call(self, x):
        return self._transform(x)


def _seq(input_shape, body, dtype="float32"):
    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input(input_shape, dtype=dtype)
        return keras.Model(inputs, keras.layers.Dense(2, name="out")(body(inputs)))
    return build


MODELS = {
    "lstm": (_seq((5, 3), lambda x: keras.layers.LSTM(4, name="rnn")(x)), (8, 5, 3)),
    "gru": (_seq((5, 3), lambda x: keras.layers.GRU(4, name="rnn")(x)), (8, 5, 3)),
    "conv": (_seq((8, 8, 3), lambda x: keras.layers.GlobalAveragePooling2D()(
        keras.layers.DepthwiseConv2D(3, name="rnn")(keras.layers.Conv2D(4, 3, name="conv")(x)))),
        (8, 8, 8, 3)),
    "layernorm": (_seq((6,), lambda x: keras.layers.LayerNormalization(name="rnn")(
        keras.layers.Dense(5, name="conv")(x))), (8, 6)),
    "attention": (_seq((4, 6), lambda x: keras.layers.Flatten()(keras.layers.MultiHeadAttention(
        2, 3, name="rnn")(x, x))), (8, 4, 6)),
    "nested_function": (_seq((6,), lambda x: Scaled(name="rnn")(x)), (8, 6)),
}


def _data(x_shape, n=5):
    rng = np.random.default_rng(0)
    return [(rng.normal(size=x_shape).astype("float32"),
             rng.normal(size=(x_shape[0], 2)).astype("float32")) for _ in range(n)]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_whole_layer_frozen(kind):
    build, x_shape = MODELS[kind]
    data = _data(x_shape)
    model = build()
    reference = twin(model, build)
    reference.get_layer("rnn").trainable = False
    optimizer = keras.optimizers.Adam(1e-2)
    rw = gf.rewrite(make_step(model, optimizer), [model.get_layer("rnn")], *data[0])
    ref_step = tf.function(make_step(reference, keras.optimizers.Adam(1e-2)))
    frozen = snapshot(model.get_layer("rnn").variables)
    for x, y in data:
        rw(x, y)
        ref_step(x, y)
    assert all(np.array_equal(v, frozen[p]) for p, v in snapshot(model.get_layer("rnn").variables).items())
    if kind == "nested_function":  # the write inside the nested function is guarded
        assert float(model.get_layer("rnn").calls.numpy()) == 0.0
        changed = [b for b in rw.program.bodies.values() if b.changed]
        assert changed, "the nested function's body should have been rewritten"
        return  # Keras trainable=False does not stop the counter, so no S2 reference
    assert_close_models(model, reference)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_partial_entries_frozen(kind):
    build, x_shape = MODELS[kind]
    data = _data(x_shape)
    model = build()
    target = max(model.get_layer("rnn").trainable_variables, key=lambda v: np.prod(v.shape))
    rng = np.random.default_rng(1)
    mask = rng.random(tuple(target.shape)) < 0.5
    optimizer = keras.optimizers.AdamW(1e-2, weight_decay=0.1)
    step = make_step(model, optimizer)
    step(*data[0])  # momentum built up before freezing
    before = target.numpy().copy()
    rw = gf.rewrite(step, [gf.Mask(target, mask)], *data[0])
    for x, y in data:
        rw(x, y)
    after = target.numpy()
    assert np.array_equal(after[mask], before[mask])
    assert not np.array_equal(after[~mask], before[~mask])


def test_recurrent_loop_body_is_followed():
    """The LSTM reads its kernels in the loop; its gradients come out of a gradient loop."""
    build, x_shape = MODELS["lstm"]
    model = build()
    data = _data(x_shape)
    rw = gf.rewrite(make_step(model, keras.optimizers.SGD(0.1)), ["rnn/*"], *data[0])
    ops = {d["op"] for _, d in rw.original_graph.nodes(data=True)}
    assert ops & {"While", "StatelessWhile"}
    assert rw.program.bodies, "loop bodies should be loaded"


@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("rules", ["whole", "partial"])
def test_loss_scale_optimizer_mixed_float16(mixed_precision, rules):
    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(12, name="hidden1"),
                                 keras.layers.Dense(3, name="out", dtype="float32")])

    data = _data((16, 6))
    data = [(x, np.concatenate([y, y[:, :1]], axis=1)) for x, y in data]
    model = build()
    assert model.get_layer("hidden1").compute_dtype == "float16"
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-2))

    def step_for(m, opt):
        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(m(x, training=True) - y))
                scaled = opt.scale_loss(loss)
            grads = tape.gradient(scaled, m.trainable_variables)
            opt.apply_gradients(zip(grads, m.trainable_variables))
            return loss
        return train_step

    h1 = model.get_layer("hidden1")
    if rules == "whole":
        reference = twin(model, build)
        reference.get_layer("hidden1").trainable = False
        ref_step = tf.function(step_for(reference, keras.optimizers.LossScaleOptimizer(
            keras.optimizers.Adam(1e-2))))
        rule_list, frozen = ["hidden1/*"], np.ones((6, 12), bool)
    else:
        rule_list, frozen = [gf.Columns("hidden1/kernel", [1, 5])], np.zeros((6, 12), bool)
        frozen[:, [1, 5]] = True
    before = h1.kernel.numpy().copy()
    rw = gf.rewrite(step_for(model, optimizer), rule_list, *data[0])
    for x, y in data:
        rw(x, y)
        if rules == "whole":
            ref_step(x, y)
    after = h1.kernel.numpy()
    assert np.array_equal(after[frozen], before[frozen])
    if rules == "whole":
        assert_close_models(model, reference)
        assert [b for b in rw.program.bodies.values() if b.changed], "update branch rewritten"
        # the all-finite check no longer tests the frozen zeros
        assert not [n for n, d in rw.graph.nodes(data=True) if d.get("inserted")]
    else:
        assert not np.array_equal(after[~frozen], before[~frozen])


@pytest.mark.parametrize("inference", [False, True])
def test_batchnorm_modes(inference):
    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="d1"),
                                 keras.layers.BatchNormalization(name="bn"),
                                 keras.layers.Dense(3, name="out")])

    data = _data((16, 6), n=6)
    data = [(x, np.concatenate([y, y[:, :1]], axis=1)) for x, y in data]
    model = build()
    for x, _ in data:  # non-trivial moving statistics
        model(x, training=True)
    bn = model.get_layer("bn")
    stats = snapshot([bn.moving_mean, bn.moving_variance])
    rw = gf.rewrite(make_step(model, keras.optimizers.Adam(1e-2)), ["d1/*", bn], *data[0],
                    batchnorm_inference=inference)
    reference = twin(model, build)
    if inference:  # Keras trainable=False runs BatchNorm in inference mode
        reference.get_layer("d1").trainable = False
        reference.get_layer("bn").trainable = False
        ref_step = tf.function(make_step(reference, keras.optimizers.Adam(1e-2)))
    for x, y in data:
        rw(x, y)
        if inference:
            ref_step(x, y)
    assert all(np.array_equal(v, stats[p]) for p, v in
               snapshot([bn.moving_mean, bn.moving_variance]).items())
    moments = [n for n, d in rw.graph.nodes(data=True) if "moments" in n and "/bn" in n]
    if inference:
        assert_close_models(model, reference)
        assert moments == [], "batch moments should be dead in inference mode"
    else:
        assert moments, "training mode normalises with batch moments"
