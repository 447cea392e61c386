"""Issue 17 bench: `model.fit` with a frozen backbone under mixed precision (the GPU recipe).

A keras.applications MobileNetV2 (`weights=None`) whose backbone is frozen and whose head
trains, compiled with Adam under a `mixed_float16` policy (Keras wraps the optimizer in a
LossScaleOptimizer) and fit epoch by epoch: `gf.keras.freeze(model, "*",
gf.Unfreeze(head), batchnorm_inference=True)` against a twin with `trainable=False` on the
backbone layers, epochs interleaved in one process, and the same under float32.

    python bench/bench_fit.py [--rounds 5] [--quick]
"""

from __future__ import annotations

import sys

import common
import keras
import numpy as np
import tensorflow as tf

import graphfreeze as gf


def _models(image: int, classes: int) -> tuple[keras.Model, keras.Model]:
    def build():
        keras.utils.set_random_seed(0)
        return keras.applications.MobileNetV2(weights=None, input_shape=(image, image, 3),
                                              classes=classes)

    ours, reference = build(), build()
    reference.set_weights(ours.get_weights())
    for layer in reference.layers[:-1]:
        layer.trainable = False
    for m in (ours, reference):
        m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    gf.keras.freeze(ours, "*", gf.Unfreeze(ours.layers[-1]), batchnorm_inference=True)
    return ours, reference


def bench_policy(policy: str, image: int, batch: int, batches: int, rounds: int) -> dict:
    keras.mixed_precision.set_global_policy(policy)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * batches, image, image, 3)).astype("float32")
    y = rng.integers(0, 10, size=(batch * batches,)).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).cache()
    ours, reference = _models(image, 10)

    def epoch(model):
        return lambda: model.fit(data, epochs=1, verbose=0)

    times = common.interleaved({"graphfreeze": epoch(ours), "keras trainable=False": epoch(reference)},
                               rounds=rounds, steps=1, warmup=1)
    keras.mixed_precision.set_global_policy("float32")
    return {"policy": policy, "seconds_per_epoch": times,
            "ratio": times["graphfreeze"] / times["keras trainable=False"],
            "optimizer": type(ours.optimizer).__name__}


def main(argv=None) -> int:
    args = common.arguments(__doc__, rounds=5).parse_args(argv)
    image, batch, batches = (32, 4, 2) if args.quick else (96, 16, 8)
    results = [bench_policy(p, image, batch, batches, args.rounds)
               for p in ("mixed_float16", "float32")]
    rows = [(r["policy"], r["optimizer"], f"{r['seconds_per_epoch']['graphfreeze'] * 1e3:.0f}",
             f"{r['seconds_per_epoch']['keras trainable=False'] * 1e3:.0f}", f"{r['ratio']:.3f}")
            for r in results]
    print(common.table(f"MobileNetV2 fit, backbone frozen, head trains; {batches} batches of "
                       f"{batch} at {image}x{image} per epoch (median of {args.rounds} epochs)",
                       rows, ("policy", "optimizer", "graphfreeze ms/epoch",
                              "trainable=False ms/epoch", "ratio")))
    path = common.write_json("fit" + ("_quick" if args.quick else ""), {
        "config": {"model": "MobileNetV2(weights=None)", "image": image, "batch": batch,
                   "batches_per_epoch": batches, "rounds": args.rounds},
        "policies": results, "command": "python bench/bench_fit.py " + " ".join(argv or sys.argv[1:])})
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
