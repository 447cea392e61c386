"""Issue 9 bench: MirroredStrategy on two logical CPU devices, graphfreeze against Keras
`trainable=False` under the same strategy, interleaved in one process.

A deep MLP (6 hidden layers of 512, global batch 256, AdamW), the 4 lowest layers frozen,
trained with a custom `strategy.run` step.

    python bench/bench_distribute.py [--rounds 7] [--quick]
"""

from __future__ import annotations

import sys

import common  # noqa: F401  (sets TF log level first)
import tensorflow as tf

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import graphfreeze as gf  # noqa: E402


def build(strategy, width, depth, frozen_layers=()):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((width,))] +
                                 [keras.layers.Dense(width, activation="relu", name=f"hidden{i + 1}")
                                  for i in range(depth)] + [keras.layers.Dense(10, name="out")])
        for name in frozen_layers:
            model.get_layer(name).trainable = False
        optimizer = keras.optimizers.AdamW(1e-3)
        optimizer.build(model.trainable_variables)
    return model, optimizer


def distributed_step(strategy, model, optimizer, global_batch):
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    step_fn = common.train_step(model, optimizer, lambda y, logits: xent(y, logits) / global_batch)

    @tf.function
    def dist_step(x, y):
        return strategy.reduce("SUM", strategy.run(step_fn, args=(x, y)), axis=None)

    return dist_step


def main(argv=None) -> int:
    args = common.arguments(__doc__, rounds=7, steps=10).parse_args(argv)
    width, depth, batch = (128, 6, 64) if args.quick else (512, 6, 256)
    frozen = [f"hidden{i + 1}" for i in range(4)]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, width)).astype("float32")
    y = rng.integers(0, 10, size=(batch,)).astype("int32")
    data = next(iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(batch))))

    ours = build(strategy, width, depth)
    reference = build(strategy, width, depth, frozen)
    rw = gf.rewrite(distributed_step(strategy, *ours, batch), [f"{n}/*" for n in frozen], *data)
    ref_step = distributed_step(strategy, *reference, batch)
    full_step = distributed_step(strategy, *build(strategy, width, depth), batch)
    times = common.interleaved({"graphfreeze": lambda: rw(*data),
                                "keras trainable=False": lambda: ref_step(*data),
                                "train everything": lambda: full_step(*data)},
                               rounds=args.rounds, steps=args.steps)
    path = common.publish(
        "distribute", f"MirroredStrategy, 2 logical CPUs: MLP {depth}x{width}, global batch {batch}, "
        f"AdamW, 4 lowest layers frozen (median of {args.rounds} rounds x {args.steps} steps)",
        times, "keras trainable=False", "ratio_vs_keras_trainable_false",
        {"strategy": "MirroredStrategy(2 logical CPUs)", "width": width, "depth": depth,
         "frozen": len(frozen), "global_batch": batch, "optimizer": "AdamW",
         "rounds": args.rounds, "steps_per_round": args.steps}, argv, "bench_distribute.py",
        args.quick)
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
