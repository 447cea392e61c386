"""Issue 8 bench: epoch time training from the frozen-prefix cache, against the uncached
frozen step and against a standalone head trained on features precomputed by hand.

Backbones: a deep MLP (8 frozen layers of 1024) with a 2-layer head, and MobileNetV2
(weights=None, BatchNorm in inference mode) with its classifier head. Epochs alternate
between the variants in one process; medians are reported.

    python bench/bench_cache.py [--rounds 5] [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time

import common  # noqa: F401  (sets TF log level first)
import keras
import numpy as np
import tensorflow as tf

import graphfreeze as gf


def mlp_case(width: int, n: int, batch: int):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((width,))
    x = inputs
    for i in range(8):
        x = keras.layers.Dense(width, activation="relu", name=f"frozen{i + 1}")(x)
    backbone = keras.Model(inputs, x)
    head = keras.Sequential([keras.Input((width,)), keras.layers.Dense(256, activation="relu", name="head1"),
                             keras.layers.Dense(10, name="head2")])
    model = keras.Model(inputs, head(backbone(inputs)))
    x_data = np.random.default_rng(0).normal(size=(n, width)).astype("float32")
    y_data = np.random.default_rng(1).integers(0, 10, size=(n,)).astype("int32")
    return model, backbone, head, [f"frozen{i + 1}/*" for i in range(8)], x_data, y_data, False


def mobilenet_case(image: int, n: int, batch: int):
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(image, image, 3), classes=10,
                                           classifier_activation=None)
    backbone = keras.Model(model.inputs, model.layers[-2].output)
    head = keras.Sequential([keras.Input(backbone.output.shape[1:]),
                             keras.layers.Dense(10, name="hand_head")])
    x_data = np.random.default_rng(0).normal(size=(n, image, image, 3)).astype("float32")
    y_data = np.random.default_rng(1).integers(0, 10, size=(n,)).astype("int32")
    rules = ["*", gf.Unfreeze(f"{model.layers[-1].name}/*")]  # by name: also fits the clone
    return model, backbone, head, rules, x_data, y_data, True


def step_for(model):
    return common.train_step(model, keras.optimizers.Adam(1e-3))


def epoch_runner(step, data):
    def run():
        out = None
        for xb, yb in data:
            out = step(xb, yb)
        common.sync(out)
    return run


def bench(name, case, rounds):
    model, backbone, head, rules, x, y, bn = case
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(256 if not bn else 64)
    trainer = gf.cache_frozen_prefix(step_for(model), rules, data, batchnorm_inference=bn, verbose=0)

    uncached_model = keras.models.clone_model(model)
    uncached_model.set_weights(model.get_weights())
    uncached = gf.freeze(*rules, batchnorm_inference=bn)(tf.function(step_for(uncached_model)))

    features = backbone.predict(data.map(lambda a, b: a), verbose=0)  # by hand, once
    feature_data = tf.data.Dataset.from_tensor_slices((features, y)).batch(
        256 if not bn else 64).cache()
    hand_step = tf.function(step_for(head))

    runners = {"graphfreeze cache": lambda: common.sync(trainer.run_epoch()),
               "uncached frozen step": epoch_runner(uncached, data),
               "hand-made head on precomputed features": epoch_runner(hand_step, feature_data)}
    times = {k: [] for k in runners}
    for run in runners.values():
        run()  # warm-up: traces, fills tf.data caches
    for _ in range(rounds):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    cached = medians["graphfreeze cache"]
    return {"case": name, "examples": len(x), "seconds_per_epoch": medians,
            "cache_fill_s": trainer.cache_seconds,
            "ratio_vs_hand_head": cached / medians["hand-made head on precomputed features"],
            "speedup_vs_uncached": medians["uncached frozen step"] / cached}


def main(argv=None) -> int:
    args = common.arguments(__doc__, rounds=5).parse_args(argv)
    width, n_mlp, image, n_img = (256, 1024, 32, 128) if args.quick else (1024, 8192, 64, 512)
    results = [bench(f"MLP, 8 frozen layers of {width}", mlp_case(width, n_mlp, 256), args.rounds),
               bench(f"MobileNetV2 {image}x{image}, BatchNorm in inference mode",
                     mobilenet_case(image, n_img, 64), args.rounds)]
    rows = []
    for r in results:
        for variant, t in r["seconds_per_epoch"].items():
            rows.append((r["case"], variant, f"{t * 1e3:.1f}"))
        rows.append((r["case"], "-> cache vs hand head / speedup vs uncached",
                     f"{r['ratio_vs_hand_head']:.2f}x / {r['speedup_vs_uncached']:.1f}x"))
    print(common.table(f"Epoch time (median of {args.rounds})", rows, ("backbone", "variant", "ms/epoch")))
    path = common.write_json("cache" + ("_quick" if args.quick else ""), {
        "config": {"rounds": args.rounds}, "cases": results,
        "command": "python bench/bench_cache.py " + " ".join(argv or sys.argv[1:])})
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
