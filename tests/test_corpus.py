"""A corpus of real models (issue 4), built offline with weights=None. Marked slow:
CI runs them; skip locally with `-m "not slow"`."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_models, make_step, snapshot, twin

import graphfreeze as gf

pytestmark = pytest.mark.slow

APPLICATIONS = {
    "ResNet50": lambda: keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=5),
    "MobileNetV2": lambda: keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), classes=5),
    "EfficientNetB0": lambda: keras.applications.EfficientNetB0(weights=None, input_shape=(64, 64, 3),
                                                                classes=5),
}


def _images(n=3, batch=2):
    rng = np.random.default_rng(0)
    return [(rng.normal(size=(batch, 64, 64, 3)).astype("float32"),
             rng.integers(0, 5, size=(batch,)).astype("int32")) for _ in range(n)]


def _head(model):
    return model.layers[-1]


@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_backbone_frozen_head_trains(name):
    model = APPLICATIONS[name]()
    data = _images()
    xent = keras.losses.SparseCategoricalCrossentropy()
    head = _head(model)
    rw = gf.rewrite(make_step(model, keras.optimizers.Adam(1e-3), xent),
                    ["*", gf.Unfreeze(head)], *data[0])
    # RNG state (EfficientNet's dropout seeds) is not frozen by design: it keeps advancing.
    backbone = [v for v in model.variables if not any(v is w for w in head.variables)
                and "seed_generator_state" not in v.path]
    before = snapshot(backbone)
    head_before = snapshot(head.variables)
    for x, y in data:
        rw(x, y)
    after = snapshot(backbone)
    moved = [p for p in before if not np.array_equal(after[p], before[p])]
    assert moved == [], f"{len(moved)} backbone variables moved, e.g. {moved[:3]}"
    assert any("moving_mean" in p for p in before), "BatchNorm statistics are part of the check"
    assert all(not np.array_equal(v, head_before[p]) for p, v in snapshot(head.variables).items())
    assert rw.graph.number_of_nodes() < rw.original_graph.number_of_nodes() / 2


def test_resnet50_s2_and_s3_against_keras_trainable_false():
    """With frozen BatchNorm in inference mode the rewritten step equals the Keras
    trainable=False step and has no more ops than its graph."""
    build = APPLICATIONS["ResNet50"]
    model = build()
    reference = twin(model, build)
    for layer in reference.layers[:-1]:
        layer.trainable = False
    data = _images()
    xent = keras.losses.SparseCategoricalCrossentropy()
    rw = gf.rewrite(make_step(model, keras.optimizers.Adam(1e-3), xent),
                    ["*", gf.Unfreeze(_head(model))], *data[0], batchnorm_inference=True)
    ref_step = tf.function(make_step(reference, keras.optimizers.Adam(1e-3), xent))
    ref_ops = len(ref_step.get_concrete_function(*data[0]).graph.get_operations())
    for x, y in data:
        np.testing.assert_allclose(rw(x, y).numpy(), ref_step(x, y).numpy(), rtol=1e-4)
    assert_close_models(model, reference, atol=1e-5)
    assert rw.graph.number_of_nodes() <= ref_ops, (rw.graph.number_of_nodes(), ref_ops)


@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_text_classifier_mixed_precision_loss_scaling(mixed_precision):
    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((12,), dtype="int32"),
            keras.layers.Embedding(50, 16, name="embedding"),
            keras.layers.LSTM(16, name="lstm"),
            keras.layers.Dense(2, name="head", dtype="float32")])

    rng = np.random.default_rng(0)
    data = [(rng.integers(0, 50, (8, 12)).astype("int32"), rng.integers(0, 2, (8,)).astype("int32"))
            for _ in range(4)]
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def step_for(m, opt):
        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = xent(y, m(x, training=True))
                scaled = opt.scale_loss(loss)
            grads = tape.gradient(scaled, m.trainable_variables)
            opt.apply_gradients(zip(grads, m.trainable_variables))
            return loss
        return train_step

    model = build()
    reference = twin(model, build)
    reference.get_layer("embedding").trainable = False
    reference.get_layer("lstm").trainable = False
    lso = lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-2))  # noqa: E731
    rw = gf.rewrite(step_for(model, lso()), ["embedding/*", "lstm/*"], *data[0])
    ref_step = tf.function(step_for(reference, lso()))
    frozen = snapshot(model.get_layer("embedding").variables + model.get_layer("lstm").variables)
    for x, y in data:
        rw(x, y)
        ref_step(x, y)
    assert all(np.array_equal(v, frozen[p]) for p, v in snapshot(
        model.get_layer("embedding").variables + model.get_layer("lstm").variables).items())
    assert_close_models(model, reference, atol=1e-3)  # float16 compute

    # partial: domain-word rows of the embedding fixed, the rest and the LSTM train
    model2 = build()
    rows = [0, 7, 9]
    before = model2.get_layer("embedding").embeddings.numpy().copy()
    rw2 = gf.rewrite(step_for(model2, lso()), [gf.Rows("embedding/embeddings", rows)], *data[0])
    for x, y in data:
        rw2(x, y)
    after = model2.get_layer("embedding").embeddings.numpy()
    assert np.array_equal(after[rows], before[rows])
    assert not np.array_equal(after, before)


def test_transformer_encoder_block_attention_frozen():
    def build():
        keras.utils.set_random_seed(0)
        x = inputs = keras.Input((10, 16))
        attn = keras.layers.MultiHeadAttention(4, 4, name="attention")(x, x)
        x = keras.layers.LayerNormalization(name="ln1")(x + keras.layers.Dropout(0.0)(attn))
        ffn = keras.layers.Dense(16, name="ffn2")(keras.layers.Dense(32, activation="gelu",
                                                                     name="ffn1")(x))
        x = keras.layers.LayerNormalization(name="ln2")(x + ffn)
        x = keras.layers.GlobalAveragePooling1D()(x)
        return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))

    rng = np.random.default_rng(0)
    data = [(rng.normal(size=(4, 10, 16)).astype("float32"), rng.integers(0, 3, (4,)).astype("int32"))
            for _ in range(4)]
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = build()
    reference = twin(model, build)
    reference.get_layer("attention").trainable = False
    rw = gf.rewrite(make_step(model, keras.optimizers.AdamW(1e-3), xent), ["attention/*"], *data[0])
    ref_step = tf.function(make_step(reference, keras.optimizers.AdamW(1e-3), xent))
    frozen = snapshot(model.get_layer("attention").variables)
    for x, y in data:
        rw(x, y)
        ref_step(x, y)
    assert all(np.array_equal(v, frozen[p]) for p, v in
               snapshot(model.get_layer("attention").variables).items())
    assert_close_models(model, reference)
