"""Frozen-prefix activation cache (issue 8)."""

from __future__ import annotations

import glob

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_models, make_step, snapshot, twin

import graphfreeze as gf

RNG = np.random.default_rng(0)
X = RNG.normal(size=(96, 20)).astype("float32")
Y = RNG.integers(0, 4, size=(96,)).astype("int32")
XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def dataset(batch=16):
    return tf.data.Dataset.from_tensor_slices((X, Y)).batch(batch)


def seed001_net(middle=()):
    """The seed-001 shape at small size; `middle` layers go between hidden1 and hidden2."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((20,)),
                             keras.layers.Dense(16, activation="relu", name="hidden1"), *middle,
                             keras.layers.Dense(12, activation="relu", name="hidden2"),
                             keras.layers.Dense(8, activation="relu", name="hidden3"),
                             keras.layers.Dense(4, name="output")])


def _uncached(model, rules, epochs, **kw):
    step = gf.freeze(*rules, **kw)(make_step(model, keras.optimizers.Adam(1e-2), XENT))
    for _ in range(epochs):
        for x, y in dataset():
            step(x, y)


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_cached_training_equals_uncached_frozen_step(storage, tmp_path):
    model = seed001_net()
    reference = twin(model, seed001_net)
    rules = ["hidden1/*", "hidden2/*"]
    frozen = snapshot(model.get_layer("hidden1").variables + model.get_layer("hidden2").variables)
    path = str(tmp_path / "activations") if storage == "disk" else ""
    trainer = gf.cache_frozen_prefix(make_step(model, keras.optimizers.Adam(1e-2), XENT), rules,
                                     dataset(), cache=path, verbose=0)
    history = trainer.fit(epochs=3)
    _uncached(reference, rules, epochs=3)
    assert len(history) == 3 and len(history[0]) == 6
    assert_close_models(model, reference)
    after = snapshot(model.get_layer("hidden1").variables + model.get_layer("hidden2").variables)
    assert all(np.array_equal(v, frozen[p]) for p, v in after.items())
    cached = [n for n, _ in trainer.frontier.tensors]
    assert any("hidden2" in n for n in cached), cached
    if storage == "disk":
        assert glob.glob(path + "*"), "tf.data wrote the cache to disk"
    text = trainer.report()
    assert "ops computed once per batch" in text and "hidden3" in text


def test_keras_model_through_the_cache_equals_fit():
    model = seed001_net()
    reference = twin(model, seed001_net)
    for m in (model, reference):
        m.compile(optimizer=keras.optimizers.Adam(1e-2), loss=XENT, metrics=["accuracy"])
    trainer = gf.cache_frozen_prefix(model, ["hidden1/*", "hidden2/*"], dataset(), verbose=0)
    history = trainer.fit(epochs=2)
    gf.keras.freeze(reference, "hidden1/*", "hidden2/*")
    ref_history = reference.fit(dataset(), epochs=2, verbose=0)
    assert_close_models(model, reference)
    np.testing.assert_allclose(history["loss"], ref_history.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(history["accuracy"], ref_history.history["accuracy"], rtol=1e-5)


def test_conv_backbone_with_batchnorm_in_inference_mode():
    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((8, 8, 3)), keras.layers.Conv2D(6, 3, name="conv1"),
            keras.layers.BatchNormalization(name="bn1"), keras.layers.ReLU(),
            keras.layers.Conv2D(6, 3, name="conv2"), keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4, name="head")])

    images = RNG.normal(size=(48, 8, 8, 3)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((images, Y[:48])).batch(12)
    model, reference = build(), build()
    reference.set_weights(model.get_weights())
    rules = ["conv1/*", "bn1/*", "conv2/*"]
    with pytest.raises(gf.CacheError, match=r"reduces over the batch axis.*batchnorm_inference=True"):
        gf.cache_frozen_prefix(make_step(model, keras.optimizers.Adam(1e-2), XENT), rules, data)
    trainer = gf.cache_frozen_prefix(make_step(model, keras.optimizers.Adam(1e-2), XENT), rules, data,
                                     batchnorm_inference=True, verbose=0)
    trainer.fit(epochs=2)
    step = gf.freeze(*rules, batchnorm_inference=True)(
        make_step(reference, keras.optimizers.Adam(1e-2), XENT))
    for _ in range(2):
        for x, y in data:
            step(x, y)
    assert_close_models(model, reference)
    assert any("Mean" in n or "global_average" in n for n, _ in trainer.frontier.tensors)


def test_random_op_in_the_prefix_is_refused_by_name():
    model = seed001_net(middle=[keras.layers.Dropout(0.5, name="drop")])
    step = make_step(model, keras.optimizers.Adam(1e-2), XENT)
    with pytest.raises(gf.CacheError, match=r"random op \(Dropout, augmentation\)") as e:
        gf.cache_frozen_prefix(step, ["hidden1/*", "hidden2/*"], dataset())
    assert "drop" in str(e.value) and "'sequential/hidden2/kernel'" in str(e.value)
    trainer = gf.cache_frozen_prefix(step, ["hidden1/*", "hidden2/*"], dataset(), strict=False,
                                     verbose=0)
    # cached up to the dropout's random draw: hidden1 is computed once, hidden2 every step
    assert any(n.endswith("hidden1_1/MatMul") for n in trainer.frontier.prefix)
    assert not any("hidden2" in n for n in trainer.frontier.prefix)
    trainer.fit(epochs=1)


def test_trainable_variable_below_the_frontier_is_refused_by_name():
    model = seed001_net()
    step = make_step(model, keras.optimizers.Adam(1e-2), XENT)
    with pytest.raises(gf.CacheError, match=r"hidden1.*not fully frozen") as e:
        gf.cache_frozen_prefix(step, ["hidden2/*"], dataset())
    assert "MatMul" in str(e.value)


def test_forward_function_is_refused():
    model = seed001_net()
    with pytest.raises(gf.CacheError, match="takes no gradients"):
        gf.cache_frozen_prefix(lambda x, y: model(x), ["hidden1/*"], dataset())
