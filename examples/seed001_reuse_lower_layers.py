"""Seed 001: reuse a trained network's lower layers, lock two of them, replace the head.

The original network is the one from the question (500-300-100-50-5). We train it
briefly and save it. A new network is built from scratch under new layer names
(500-300-100-50 and a new 5-unit output); `transfer` matches it against the saved file's
graph and copies hidden1-3 into it. We lock the copies of hidden1 and hidden2 with the
decorator, train, and print the match table and the report. The script checks its claim:
the three layers arrived bitwise, hidden1-2 are unchanged by training, hidden3 and the new
head trained.

    python examples/seed001_reuse_lower_layers.py
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphfreeze as gf  # noqa: E402
from graphfreeze.transfer import transfer  # noqa: E402


def original_network() -> keras.Model:
    return keras.Sequential([
        keras.Input((500,), name="X"),
        keras.layers.Dense(300, activation="relu", name="hidden1"),
        keras.layers.Dense(100, activation="relu", name="hidden2"),
        keras.layers.Dense(50, activation="relu", name="hidden3"),
        keras.layers.Dense(5, name="output"),
    ], name="original")


def new_network() -> keras.Model:
    return keras.Sequential([
        keras.Input((500,), name="features"),
        keras.layers.Dense(300, activation="relu", name="layer1"),
        keras.layers.Dense(100, activation="relu", name="layer2"),
        keras.layers.Dense(50, activation="relu", name="layer3"),
        keras.layers.Dense(5, name="new_output"),
    ], name="new")


def data(n: int, seed: int, teacher: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(n, 500)).astype("float32")
    return x, np.argmax(x @ teacher, axis=1).astype("int64")


def train(step, x, y, epochs: int, batch: int = 64) -> float:
    loss = 0.0
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            loss = float(step(x[i:i + batch], y[i:i + batch]))
    return loss


def main(epochs: int = 2) -> int:
    keras.utils.set_random_seed(1)
    teacher = np.random.default_rng(0).normal(size=(500, 5)).astype("float32")
    x, y = data(1024, 1, teacher)
    xentropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # 1. Train the original network briefly and save it.
    original = original_network()
    original.compile(optimizer=keras.optimizers.SGD(0.01), loss=xentropy)
    original.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    path = os.path.join(tempfile.mkdtemp(), "original.keras")
    original.save(path)

    # 2. A new network: transfer copies what its graph shares with the saved one. The new
    #    output layer has the old one's shape and place, so it would match too: excluding it
    #    keeps the head freshly initialised, as the question asks.
    new = new_network()
    copied = transfer(path, new, exclude=["new_output"])
    print(copied)
    print()
    locked = copied[:2]   # the copies of hidden1 and hidden2; hidden3's copy keeps training
    arrived = all(s.numpy().tobytes() == t.numpy().tobytes()
                  for p in copied.pairs for s, t in zip(p.source.weights, p.target.weights))
    optimizer = keras.optimizers.SGD(0.01)
    x2, y2 = data(1024, 2, teacher[:, ::-1].copy())  # the new task: a permuted teacher

    # 3. Lock hidden1 and hidden2: they run forward, but nothing of their training does.
    @gf.freeze(*locked)
    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = xentropy(yb, new(xb, training=True))
        grads = tape.gradient(loss, new.trainable_variables)
        optimizer.apply_gradients(zip(grads, new.trainable_variables))
        return loss

    before = {v.path: v.numpy().copy() for v in new.variables}
    loss = train(train_step, x2, y2, epochs)
    rw = train_step.rewritten(x2[:64], y2[:64])
    print(rw.report())
    print(f"final loss on the new task: {loss:.4f}")

    changed = {v.path: not np.array_equal(v.numpy(), before[v.path]) for v in new.variables}
    frozen = [v.path for layer in locked for v in layer.weights]
    trained = [p for p in changed if p not in frozen]
    names = [(p.source.name, p.target.name) for p in copied.pairs]
    ok = (names == [("hidden1", "layer1"), ("hidden2", "layer2"), ("hidden3", "layer3")]
          and arrived and not any(changed[p] for p in frozen) and all(changed[p] for p in trained))
    print("claim: hidden1-3 transferred bitwise from the saved file; hidden1-2 bitwise "
          "unchanged, hidden3 and the new output trained:", "OK" if ok else "VIOLATED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
