"""Property-based tests (issue 4): random MLP/CNN shapes, random whole and partial rules,
a random optimizer; S1 and S2 must hold.

The S2 reference is computed without graphfreeze's mechanism: the same network written
out with raw ops over a twin's variables, each partly frozen weight read through the
seed-002 forward mask `stop_gradient((1 - m) * w) + m * w`, whole-frozen variables left
out of the optimizer (what Keras trainable=False does). Examples are derandomized so CI
is reproducible.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras_versions import has_optimizer
from references import entry_stop_gradients

import graphfreeze as gf

S2_OPTIMIZERS = {
    "SGD": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "Adam": lambda: keras.optimizers.Adam(1e-2),
    "RMSprop": lambda: keras.optimizers.RMSprop(1e-2),
    "Adagrad": lambda: keras.optimizers.Adagrad(0.1),
    "Nadam": lambda: keras.optimizers.Nadam(1e-2),
    "Lion": lambda: keras.optimizers.Lion(1e-3),
}
S1_OPTIMIZERS = dict(S2_OPTIMIZERS,
                     AdamW=lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1),
                     Lamb=lambda: keras.optimizers.Lamb(1e-2, weight_decay=0.1),
                     Adafactor=lambda: keras.optimizers.Adafactor(1e-2))
if not has_optimizer("Lamb"):  # added in Keras 3.5 (tests/keras_versions.py)
    del S1_OPTIMIZERS["Lamb"]
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def architectures(draw):
    if draw(st.booleans()):
        widths = draw(st.lists(st.integers(2, 7), min_size=1, max_size=3))
        return ("mlp", draw(st.integers(2, 6)), widths, draw(st.integers(1, 3)))
    return ("cnn", draw(st.integers(5, 8)), [draw(st.integers(1, 3)), draw(st.integers(2, 4))],
            draw(st.integers(1, 3)))


def build(arch):
    keras.utils.set_random_seed(0)
    kind, size, widths, outputs = arch
    if kind == "mlp":
        layers = [keras.Input((size,))] + [keras.layers.Dense(w, activation="tanh") for w in widths]
    else:
        channels, filters = widths
        layers = [keras.Input((size, size, channels)), keras.layers.Conv2D(filters, 3, activation="tanh"),
                  keras.layers.Flatten()]
    return keras.Sequential(layers + [keras.layers.Dense(outputs)])


def data_for(arch, n=4):
    kind, size, widths, outputs = arch
    shape = (6, size) if kind == "mlp" else (6, size, size, widths[0])
    rng = np.random.default_rng(0)
    return [(rng.normal(size=shape).astype("float32"), rng.normal(size=(6, outputs)).astype("float32"))
            for _ in range(n)]


@st.composite
def plans(draw, n_variables_and_shapes):
    """Per variable: None, or a frozen bool mask with a rule that produces it."""
    out = []
    for shape in n_variables_and_shapes:
        kind = draw(st.sampled_from(["none", "whole", "rows", "columns", "mask"]))
        if kind == "none" or (kind in ("rows", "columns") and len(shape) == 0):
            out.append(None)
            continue
        frozen = np.zeros(shape, bool)
        if kind == "whole":
            frozen[...] = True
        elif kind == "rows":
            idx = draw(st.lists(st.integers(0, shape[0] - 1), min_size=1, unique=True))
            frozen[idx] = True
        elif kind == "columns":
            idx = draw(st.lists(st.integers(0, shape[-1] - 1), min_size=1, unique=True))
            frozen[..., idx] = True
        else:
            seed = draw(st.integers(0, 2**16))
            frozen = np.random.default_rng(seed).random(shape) < 0.5
        out.append((kind, frozen, idx if kind in ("rows", "columns") else None))
    return out


def rules_for(variables, plan):
    rules = []
    for v, p in zip(variables, plan):
        if p is None:
            continue
        kind, frozen, idx = p
        if kind == "whole":
            rules.append(v)
        elif kind == "rows":
            rules.append(gf.Rows(v, idx))
        elif kind == "columns":
            rules.append(gf.Columns(v, idx))
        else:
            rules.append(gf.Mask(v, frozen))
    return rules


def _step(model, optimizer, variables):
    mse = keras.losses.MeanSquaredError()

    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = mse(y, model(x, training=True))
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss
    return train_step


def seed002_forward(arch, weights, keeps, x):
    """build(arch)'s forward pass written out with raw ops; weight i is read through the
    seed-002 mask where keeps[i] (1 = trains) is given."""
    w = [v if k is None else entry_stop_gradients(v, k) for v, k in zip(weights, keeps)]
    if arch[0] == "cnn":
        h = tf.tanh(tf.nn.conv2d(x, w[0], 1, "VALID") + w[1])
        h = tf.reshape(h, [tf.shape(h)[0], -1])
        w = w[2:]
    else:
        h = x
    pairs = list(zip(w[::2], w[1::2]))
    for i, (kernel, bias) in enumerate(pairs):
        h = h @ kernel + bias
        if i < len(pairs) - 1:
            h = tf.tanh(h)
    return h


def _reference_step(arch, weights, keeps, trained, optimizer):
    mse = keras.losses.MeanSquaredError()

    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = mse(y, seed002_forward(arch, weights, keeps, x))
        optimizer.apply_gradients(zip(tape.gradient(loss, trained), trained))
        return loss
    return train_step


def variable_shapes(arch):
    """The trainable variables' shapes of build(arch), in order, without building it."""
    kind, size, widths, outputs = arch
    if kind == "mlp":
        dims = [size, *widths, outputs]
    else:
        channels, filters = widths
        dims = [(size - 2) ** 2 * filters, outputs]
    shapes = [] if kind == "mlp" else [(3, 3, channels, filters), (filters,)]
    for a, b in zip(dims, dims[1:]):
        shapes += [(a, b), (b,)]
    return shapes


@st.composite
def scenarios(draw, optimizers):
    arch = draw(architectures())
    return arch, draw(plans(variable_shapes(arch))), draw(st.sampled_from(sorted(optimizers)))


@PROPERTY
@given(scenarios(S1_OPTIMIZERS))
def test_property_s1_frozen_entries_unchanged(scenario):
    arch, plan, opt_name = scenario
    keras.backend.clear_session()
    model = build(arch)
    variables = model.trainable_variables
    assert [tuple(v.shape) for v in variables] == variable_shapes(arch)
    data = data_for(arch)
    step = _step(model, S1_OPTIMIZERS[opt_name](), variables)
    step(*data[0])  # optimizer state built up before freezing
    rules = rules_for(variables, plan)
    if not rules:
        return
    before = [v.numpy().copy() for v in variables]
    rw = gf.rewrite(step, rules, *data[0])
    for x, y in data:
        rw(x, y)
    for v, b, p in zip(variables, before, plan):
        if p is not None:
            assert np.array_equal(v.numpy()[p[1]], b[p[1]]), (v.path, opt_name)


@PROPERTY
@given(scenarios(S2_OPTIMIZERS))
def test_property_s2_rest_trains_as_if_frozen_were_constant(scenario):
    arch, plan, opt_name = scenario
    keras.backend.clear_session()
    model, reference = build(arch), build(arch)
    reference.set_weights(model.get_weights())
    variables = model.trainable_variables
    rules = rules_for(variables, plan)
    data = data_for(arch)
    rw = gf.rewrite(_step(model, S2_OPTIMIZERS[opt_name](), variables), rules, *data[0])
    weights = reference.trainable_variables
    keeps = [None if p is None or p[1].all() else tf.constant((~p[1]).astype("float32"))
             for p in plan]
    # whole variables: out of the optimizer, as Keras trainable=False does
    trained = [v for v, p in zip(weights, plan) if p is None or not p[1].all()]
    if not trained:  # everything frozen: Keras cannot apply an empty update; nothing may move
        before = [v.numpy().copy() for v in variables]
        for x, y in data:
            rw(x, y)
        assert all(np.array_equal(v.numpy(), b) for v, b in zip(variables, before))
        return
    ref_step = tf.function(_reference_step(arch, weights, keeps, trained, S2_OPTIMIZERS[opt_name]()))
    for x, y in data:
        rw(x, y)
        ref_step(x, y)
    for a, b in zip(model.variables, reference.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5, err_msg=a.path)
