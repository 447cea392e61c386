"""Issue 7 bench: matching the common layers of two ResNet50s against one trace of a train step.

The source is ResNet50(weights=None, classes=10); the target the same backbone
(include_top=False) under a new pooling + Dense(7) head, built with the functional API.
`match_layers` is timed on the Keras layer graphs (what `graph="auto"` uses for these
models) and on traced forward graphs (what subclassed models need), against one plain
trace of the source's train step, as bench_core.py times it.

    python bench/bench_transfer.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import common  # noqa: F401  (sets TF log level first)
import keras
import numpy as np
import tensorflow as tf

from graphfreeze.transfer import match_layers, transfer_report


def models(image: int) -> tuple[keras.Model, keras.Model]:
    source = keras.applications.ResNet50(weights=None, input_shape=(image, image, 3), classes=10)
    backbone = keras.applications.ResNet50(weights=None, include_top=False,
                                           input_shape=(image, image, 3))
    x = keras.layers.GlobalAveragePooling2D(name="new_pool")(backbone.output)
    target = keras.Model(backbone.input, keras.layers.Dense(7, name="new_head")(x), name="resnet50_7")
    return source, target


def median_seconds(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def plain_trace(model: keras.Model, image: int, repeats: int) -> tuple[float, int]:
    step = common.train_step(model, keras.optimizers.Adam(1e-3),
                             keras.losses.SparseCategoricalCrossentropy())
    x = np.random.default_rng(0).normal(size=(2, image, image, 3)).astype("float32")
    y = np.array([1, 2], dtype="int32")
    tf.function(step)(x, y)  # build the optimizer's variables once
    seconds = median_seconds(lambda: tf.function(step).get_concrete_function(x, y), repeats)
    nodes = len(tf.function(step).get_concrete_function(x, y).graph.as_graph_def().node)
    return seconds, nodes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image", type=int, default=64)
    args = parser.parse_args(argv)

    source, target = models(args.image)
    report = transfer_report(source, target)
    keras_s = median_seconds(lambda: match_layers(source, target, graph="keras"), args.repeats)
    traced_s = median_seconds(lambda: match_layers(source, target, graph="traced"), args.repeats)
    trace_s, nodes = plain_trace(source, args.image, args.repeats)

    rows = [("plain trace of the train step", f"{trace_s:.3f}", "1.00"),
            ("match_layers, Keras layer graphs", f"{keras_s:.3f}", f"{keras_s / trace_s:.3f}"),
            ("match_layers, traced forward graphs", f"{traced_s:.3f}", f"{traced_s / trace_s:.3f}")]
    print(report.summary())
    print(common.table(f"ResNet50 (classes=10) vs ResNet50 backbone + new Dense(7) head; train "
                       f"step {nodes:,} nodes (median of {args.repeats})",
                       rows, ("what", "seconds", "x plain trace")))
    weighted = len(report.pairs) + sum(u.weighted for u in report.unmatched)
    path = common.write_json("transfer", {
        "config": {"source": "ResNet50(weights=None, classes=10)",
                   "target": "ResNet50(weights=None, include_top=False) + GlobalAveragePooling2D "
                             "+ Dense(7)", "input": [2, args.image, args.image, 3],
                   "repeats": args.repeats},
        "graph_nodes": nodes, "pairs": len(report.pairs), "target_layers_with_weights": weighted,
        "parameters_matched": report.parameters,
        "plain_trace_s": trace_s, "match_keras_s": keras_s, "match_traced_s": traced_s,
        "ratio_keras": keras_s / trace_s, "ratio_traced": traced_s / trace_s,
        "command": "python bench/bench_transfer.py " + " ".join(argv or sys.argv[1:])})
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
