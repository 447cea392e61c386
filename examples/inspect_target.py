"""A step for `graphfreeze inspect`: the convention is a module-level step and example_args.

    graphfreeze inspect examples/inspect_target.py --rule 'encoder/*' --html report.html
    graphfreeze inspect examples/inspect_target.py --rule 'Rows(embedding/embeddings, 0:20)'
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

keras.utils.set_random_seed(0)
model = keras.Sequential([
    keras.Input((16,), dtype="int32"),
    keras.layers.Embedding(200, 32, name="embedding"),
    keras.layers.Conv1D(32, 3, activation="relu", name="encoder"),
    keras.layers.GlobalMaxPooling1D(),
    keras.layers.Dense(32, activation="relu", name="hidden"),
    keras.layers.Dense(4, name="head"),
])
optimizer = keras.optimizers.AdamW(1e-3)
xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@tf.function
def train_step(tokens, labels):
    with tf.GradientTape() as tape:
        loss = xent(labels, model(tokens, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss


def example_args():
    rng = np.random.default_rng(0)
    return rng.integers(0, 200, (8, 16)).astype("int32"), rng.integers(0, 4, (8,)).astype("int32")
