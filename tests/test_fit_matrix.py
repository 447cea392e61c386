"""`model.fit` across the configurations people train with (issue 17).

Every case trains a model with graphfreeze rules next to a twin with identical initial
weights in which Keras `trainable=False` freezes the same layer, compiled and fit the same
way. Frozen variables must be bitwise unchanged; trainable ones equal the twin within 1e-5
in float32 and 1e-3 under mixed precision.

The full product (policy x optimizer option x steps_per_execution x jit_compile) has 40
cases of ~5 s each. These corners cover it pairwise: every optimizer option runs under both
policies, with steps_per_execution 1 and 4 and with XLA on and off; every policy meets every
(steps_per_execution, jit_compile) pair; plus the GPU recipe corner (mixed_float16, explicit
LossScaleOptimizer, steps_per_execution=4, jit_compile=True).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import mirrored, snapshot
from references import MaskedEmbedding, keep_of

import graphfreeze as gf

RNG = np.random.default_rng(7)
X = RNG.normal(size=(64, 6)).astype("float32")
Y = RNG.normal(size=(64, 3)).astype("float32")
FIT = {"batch_size": 8, "epochs": 2, "shuffle": False, "verbose": 0}
TOLERANCE = {"float32": 1e-5, "mixed_float16": 1e-3}

#            policy            option    steps_per_execution  jit_compile
CORNERS = [("float32",        "plain",  1, False),
           ("float32",        "lso",    4, True),
           ("float32",        "accum",  4, False),
           ("float32",        "ema",    1, True),
           ("float32",        "gclip",  4, False),
           ("mixed_float16",  "plain",  4, True),
           ("mixed_float16",  "lso",    1, False),
           ("mixed_float16",  "accum",  1, True),
           ("mixed_float16",  "ema",    4, False),
           ("mixed_float16",  "gclip",  1, True),
           ("mixed_float16",  "lso",    4, True)]


def _optimizer(option):
    kwargs = {"accum": {"gradient_accumulation_steps": 2}, "ema": {"use_ema": True},
              "gclip": {"global_clipnorm": 0.1}}.get(option, {})
    optimizer = keras.optimizers.Adam(1e-2, **kwargs)
    return keras.optimizers.LossScaleOptimizer(optimizer) if option == "lso" else optimizer


def _model(seed=0):
    """Trainable layers on both sides of the one that is frozen; a float32 output layer,
    as the Keras mixed precision guide recommends."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(12, activation="tanh", name="low"),
        keras.layers.Dense(10, activation="tanh", name="mid"),
        keras.layers.Dense(3, name="out", dtype="float32"),
    ])


def _pair(policy, option, **compile_kw):
    """(model frozen by graphfreeze, twin frozen by trainable=False), compiled alike."""
    keras.mixed_precision.set_global_policy(policy)
    model, reference = _model(), _model(seed=1)
    reference.set_weights(model.get_weights())
    reference.get_layer("mid").trainable = False
    for m in (model, reference):
        m.compile(optimizer=_optimizer(option), loss="mse", **compile_kw)
    gf.keras.freeze(model, "mid/*")
    return model, reference


def _assert_matches(model, reference, frozen_before, policy):
    for path, value in snapshot(model.get_layer("mid").variables).items():  # S1
        assert np.array_equal(value, frozen_before[path]), f"{path} moved"
    for a, b in zip(model.weights, reference.weights):  # S2
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=TOLERANCE[policy], rtol=0,
                                   err_msg=f"{a.path} differs from trainable=False")
    low = model.get_layer("low").kernel.numpy()
    assert not np.array_equal(low, _model().get_layer("low").kernel.numpy()), "low trained"


@pytest.mark.parametrize("policy,option,spe,jit", CORNERS)
def test_fit_matrix_whole_layer(policy, option, spe, jit):
    model, reference = _pair(policy, option, steps_per_execution=spe, jit_compile=jit)
    frozen = snapshot(model.get_layer("mid").variables)
    model.fit(X, Y, **FIT)
    reference.fit(X, Y, **FIT)
    _assert_matches(model, reference, frozen, policy)
    if policy == "mixed_float16":  # Keras wrapped or kept the loss-scaling optimizer
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)


def test_fit_mixed_precision_columns():
    """Partial rules under mixed_float16 (Keras wraps Adam in a LossScaleOptimizer):
    frozen columns bitwise unchanged, the other columns of the same kernel train."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = _model()
    model.compile(optimizer="adam", loss="mse", steps_per_execution=2)
    gf.keras.freeze(model, gf.Columns("mid/kernel", [0, 3, 4]), gf.Rows("mid/bias", [0, 3, 4]))
    kernel, bias = (v.numpy().copy() for v in model.get_layer("mid").variables)
    model.fit(X, Y, **FIT)
    new_kernel, new_bias = (v.numpy() for v in model.get_layer("mid").variables)
    assert np.array_equal(new_kernel[:, [0, 3, 4]], kernel[:, [0, 3, 4]])
    assert np.array_equal(new_bias[[0, 3, 4]], bias[[0, 3, 4]])
    assert not np.array_equal(np.delete(new_kernel, [0, 3, 4], 1), np.delete(kernel, [0, 3, 4], 1))


def _embedding_model(layer=keras.layers.Embedding, **kw):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((5,), dtype="int32"), layer(30, 4, name="emb", **kw),
                             keras.layers.Flatten(), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(2, name="out", dtype="float32")])


def test_fit_mixed_precision_embedding_rows():
    """Rows of an embedding under mixed_float16: the frozen rows bitwise unchanged, and the
    rest equal to the seed-002 mask applied at the lookup, trained the same way."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    rows = [0, 4, 7, 29]
    ids = RNG.integers(0, 30, (64, 5)).astype("int32")
    targets = RNG.normal(size=(64, 2)).astype("float32")
    frozen = np.zeros((30, 4), bool)
    frozen[rows] = True
    model = _embedding_model()
    reference = _embedding_model(layer=MaskedEmbedding, keep=keep_of(frozen))
    reference.set_weights(model.get_weights())
    for m in (model, reference):
        m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    gf.keras.freeze(model, gf.Rows("emb/embeddings", rows))
    before = model.get_layer("emb").embeddings.numpy().copy()
    model.fit(ids, targets, **FIT)
    reference.fit(ids, targets, **FIT)
    after = model.get_layer("emb").embeddings.numpy()
    assert np.array_equal(after[rows], before[rows])  # S1
    for a, b in zip(model.weights, reference.weights):  # S2
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-3, rtol=0, err_msg=a.path)


@pytest.mark.parametrize("policy,option", [("float32", "plain"),
                                           ("float32", "ema"),
                                           ("mixed_float16", "lso")])
def test_fit_matrix_under_mirrored_strategy(policy, option):
    # steps_per_execution stays 1: with more, Keras 3.15 / TF 2.21 fail under
    # MirroredStrategy even without graphfreeze (keras-team/keras#19246). No gradient
    # accumulation either: its cond around apply_gradients calls merge_call inside a
    # branch, which tf.distribute refuses without graphfreeze too.
    with mirrored().scope():
        model, reference = _pair(policy, option)
    frozen = {p: v for p, v in snapshot(model.get_layer("mid").variables).items()}
    model.fit(X, Y, **FIT)
    reference.fit(X, Y, **FIT)
    for v in model.get_layer("mid").variables:  # S1 on every replica's copy
        for component in getattr(v.value, "values", [v.value]):
            assert np.array_equal(component.numpy(), frozen[v.path])
    _assert_matches(model, reference, frozen, policy)


def test_step_with_branches_rewritten_inside_another_tf_function():
    """The root of the fit crash, outside Keras: a step whose optimizer branches (gradient
    accumulation puts the update in `cond` bodies) rewritten while an outer tf.function is
    being traced, where TensorFlow registers the branches on the outer graph."""
    model, reference = _model(), _model(seed=1)
    reference.set_weights(model.get_weights())
    reference.get_layer("mid").trainable = False
    optimizers = [keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2) for _ in range(2)]

    def step_of(m, optimizer):
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = keras.losses.mean_squared_error(y, m(x, training=True))
            grads = tape.gradient(loss, m.trainable_variables)
            optimizer.apply_gradients(zip(grads, m.trainable_variables))
            return loss
        return step

    frozen_step = gf.freeze("mid/*")(step_of(model, optimizers[0]))
    outer = tf.function(lambda x, y: frozen_step(x, y))
    ref_step = tf.function(step_of(reference, optimizers[1]))
    frozen = snapshot(model.get_layer("mid").variables)
    for i in range(4):
        x, y = X[i * 8:(i + 1) * 8], Y[i * 8:(i + 1) * 8]
        outer(x, y)
        ref_step(x, y)
    _assert_matches(model, reference, frozen, "float32")


def _failing_pass(program, plan):
    raise ValueError("an error graphfreeze did not anticipate")


def test_unexpected_failure_is_an_unsupported_graph_error_and_unfreeze_recovers(monkeypatch):
    import graphfreeze.passes as passes

    model, _ = _pair("mixed_float16", "plain")
    plain = _model(seed=1)
    plain.set_weights(model.get_weights())
    plain.compile(optimizer=_optimizer("plain"), loss="mse")
    initial = snapshot(model.weights)
    monkeypatch.setattr(passes, "TRAINING_PIPELINE", (*passes.TRAINING_PIPELINE[:2], _failing_pass))
    with pytest.raises(gf.UnsupportedGraphError) as info:
        model.fit(X, Y, **FIT)
    message = str(info.value)
    assert "one_step_on_data" in message and "_failing_pass" in message
    assert "@gf.freeze" in message and "gf.keras.unfreeze" in message
    # Keras's traceback filtering drops __cause__ in fit, so the original is kept too.
    assert isinstance(info.value.original, ValueError)
    assert all(np.array_equal(v, initial[p]) for p, v in snapshot(model.weights).items())
    monkeypatch.undo()
    gf.keras.unfreeze(model)  # the model still trains without graphfreeze
    model.fit(X, Y, **FIT)
    plain.fit(X, Y, **FIT)
    for a, b in zip(model.weights, plain.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-3, rtol=0, err_msg=a.path)


def test_unexpected_failure_names_the_body(monkeypatch):
    from graphfreeze.program import Program

    def fail_on_branches(self, name, fdef):
        if "cond" in name:
            raise TypeError("cannot load this body")
        return original(self, name, fdef)

    original = Program._load_body
    monkeypatch.setattr(Program, "_load_body", fail_on_branches)
    model, _ = _pair("float32", "accum")
    with pytest.raises(gf.UnsupportedGraphError, match=r"function body '[^']*cond[^']*'") as info:
        model.fit(X, Y, **FIT)
    assert isinstance(info.value.original, TypeError)
    step = gf.freeze("mid/*")(lambda x, y: model.train_step((x, y)))  # outside Keras: chained
    with pytest.raises(gf.UnsupportedGraphError, match="function body") as info:
        step(X[:8], Y[:8])
    assert isinstance(info.value.__cause__, TypeError)
