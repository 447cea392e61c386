"""Issue 2 bench: whole-variable freezing against Keras trainable=False, side by side.

1. Step time of a deep MLP (8 hidden layers of 1024, batch 256, AdamW) with the 6 lowest
   layers frozen: graphfreeze vs Keras `trainable=False` vs training everything.
2. Time of `gf.rewrite` on a ResNet50 train step vs one plain trace of the same step.

    python bench/bench_core.py [--rounds 7] [--quick]
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


def deep_mlp(width=1024, depth=8, classes=10, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((width,))]
    layers += [keras.layers.Dense(width, activation="relu", name=f"hidden{i + 1}")
               for i in range(depth)]
    layers.append(keras.layers.Dense(classes, name="out"))
    return keras.Sequential(layers)


def bench_step_time(rounds: int, steps: int, width: int, batch: int) -> dict:
    frozen = [f"hidden{i + 1}" for i in range(6)]
    x = np.random.default_rng(0).normal(size=(batch, width)).astype("float32")
    y = np.random.default_rng(1).integers(0, 10, size=(batch,)).astype("int32")

    base = deep_mlp(width)
    keras_frozen = deep_mlp(width)
    keras_frozen.set_weights(base.get_weights())
    for name in frozen:
        keras_frozen.get_layer(name).trainable = False
    full = deep_mlp(width)
    full.set_weights(base.get_weights())

    gf_step = gf.freeze(*[f"{n}/*" for n in frozen])(
        tf.function(common.train_step(base, keras.optimizers.AdamW(1e-3))))
    runners = {
        "graphfreeze": lambda: gf_step(x, y),
        "keras trainable=False": (lambda s: lambda: s(x, y))(
            tf.function(common.train_step(keras_frozen, keras.optimizers.AdamW(1e-3)))),
        "train everything": (lambda s: lambda: s(x, y))(
            tf.function(common.train_step(full, keras.optimizers.AdamW(1e-3)))),
    }
    times = interleaved_times = common.interleaved(runners, rounds=rounds, steps=steps)
    ref = times["keras trainable=False"]
    rw = gf_step.rewritten(x, y)
    return {"config": {"width": width, "depth": 8, "frozen": 6, "batch": batch,
                       "optimizer": "AdamW", "rounds": rounds, "steps_per_round": steps},
            "seconds_per_step": interleaved_times,
            "ratio_vs_keras_trainable_false": {k: v / ref for k, v in times.items()},
            "ops": {"original": rw.original_graph.number_of_nodes(),
                    "rewritten": rw.graph.number_of_nodes()}}


def bench_rewrite_time(repeats: int, image: int) -> dict:
    model = keras.applications.ResNet50(weights=None, input_shape=(image, image, 3), classes=10)
    optimizer = keras.optimizers.Adam(1e-3)
    step = common.train_step(model, optimizer, keras.losses.SparseCategoricalCrossentropy())
    x = np.random.default_rng(0).normal(size=(2, image, image, 3)).astype("float32")
    y = np.array([1, 2], dtype="int32")
    tf.function(step)(x, y)  # build the optimizer's variables once
    head = model.layers[-1].name
    rules = ["*", gf.Unfreeze(f"{head}/*")]
    plain, rewrite, nodes = [], [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        cf = tf.function(step).get_concrete_function(x, y)
        plain.append(time.perf_counter() - t)
        nodes = len(cf.graph.as_graph_def().node)
        t = time.perf_counter()
        rw = gf.rewrite(step, rules, x, y)
        rewrite.append(time.perf_counter() - t)
    p, r = statistics.median(plain), statistics.median(rewrite)
    return {"config": {"model": "ResNet50(weights=None)", "input": [2, image, image, 3],
                       "rules": "backbone frozen, head trains", "repeats": repeats},
            "graph_nodes": nodes, "rewritten_nodes": rw.graph.number_of_nodes(),
            "plain_trace_s": p, "gf_rewrite_s": r, "ratio": r / p}


def main(argv=None) -> int:
    parser = common.arguments(__doc__, rounds=7, steps=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    width, batch, image = (256, 64, 32) if args.quick else (1024, 256, 64)

    step = bench_step_time(args.rounds, args.steps, width, batch)
    rows = [(name, f"{t * 1e3:.2f}", f"{step['ratio_vs_keras_trainable_false'][name]:.3f}")
            for name, t in step["seconds_per_step"].items()]
    print(common.table(f"Deep MLP 8x{width}, batch {batch}, AdamW, 6 lowest layers frozen "
                       f"(median of {args.rounds} rounds x {args.steps} steps)",
                       rows, ("variant", "ms/step", "x keras trainable=False")))
    rewrite = bench_rewrite_time(args.repeats, image)
    print()
    print(common.table(f"gf.rewrite on a ResNet50 train step ({rewrite['graph_nodes']} nodes -> "
                       f"{rewrite['rewritten_nodes']}; median of {args.repeats})",
                       [("plain trace", f"{rewrite['plain_trace_s']:.2f}", "1.00"),
                        ("gf.rewrite", f"{rewrite['gf_rewrite_s']:.2f}", f"{rewrite['ratio']:.2f}")],
                       ("what", "seconds", "x plain trace")))
    path = common.write_json("core" + ("_quick" if args.quick else ""),
                             {"step_time": step, "rewrite_time": rewrite,
                              "command": "python bench/bench_core.py " + " ".join(argv or sys.argv[1:])})
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
