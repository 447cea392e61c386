"""Seed 001, second half: "cache the output of the top locked layer for each input, to
speed up training".

The seed-001 network (500-300-100-50-5) with hidden1 and hidden2 locked. graphfreeze finds
the frontier on the rewritten training step (hidden2's output, plus the labels), computes
it once for the whole dataset, and trains hidden3 and the output layer from the cache,
updating the original model. The script checks its claim: the cached training gives the
same model as the uncached frozen step on the same batches, hidden1 and hidden2 unchanged.

    python examples/seed001_bottleneck_cache.py
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphfreeze as gf  # noqa: E402

RULES = ["hidden1/*", "hidden2/*"]


def network() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((500,), name="X"),
        keras.layers.Dense(300, activation="relu", name="hidden1"),
        keras.layers.Dense(100, activation="relu", name="hidden2"),
        keras.layers.Dense(50, activation="relu", name="hidden3"),
        keras.layers.Dense(5, name="output"),
    ])


def train_step_for(model: keras.Model):
    optimizer = keras.optimizers.SGD(0.05)
    xentropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = xentropy(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return train_step


def main(epochs: int = 5) -> int:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 500)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(500, 5)), axis=1).astype("int64")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(128)

    cached_model, plain_model = network(), network()
    locked = {v.path: v.numpy().copy() for n in ("hidden1", "hidden2")
              for v in cached_model.get_layer(n).variables}

    trainer = gf.cache_frozen_prefix(train_step_for(cached_model), RULES, data, verbose=0)
    print(trainer.rewritten.report())
    print(trainer.report())
    start = time.perf_counter()
    history = trainer.fit(epochs=epochs)
    cached_time = (time.perf_counter() - start) / epochs

    step = gf.freeze(*RULES)(train_step_for(plain_model))  # the same, without the cache
    start = time.perf_counter()
    for _ in range(epochs):
        for xb, yb in data:
            step(xb, yb)
    plain_time = (time.perf_counter() - start) / epochs
    print(f"final loss {float(history[-1][-1]):.4f}; epoch time {cached_time * 1e3:.0f} ms from the "
          f"cache vs {plain_time * 1e3:.0f} ms recomputing the locked layers "
          f"(caching took {trainer.cache_seconds * 1e3:.0f} ms once)")

    same = all(np.allclose(a.numpy(), b.numpy(), atol=1e-5)
               for a, b in zip(cached_model.variables, plain_model.variables))
    unchanged = all(np.array_equal(v.numpy(), locked[v.path]) for n in ("hidden1", "hidden2")
                    for v in cached_model.get_layer(n).variables)
    ok = same and unchanged
    print("claim: training from the cache equals the uncached frozen step; hidden1-2 unchanged:",
          "OK" if ok else "VIOLATED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
