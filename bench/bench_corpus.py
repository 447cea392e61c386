"""Issue 4 bench: keras.applications backbones frozen, head trained, frozen BatchNorm in
inference mode; graphfreeze against Keras `trainable=False` on the same model.

For each model: ops in the rewritten step vs ops in the Keras trainable=False step's
graph, and step time (interleaved in one process, median of rounds).

    python bench/bench_corpus.py [--models ResNet50 MobileNetV2 EfficientNetB0] [--quick]
"""

from __future__ import annotations

import sys

import common  # noqa: F401  (sets TF log level first)
import keras
import numpy as np
import tensorflow as tf

import graphfreeze as gf

MODELS = {
    "ResNet50": keras.applications.ResNet50,
    "MobileNetV2": keras.applications.MobileNetV2,
    "EfficientNetB0": keras.applications.EfficientNetB0,
}


def bench_model(name: str, image: int, batch: int, rounds: int, steps: int) -> dict:
    def build():
        keras.utils.set_random_seed(0)
        return MODELS[name](weights=None, input_shape=(image, image, 3), classes=10)

    xent = keras.losses.SparseCategoricalCrossentropy()
    x = np.random.default_rng(0).normal(size=(batch, image, image, 3)).astype("float32")
    y = np.random.default_rng(1).integers(0, 10, size=(batch,)).astype("int32")
    ours = build()
    reference = build()
    reference.set_weights(ours.get_weights())
    for layer in reference.layers[:-1]:
        layer.trainable = False
    head = ours.layers[-1]
    rw = gf.rewrite(common.train_step(ours, keras.optimizers.Adam(1e-3), xent),
                    ["*", gf.Unfreeze(head)], x, y, batchnorm_inference=True)
    ref_step = tf.function(common.train_step(reference, keras.optimizers.Adam(1e-3), xent))
    ref_ops = len(ref_step.get_concrete_function(x, y).graph.get_operations())
    times = common.interleaved({"graphfreeze": lambda: rw(x, y),
                                "keras trainable=False": lambda: ref_step(x, y)},
                               rounds=rounds, steps=steps)
    return {"model": name, "input": [batch, image, image, 3],
            "ops": {"traced": rw.original_graph.number_of_nodes(),
                    "graphfreeze": rw.graph.number_of_nodes(), "keras_trainable_false": ref_ops},
            "seconds_per_step": times,
            "ratio": times["graphfreeze"] / times["keras trainable=False"]}


def main(argv=None) -> int:
    parser = common.arguments(__doc__, rounds=5, steps=3)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    image, batch = (32, 2) if args.quick else (96, 16)
    results = [bench_model(m, image, batch, args.rounds, args.steps) for m in args.models]
    rows = [(r["model"], f"{r['ops']['traced']:,}", f"{r['ops']['graphfreeze']:,}",
             f"{r['ops']['keras_trainable_false']:,}",
             f"{r['seconds_per_step']['graphfreeze'] * 1e3:.0f}",
             f"{r['seconds_per_step']['keras trainable=False'] * 1e3:.0f}", f"{r['ratio']:.3f}")
            for r in results]
    print(common.table(f"Backbone frozen (BatchNorm in inference mode), head trains; batch {batch} "
                       f"at {image}x{image}, Adam (median of {args.rounds} rounds x {args.steps} steps)",
                       rows, ("model", "traced ops", "graphfreeze ops", "trainable=False ops",
                              "graphfreeze ms", "trainable=False ms", "ratio")))
    path = common.write_json("corpus" + ("_quick" if args.quick else ""), {
        "config": {"image": image, "batch": batch, "rounds": args.rounds, "steps_per_round": args.steps},
        "models": results, "command": "python bench/bench_corpus.py " + " ".join(argv or sys.argv[1:])})
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
