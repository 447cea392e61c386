"""Seed 004: train output unit 1 while output unit 0 stays exactly unchanged.

The 3-4-2 MLP of the question, with y0 = x1+x2+x3 and y1 = x1^2+x2^2+x3^2. Output 0
depends on the hidden layer, column 0 of the output kernel and bias entry 0; freezing
exactly those keeps output 0 bitwise constant on every input, while column 1 and bias
entry 1 learn output 1. The script checks its claim on fresh inputs.

    python examples/seed004_keep_output_constant.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphfreeze as gf  # noqa: E402


def main(steps: int = 300) -> int:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((64, 3)).astype("float32")
    y = np.stack([x.sum(1), (x ** 2).sum(1)], axis=1).astype("float32")
    x_test = rng.random((1000, 3)).astype("float32")

    model = keras.Sequential([keras.Input((3,)),
                              keras.layers.Dense(4, activation="sigmoid", name="hidden"),
                              keras.layers.Dense(2, name="out")])
    optimizer = keras.optimizers.Adam(0.05)

    @gf.freeze("hidden/*", gf.Columns("out/kernel", [0]), gf.Rows("out/bias", [0]))
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    out0_before = model.predict(x_test, verbose=0)[:, 0]
    err1_before = float(np.mean((model.predict(x, verbose=0)[:, 1] - y[:, 1]) ** 2))
    for _ in range(steps):
        train_step(x, y)
    print(train_step.rewritten(x, y).report())
    pred = model.predict(x_test, verbose=0)
    err1_after = float(np.mean((model.predict(x, verbose=0)[:, 1] - y[:, 1]) ** 2))
    print(f"output 1 squared error {err1_before:.4f} -> {err1_after:.4f}")

    ok = np.array_equal(pred[:, 0], out0_before) and err1_after < 0.5 * err1_before
    print("claim: output 0 bitwise constant on 1000 fresh inputs while output 1 learns:",
          "OK" if ok else "VIOLATED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
