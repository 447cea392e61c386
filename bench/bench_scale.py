"""Learning-rate multipliers: `gf.layer_decay` (one optimizer, updates scaled in the graph)
against the classic recipe, one optimizer per layer with its decayed learning rate, and
against plain training with no multipliers.

A deep MLP (8 hidden layers of 1024, batch 256), AdamW, layer decay 0.8:

* graphfreeze: the plain step, `gf.freeze(*gf.layer_decay(model, 0.8))`;
* per-layer optimizers: the same step with one AdamW per layer (learning rate times
  0.8 ** depth-from-the-top), applied one after another in one `tf.function`;
* plain: the same step, one AdamW, no multipliers.

All three run interleaved in one process.

    python bench/bench_scale.py [--rounds 7] [--quick]
"""

from __future__ import annotations

import sys

import common
import keras
import numpy as np
import tensorflow as tf

import graphfreeze as gf

DECAY = 0.8


def network(depth: int, width: int, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((width,))] + [
        keras.layers.Dense(width, activation="relu", name=f"hidden{i}") for i in range(depth)
    ] + [keras.layers.Dense(10, name="head")])


def per_layer_step(model: keras.Model, lr: float):
    """The classic recipe: one optimizer per layer, learning rate decayed from the top."""
    layers = [layer for layer in model.layers if layer.trainable_weights]
    groups = [(keras.optimizers.AdamW(lr * DECAY ** (len(layers) - 1 - i)), layer.trainable_variables)
              for i, layer in enumerate(layers)]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, variables)
        at = 0
        for optimizer, vs in groups:
            optimizer.apply_gradients(zip(grads[at:at + len(vs)], vs))
            at += len(vs)
        return loss

    return step


def main(argv=None) -> int:
    args = common.arguments(__doc__, rounds=7, steps=10).parse_args(argv)
    depth, width, batch = (4, 256, 64) if args.quick else (8, 1024, 256)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(batch, width)).astype("float32")
    y = rng.integers(0, 10, batch).astype("int32")
    lr = 1e-3

    models = [network(depth, width) for _ in range(3)]
    gf_step = gf.freeze(*gf.layer_decay(models[0], DECAY))(
        tf.function(common.train_step(models[0], keras.optimizers.AdamW(lr))))
    reference = tf.function(per_layer_step(models[1], lr))
    plain = tf.function(common.train_step(models[2], keras.optimizers.AdamW(lr)))

    times = common.interleaved({
        "graphfreeze (gf.layer_decay)": lambda: gf_step(x, y),
        "one optimizer per layer": lambda: reference(x, y),
        "plain (no multipliers)": lambda: plain(x, y),
    }, rounds=args.rounds, steps=args.steps)
    path = common.publish(
        "scale", f"Layer decay {DECAY} over an MLP of {depth}x{width} + head, batch {batch}, AdamW "
        f"(median of {args.rounds} rounds x {args.steps} steps)", times, "one optimizer per layer",
        "ratio_vs_per_layer_optimizers",
        {"depth": depth, "width": width, "batch": batch, "decay": DECAY, "optimizer": "AdamW",
         "rounds": args.rounds, "steps_per_round": args.steps}, argv, "bench_scale.py", args.quick)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
