"""tf_keras (Keras 2) models (issue 15, item 6): gf.keras.freeze and GradualUnfreezing in
tf_keras's own `fit`. Runs when tf_keras is installed (the `tf-keras` extra; CI installs it).

tf_keras models are built in the same process as Keras 3 ones by importing `tf_keras`
directly; `TF_USE_LEGACY_KERAS=1` (which makes `tf.keras` mean tf_keras) is checked in a
subprocess, as a user would run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import graphfreeze as gf

tf_keras = pytest.importorskip("tf_keras")

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 6)).astype("float32")
Y = RNG.normal(size=(64, 3)).astype("float32")
FIT = {"batch_size": 16, "epochs": 2, "shuffle": False, "verbose": 0}
LAYERS = ["h1", "h2", "h3", "out"]


def mlp(seed=0):
    tf_keras.utils.set_random_seed(seed)
    return tf_keras.Sequential(
        [tf_keras.layers.Dense(8, activation="tanh", name="h1", input_shape=(6,)),
         tf_keras.layers.Dense(8, activation="tanh", name="h2"),
         tf_keras.layers.Dense(8, activation="tanh", name="h3"),
         tf_keras.layers.Dense(3, name="out")], name="mlp")


def weights(model, names=LAYERS):
    return {n: [np.array(w) for w in model.get_layer(n).get_weights()] for n in names}


def assert_frozen_and_close(model, reference, before, frozen):
    after, ref = weights(model), weights(reference)
    for name in LAYERS:
        for got, was, want in zip(after[name], before[name], ref[name]):
            if name in frozen:
                assert np.array_equal(got, was), name                 # S1: bitwise
            else:
                assert not np.array_equal(got, was), name             # it trained
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)  # S2


OPTIMIZERS = {"adam": lambda: tf_keras.optimizers.Adam(1e-2),
              "sgd_momentum": lambda: tf_keras.optimizers.SGD(0.05, momentum=0.9)}
CONFIGS = {"plain": ({}, {}),
           "validation_spe2_xla": ({"steps_per_execution": 2, "jit_compile": True},
                                   {"validation_data": (X[:16], Y[:16])})}


@pytest.mark.parametrize("opt, config", [("adam", "plain"), ("sgd_momentum", "plain"),
                                         ("adam", "validation_spe2_xla")])
def test_fit_equals_trainable_false_twin(opt, config):
    compile_kw, fit_kw = CONFIGS[config]
    model, reference = mlp(), mlp()
    reference.set_weights(model.get_weights())
    model.compile(optimizer=OPTIMIZERS[opt](), loss="mse", metrics=["mae"], **compile_kw)
    gf.keras.freeze(model, "h2/*", model.get_layer("h3"))  # trainable layers below and above
    for name in ("h2", "h3"):
        reference.get_layer(name).trainable = False
    reference.compile(optimizer=OPTIMIZERS[opt](), loss="mse", metrics=["mae"], **compile_kw)
    before = weights(model)
    history = model.fit(X, Y, **FIT, **fit_kw)
    ref_history = reference.fit(X, Y, **FIT, **fit_kw)
    assert_frozen_and_close(model, reference, before, {"h2", "h3"})
    np.testing.assert_allclose(history.history["loss"], ref_history.history["loss"], rtol=1e-5)
    assert set(history.history) == set(ref_history.history)
    assert model._train_counter.numpy() == reference._train_counter.numpy()  # tf_keras's own counter
    report = gf.keras.rewritten(model).report()
    assert report.frozen["h2/kernel"] == 64 and "h1/kernel" not in report.frozen


def test_partial_rules_in_fit():
    model = mlp()
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2), loss="mse")
    gf.keras.freeze(model, gf.Columns("out/kernel", [0]), gf.Rows("out/bias", [0]))
    kernel, bias = (w.copy() for w in model.get_layer("out").get_weights())
    model.fit(X, Y, **FIT)
    new_kernel, new_bias = model.get_layer("out").get_weights()
    assert np.array_equal(new_kernel[:, 0], kernel[:, 0]) and new_bias[0] == bias[0]
    assert not np.array_equal(new_kernel[:, 1:], kernel[:, 1:])


def test_glob_over_tf_keras_counters_leaves_them_counting():
    """'*' also matches tf_keras's optimizer iteration count and learning rate by name; they
    are recognised from the graph as optimizer state (S7), so they keep counting and the fit
    equals the trainable=False twin."""
    model, reference = mlp(), mlp()
    reference.set_weights(model.get_weights())
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2), loss="mse", steps_per_execution=2)
    gf.keras.freeze(model, "*", gf.Unfreeze("out/*"))
    for name in ("h1", "h2", "h3"):
        reference.get_layer(name).trainable = False
    reference.compile(optimizer=tf_keras.optimizers.Adam(1e-2), loss="mse", steps_per_execution=2)
    before = weights(model)
    model.fit(X, Y, **FIT)
    reference.fit(X, Y, **FIT)
    assert_frozen_and_close(model, reference, before, {"h1", "h2", "h3"})
    assert model.optimizer.iterations.numpy() == reference.optimizer.iterations.numpy() > 0


def test_gradual_unfreezing_in_tf_keras_fit():
    model, reference = mlp(), mlp()
    reference.set_weights(model.get_weights())
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2), loss="mse")
    schedule = gf.keras.GradualUnfreezing({0: ["h2/*", "h3/*"], 1: []})
    epochs = [weights(model)]
    record = tf_keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: epochs.append(weights(model)))
    model.fit(X, Y, **FIT, callbacks=[schedule, record])
    changed = [{n for n in LAYERS if not all(np.array_equal(a, b) for a, b in
                                             zip(epochs[e][n], epochs[e + 1][n]))} for e in (0, 1)]
    assert changed == [{"h1", "out"}, set(LAYERS)]
    # The reference: trainable=False for epoch 0, everything for epoch 1, recompiled with
    # one optimizer built over every weight first (tf_keras's optimizer, like Keras 3's,
    # refuses variables it was not built with); see tests/test_schedules.py.
    optimizer = tf_keras.optimizers.Adam(1e-2)
    optimizer.build(reference.trainable_variables)
    for epoch, frozen in enumerate([{"h2", "h3"}, set()]):
        for layer in reference.layers:
            layer.trainable = layer.name not in frozen
        reference.compile(optimizer=optimizer, loss="mse")
        reference.fit(X, Y, **{**FIT, "initial_epoch": epoch, "epochs": epoch + 1})
    for name in LAYERS:
        for got, want in zip(weights(model)[name], weights(reference)[name]):
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)


def test_custom_step_with_gf_freeze():
    model, reference = mlp(), mlp()
    reference.set_weights(model.get_weights())
    reference.get_layer("h2").trainable = False
    opt, ref_opt = tf_keras.optimizers.Adam(1e-2), tf_keras.optimizers.Adam(1e-2)

    def step_for(m, o):
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((m(x, training=True) - y) ** 2)
            grads = tape.gradient(loss, m.trainable_variables)
            o.apply_gradients(zip(grads, m.trainable_variables))
            return loss
        return step

    step = gf.freeze("h2/*")(step_for(model, opt))
    ref_step = tf.function(step_for(reference, ref_opt))
    before = weights(model)
    for i in range(3):
        step(X[16 * i:16 * i + 16], Y[16 * i:16 * i + 16])
        ref_step(X[16 * i:16 * i + 16], Y[16 * i:16 * i + 16])
    after = weights(model)
    assert all(np.array_equal(a, b) for a, b in zip(after["h2"], before["h2"]))
    for name in LAYERS:
        for got, want in zip(after[name], weights(reference)[name]):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_tf_keras_through_tf_use_legacy_keras(tmp_path):
    """A new user's script: `tf.keras` is tf_keras under TF_USE_LEGACY_KERAS=1."""
    script = tmp_path / "user.py"
    script.write_text(textwrap.dedent("""
        import numpy as np, tensorflow as tf, graphfreeze as gf
        assert tf.keras.__name__.startswith("tf_keras"), tf.keras.__name__
        model = tf.keras.Sequential([tf.keras.layers.Dense(4, name="h1", input_shape=(3,)),
                                     tf.keras.layers.Dense(4, name="h2"),
                                     tf.keras.layers.Dense(2, name="out")])
        model.compile(optimizer="adam", loss="mse")
        gf.keras.freeze(model, "h2/*")
        frozen = [w.copy() for w in model.get_layer("h2").get_weights()]
        trained = [w.copy() for w in model.get_layer("h1").get_weights()]
        x, y = np.ones((8, 3), "float32"), np.zeros((8, 2), "float32")
        model.fit(x, y, epochs=2, verbose=0)
        assert all(np.array_equal(a, b) for a, b in zip(frozen, model.get_layer("h2").get_weights()))
        assert not np.array_equal(trained[0], model.get_layer("h1").get_weights()[0])
        print("ok", type(model).__module__)
    """))
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "tf_keras.src.engine.sequential"]
