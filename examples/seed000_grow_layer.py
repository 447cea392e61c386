"""Seed 000: a trained Dense(10) grown to Dense(11); train only the new unit.

"Consider a (dense) layer of 10 units. I now want to add another (single) unit to this
layer. But how can I make sure that the previous 10 weights are not trained, and only the
new ones are?" We train a small network, grow its hidden layer to 11 units (the new unit's
outgoing weights start at zero, so the grown network computes exactly what the old one
did), and freeze everything old with three partial rules. The script checks its claim:
only the new unit's kernel column, bias entry and outgoing row change, bitwise.

    python examples/seed000_grow_layer.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphfreeze as gf  # noqa: E402


def network(units: int) -> keras.Model:
    return keras.Sequential([keras.Input((4,)),
                             keras.layers.Dense(units, activation="relu", name="hidden"),
                             keras.layers.Dense(1, name="out")])


def main(steps: int = 200) -> int:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = (np.sin(x[:, :1] * 2) + x[:, 1:2] ** 2).astype("float32")

    old = network(10)
    old.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    old.fit(x, y, epochs=30, batch_size=64, verbose=0)

    # Grow: copy the 10 trained units, add unit 10 with a zero outgoing weight.
    grown = network(11)
    (k1, b1), (k2, b2) = old.get_layer("hidden").get_weights(), old.get_layer("out").get_weights()
    new_k1, new_b1, new_k2, _ = (w.numpy() for w in grown.weights)
    new_k1[:, :10], new_b1[:10], new_k2[:10], new_k2[10] = k1, b1, k2, 0.0
    grown.set_weights([new_k1, new_b1, new_k2, b2])
    assert np.allclose(grown(x), old(x), atol=1e-6), "the grown network must start as the old one"

    optimizer = keras.optimizers.Adam(1e-2)
    mse = keras.losses.MeanSquaredError()

    @gf.freeze(gf.Columns("hidden/kernel", range(10)),   # old units' incoming weights
               gf.Rows("hidden/bias", range(10)),        # old units' biases
               gf.Rows("out/kernel", range(10)),         # old units' outgoing weights
               "out/bias")
    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = mse(yb, grown(xb, training=True))
        grads = tape.gradient(loss, grown.trainable_variables)
        optimizer.apply_gradients(zip(grads, grown.trainable_variables))
        return loss

    before = [w.numpy().copy() for w in grown.weights]
    start = float(mse(y, grown(x)))
    for _ in range(steps):
        loss = train_step(x, y)
    print(train_step.rewritten(x, y).report())
    print(f"loss {start:.4f} -> {float(loss):.4f} by training the new unit only")

    after = [w.numpy() for w in grown.weights]
    new_entries = [(slice(None), 10), 10, 10, None]  # kernel column, bias entry, outgoing row
    ok = True
    for b, a, new in zip(before, after, new_entries):
        keep = np.ones(b.shape, bool)
        if new is not None:
            keep[new] = False
        ok &= np.array_equal(a[keep], b[keep]) and (new is None or not np.array_equal(a[~keep], b[~keep]))
    print("claim: only the new unit's kernel column, bias entry and outgoing row trained:",
          "OK" if ok else "VIOLATED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
