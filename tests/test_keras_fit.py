"""Keras integration (issue 6): model.fit with freeze rules."""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_models, mlp, snapshot, twin
from references import MaskedEmbedding, keep_of

import graphfreeze as gf

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 6)).astype("float32")
Y = RNG.normal(size=(64, 3)).astype("float32")
FIT = {"batch_size": 16, "epochs": 2, "shuffle": False, "verbose": 0}
OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw_decay": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1),
}


def _reference(model, frozen_layers, make_opt, **compile_kw):
    """Keras trainable=False, recompiled correctly (the step Keras users must not forget)."""
    ref = twin(model, mlp)
    for name in frozen_layers:
        ref.get_layer(name).trainable = False
    ref.compile(optimizer=make_opt(), loss="mse", **compile_kw)
    return ref


@pytest.mark.parametrize("order", ["compile_then_freeze", "freeze_then_compile"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_fit_whole_layers_equals_recompiled_trainable_false(opt_name, order):
    model = mlp()
    reference = _reference(model, ["hidden1", "hidden2"], OPTIMIZERS[opt_name])
    if order == "compile_then_freeze":
        model.compile(optimizer=OPTIMIZERS[opt_name](), loss="mse")
        gf.keras.freeze(model, "hidden1/*", "hidden2/*")
    else:
        gf.keras.freeze(model, "hidden1/*", "hidden2/*")
        model.compile(optimizer=OPTIMIZERS[opt_name](), loss="mse")
    frozen = snapshot(model.get_layer("hidden1").variables + model.get_layer("hidden2").variables)
    history = model.fit(X, Y, **FIT)
    ref_history = reference.fit(X, Y, **FIT)
    after = snapshot(model.get_layer("hidden1").variables + model.get_layer("hidden2").variables)
    assert all(np.array_equal(v, frozen[p]) for p, v in after.items())  # S1
    assert_close_models(model, reference)  # S2
    np.testing.assert_allclose(history.history["loss"], ref_history.history["loss"], rtol=1e-5)
    assert gf.keras.rewritten(model).report().frozen["sequential/hidden1/kernel"] == 72


def _embedding_model(layer=keras.layers.Embedding, **kw):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((5,), dtype="int32"), layer(30, 4, name="emb", **kw),
                             keras.layers.Flatten(), keras.layers.Dense(2, name="out")])


@pytest.mark.parametrize("order", ["compile_then_freeze", "freeze_then_compile"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_fit_embedding_rows(opt_name, order):
    rows = [0, 4, 7, 29]
    ids = RNG.integers(0, 30, (64, 5)).astype("int32")
    targets = RNG.normal(size=(64, 2)).astype("float32")
    model = _embedding_model()
    initial = model.get_weights()
    before = model.get_layer("emb").embeddings.numpy().copy()
    steps = [lambda: model.compile(optimizer=OPTIMIZERS[opt_name](), loss="mse"),
             lambda: gf.keras.freeze(model, gf.Rows("emb/embeddings", rows))]
    for call in steps if order == "compile_then_freeze" else steps[::-1]:
        call()
    model.fit(ids, targets, **FIT)
    after = model.get_layer("emb").embeddings.numpy()
    assert np.array_equal(after[rows], before[rows])  # S1, weight decay included
    assert not np.array_equal(np.delete(after, rows, 0), np.delete(before, rows, 0))
    if opt_name == "adam":  # S2 against the seed-002 mask (no weight decay in the reference)
        frozen = np.zeros((30, 4), bool)
        frozen[rows] = True
        reference = _embedding_model(layer=MaskedEmbedding, keep=keep_of(frozen))
        reference.set_weights(initial)
        reference.compile(optimizer=OPTIMIZERS[opt_name](), loss="mse")
        reference.fit(ids, targets, **FIT)
        assert_close_models(model, reference)


def test_rules_changed_between_fits_and_unfreeze():
    model = mlp()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    gf.keras.freeze(model, "hidden1/*")
    model.fit(X, Y, **FIT)
    h1, h2 = model.get_layer("hidden1"), model.get_layer("hidden2")
    before = snapshot(h1.variables + h2.variables)
    gf.keras.freeze(model, "hidden2/*")  # no recompile
    model.fit(X, Y, **FIT)
    after = snapshot(h1.variables + h2.variables)
    assert all(np.array_equal(after[v.path], before[v.path]) for v in h2.variables)
    assert all(not np.array_equal(after[v.path], before[v.path]) for v in h1.variables)
    gf.keras.unfreeze(model)
    assert gf.keras.rules(model) == []
    model.fit(X, Y, **FIT)
    final = snapshot(model.variables)
    assert all(not np.array_equal(final[p], after[p]) for p in after)


def test_unfreeze_restores_plain_keras_training():
    model = mlp()
    plain = twin(model, mlp)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    plain.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    gf.keras.unfreeze(gf.keras.freeze(model, "hidden1/*"))
    model.fit(X, Y, **FIT)
    plain.fit(X, Y, **FIT)
    assert_close_models(model, plain)


def test_fit_with_callbacks_validation_tf_data_steps_per_execution_and_xla():
    model = mlp()
    reference = _reference(model, ["hidden1"], lambda: keras.optimizers.Adam(1e-2),
                           steps_per_execution=3, jit_compile=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"],
                  steps_per_execution=3, jit_compile=True)
    gf.keras.freeze(model, "hidden1/*")
    batches = []
    callback = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: batches.append(b))
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(8)
    frozen = snapshot(model.get_layer("hidden1").variables)
    # At least steps_per_execution batches to evaluate: Keras 3.3's evaluate returns no logs
    # for fewer (without graphfreeze too), and fit then fails reading them.
    validation = {"validation_data": (X[:16], Y[:16]), "validation_batch_size": 4}
    history = model.fit(data, epochs=2, callbacks=[callback], verbose=0, **validation)
    reference.fit(data, epochs=2, verbose=0, **validation)
    assert {"loss", "mae", "val_loss", "val_mae"} <= set(history.history)
    assert batches, "callbacks ran"
    def unchanged():
        return all(np.array_equal(v, frozen[p])
                   for p, v in snapshot(model.get_layer("hidden1").variables).items())

    assert unchanged()
    assert_close_models(model, reference, atol=1e-4)
    model.evaluate(X, Y, batch_size=8, verbose=0)  # evaluation still works and changes nothing
    assert unchanged()


def test_train_on_batch():
    model = mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    model.train_on_batch(X[:8], Y[:8])  # momentum built up before freezing
    gf.keras.freeze(model, gf.Columns("out/kernel", [0]))
    kernel = model.get_layer("out").kernel.numpy().copy()
    for i in range(3):
        model.train_on_batch(X[i * 8:(i + 1) * 8], Y[i * 8:(i + 1) * 8])
    after = model.get_layer("out").kernel.numpy()
    assert np.array_equal(after[:, 0], kernel[:, 0]) and not np.array_equal(after[:, 1:], kernel[:, 1:])


def test_saved_files_are_plain_keras(tmp_path):
    model = mlp()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    gf.keras.freeze(model, "hidden1/*")
    model.fit(X, Y, **FIT)
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    with zipfile.ZipFile(tmp_path / "m.keras") as z:
        config = z.read("config.json").decode()
        assert "graphfreeze" not in config and "FrozenFunction" not in config
        json.loads(config)
    loaded = keras.models.load_model(tmp_path / "m.keras")
    plain = mlp(seed=5)  # built without graphfreeze, different initial values
    plain.load_weights(tmp_path / "m.weights.h5")
    expected = model.predict(X, verbose=0)
    np.testing.assert_array_equal(loaded.predict(X, verbose=0), expected)
    np.testing.assert_array_equal(plain.predict(X, verbose=0), expected)
    assert gf.keras.frozen_step(loaded) is None


def test_bad_rules_raise_at_freeze():
    model = mlp()
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(gf.RuleError, match="hiden1"):
        gf.keras.freeze(model, "hiden1/*")
    assert gf.keras.frozen_step(model) is None  # nothing half-applied
    with pytest.raises(gf.RuleError, match="Keras Model"):
        gf.keras.freeze(object(), "x")
    with pytest.raises(gf.RuleError, match="at least one rule"):
        gf.keras.freeze(model)


def test_globs_do_not_freeze_metrics_or_optimizer_state():
    """'*' means the model: metric totals and counts keep counting, Adam keeps its step."""
    model = mlp()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"])
    gf.keras.freeze(model, "*", gf.Unfreeze("out/*"))
    history = model.fit(X, Y, **FIT)
    frozen = set(gf.keras.rewritten(model).report().frozen)
    assert frozen == {v.path for v in model.weights if not v.path.startswith("sequential/out")}
    assert history.history["mae"][0] != history.history["mae"][1]
    assert int(model.optimizer.iterations.numpy()) == 2 * 64 // 16
    assert all(float(v.numpy()) > 0 for m in model.metrics for v in m.variables
               if v.path.endswith("count"))
