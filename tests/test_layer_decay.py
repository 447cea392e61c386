"""gf.layer_decay (issue 15 item 2) against one optimizer per layer with the decayed rate."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batches, make_step

import graphfreeze as gf

DATA = batches(4, (16, 6), (16, 3))


def _nested(seed=0):
    """A functional backbone inside a Sequential, with a head after it."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="a")(inp)
    h = keras.layers.Dropout(0.0, name="drop")(h)
    h = keras.layers.Dense(7, activation="tanh", name="b")(h)
    backbone = keras.Model(inp, h, name="backbone")
    return keras.Sequential([keras.Input((6,)), backbone, keras.layers.Dense(5, activation="tanh", name="c"),
                             keras.layers.Dense(3, name="head")])


def test_factors_follow_the_model_order_through_nested_models():
    model = _nested()
    rules = gf.layer_decay(model, 0.5)
    assert [(r.target.name, r.factor) for r in rules] == [
        ("a", 0.125), ("b", 0.25), ("c", 0.5), ("head", 1.0)]


def test_equals_one_optimizer_per_layer_with_decayed_rate():
    model, reference = _nested(), _nested()
    reference.set_weights(model.get_weights())
    decay, lr = 0.6, 1e-2
    step = gf.freeze(*gf.layer_decay(model, decay), "c/bias")(
        make_step(model, keras.optimizers.AdamW(lr, weight_decay=0.02)))
    bb = reference.get_layer("backbone")
    groups = [(bb.get_layer("a"), decay ** 3), (bb.get_layer("b"), decay ** 2),
              (reference.get_layer("c"), decay), (reference.get_layer("head"), 1.0)]
    variables = [[v for v in layer.trainable_variables if not v.path.endswith("c/bias")]
                 for layer, _ in groups]
    opts = [keras.optimizers.AdamW(lr * f, weight_decay=0.02) for _, f in groups]

    @tf.function
    def ref_step(x, y):
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y, reference(x, training=True))
        flat = [v for vs in variables for v in vs]
        grads = tape.gradient(loss, flat)
        at = 0
        for opt, vs in zip(opts, variables):
            opt.apply_gradients(zip(grads[at:at + len(vs)], vs))
            at += len(vs)

    c_bias = model.get_layer("c").bias.numpy().copy()
    for x, y in DATA:
        step(x, y)
        ref_step(x, y)
    assert np.array_equal(model.get_layer("c").bias.numpy(), c_bias)  # composed freeze
    for v, r in zip(model.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(v.numpy(), r.numpy(), atol=1e-5, rtol=1e-5, err_msg=v.path)


def test_keras_applications_model_in_layer_order():
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                           classes=4)
    rules = gf.layer_decay(model, 0.9)
    expected = [layer for layer in model.layers if layer.trainable_weights]
    assert [r.target for r in rules] == expected
    assert rules[-1].target.name == "predictions" and rules[-1].factor == 1.0
    n = len(expected)
    np.testing.assert_allclose([r.factor for r in rules], [0.9 ** (n - 1 - i) for i in range(n)])


@pytest.mark.parametrize("decay", [0, -0.5, 1.5, float("nan"), "0.9", None])
def test_bad_decay_is_a_rule_error(decay):
    with pytest.raises(gf.RuleError, match="layer_decay"):
        gf.layer_decay(_nested(), decay)


def test_not_a_model_is_a_rule_error():
    with pytest.raises(gf.RuleError, match="Keras model"):
        gf.layer_decay(tf.Variable(1.0), 0.9)
