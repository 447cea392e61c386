"""The decorator, gf.rewrite, and the emitted callable in every calling context (issue 2)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_models, batches, make_step, mlp, snapshot, twin

import graphfreeze as gf

DATA = batches(4, (8, 6), (8, 3))


def _reference(model):
    ref = twin(model, mlp)
    ref.get_layer("hidden1").trainable = False
    return ref, tf.function(make_step(ref, keras.optimizers.Adam(1e-2)))


@pytest.mark.parametrize("wrap", ["plain", "tf.function", "jit"])
def test_decorator_on_plain_and_tf_function(wrap):
    model = mlp()
    ref, ref_step = _reference(model)
    optimizer = keras.optimizers.Adam(1e-2)
    loss_fn = keras.losses.MeanSquaredError()

    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return {"loss": loss, "pair": (loss * 2.0, tf.constant(7))}

    if wrap == "tf.function":
        train_step = tf.function(train_step)
    elif wrap == "jit":
        train_step = tf.function(train_step, jit_compile=True)
    step = gf.freeze("hidden1/*")(train_step)
    for x, y in DATA:
        out = step(x, y)
        ref_step(x, y)
    assert set(out) == {"loss", "pair"} and int(out["pair"][1]) == 7
    np.testing.assert_allclose(out["pair"][0].numpy(), 2 * out["loss"].numpy(), rtol=1e-6)
    assert_close_models(model, ref, atol=1e-4 if wrap == "jit" else 1e-5)
    rw = step.rewritten(*DATA[0])
    assert rw is step.rewritten(*DATA[0]) and step.cache_size == 1
    if wrap == "jit":
        assert rw.function._jit_compile is True


def test_one_rewrite_per_signature():
    model = mlp()
    step = gf.freeze("hidden1/*")(make_step(model, keras.optimizers.SGD(0.1)))
    x, y = DATA[0]
    step(x, y)
    step(x[:5], y[:5])
    step(x, y)
    assert step.cache_size == 2
    assert step.rewritten(x, y) is not step.rewritten(x[:5], y[:5])


def test_rewritten_callable_eager_nested_and_xla():
    model = mlp()
    ref, ref_step = _reference(model)
    rw = gf.rewrite(make_step(model, keras.optimizers.Adam(1e-2)), "hidden1/*", *DATA[0])

    @tf.function
    def outer(x, y):
        return rw(x, y) + 0.0

    @tf.function(jit_compile=True)
    def outer_xla(x, y):
        return rw(x, y)

    rw(*DATA[0])
    outer(*DATA[1])
    outer_xla(*DATA[2])
    for x, y in DATA[:3]:
        ref_step(x, y)
    assert_close_models(model, ref, atol=1e-4)
    # same variable objects: the function captures the model's own handles
    handles = {id(e) for e, _ in rw.concrete_function.graph.captures}
    assert id(model.get_layer("out").kernel.value.handle) in handles


def test_python_argument_mismatch_is_an_error():
    model = mlp()
    optimizer = keras.optimizers.SGD(0.1)

    def step(x, y, scale=1.0):
        with tf.GradientTape() as tape:
            loss = scale * tf.reduce_mean((model(x) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    rw = gf.rewrite(step, "hidden1/*", *DATA[0], scale=2.0)
    rw(*DATA[0], scale=2.0)
    with pytest.raises(gf.FreezeError, match="rewritten for Python arguments"):
        rw(*DATA[0], scale=3.0)
    frozen_step = gf.freeze("hidden1/*")(step)
    frozen_step(*DATA[0], scale=2.0)
    frozen_step(*DATA[0], scale=3.0)
    assert frozen_step.cache_size == 2


def test_method_decorator():
    class Trainer:
        def __init__(self):
            self.model = mlp()
            self.optimizer = keras.optimizers.SGD(0.1)

        @gf.freeze("hidden1/*")
        def train_step(self, x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((self.model(x) - y) ** 2)
            grads = tape.gradient(loss, self.model.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
            return loss

    t = Trainer()
    before = snapshot(t.model.get_layer("hidden1").variables)
    t.train_step(*DATA[0])
    t.train_step(*DATA[1])
    after = snapshot(t.model.get_layer("hidden1").variables)
    assert all(np.array_equal(v, before[p]) for p, v in after.items())
    assert t.train_step.cache_size == 1


# ------------------------------------------------------------------ bad input


def _assert_untouched_and_trains(model, step):
    """After an error the original step still runs and trains everything."""
    assert tf.GradientTape.gradient.__name__ == "gradient"
    from tensorflow.python.eager import backprop
    assert "graphfreeze" not in getattr(backprop.GradientTape.gradient, "__module__", "")
    before = snapshot(model.variables)
    tf.function(step)(*DATA[0])
    after = snapshot(model.variables)
    assert all(not np.array_equal(after[p], before[p]) for p in before)


def test_glob_matching_nothing_names_pattern_and_closest_paths():
    model = mlp()
    step = make_step(model, keras.optimizers.SGD(0.1))
    with pytest.raises(gf.RuleError) as e:
        gf.rewrite(step, ["hiden1/*"], *DATA[0])
    msg = str(e.value)
    assert "'hiden1/*'" in msg and "sequential/hidden1/kernel" in msg
    _assert_untouched_and_trains(model, step)


def test_non_rule_argument():
    with pytest.raises(gf.FreezeError, match="42.*not a freeze rule"):
        gf.freeze(42)
    with pytest.raises(gf.FreezeError, match="not a freeze rule"):
        gf.rewrite(lambda: None, [3.5])
    with pytest.raises(gf.FreezeError, match="returns a decorator"):
        gf.freeze(lambda x: x)


def test_function_reading_no_variable():
    with pytest.raises(gf.CaptureError, match="reads no variable"):
        gf.rewrite(lambda x: x * 2.0, ["*"], tf.ones([2]))


def test_failure_inside_user_code_restores_the_tape():
    model = mlp()
    step = make_step(model, keras.optimizers.SGD(0.1))

    def broken(x, y):
        step(x, y)
        raise RuntimeError("boom")

    with pytest.raises(gf.CaptureError, match="boom"):
        gf.rewrite(broken, ["hidden1/*"], *DATA[0])
    _assert_untouched_and_trains(model, step)


def test_rule_naming_variable_the_function_does_not_read():
    model, other = mlp(), mlp(seed=3)
    step = make_step(model, keras.optimizers.SGD(0.1))
    with pytest.raises(gf.RuleError, match="none of which the function reads"):
        gf.rewrite(step, [other.get_layer("hidden1")], *DATA[0])
    _assert_untouched_and_trains(model, step)


def test_glob_does_not_match_optimizer_state():
    model = mlp()
    optimizer = keras.optimizers.Adam(1e-2)
    rw = gf.rewrite(make_step(model, optimizer), ["*", gf.Unfreeze("out/*")], *DATA[0])
    frozen = set(rw.report().frozen)
    assert not any(p.startswith("adam") for p in frozen)
    iteration = int(optimizer.iterations.numpy())
    rw(*DATA[0])
    assert int(optimizer.iterations.numpy()) == iteration + 1
