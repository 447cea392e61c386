"""Issue 14 item 2: fused optimizer kernels (tf_keras legacy optimizers) on a partly frozen kernel.

a (trains) -> mid, a WIDTH x WIDTH kernel of which only the last NEW rows train (`gf.Rows`
freezes the others: inputs added to a trained layer, seed 000) -> b (trains); batch of 64,
tf_keras legacy optimizers, whose updates are fused `ResourceApply*` kernels:

* SGD with momentum (`ResourceApplyKerasMomentum`): graphfreeze runs it as
  `ResourceSparseApplyKerasMomentum` at the trainable rows, the weight gradient computed
  for those rows only;
* Adam (`ResourceApplyAdam`, no sparse form): graphfreeze writes it out elementwise, then
  slices the update of the kernel and its moments to the trainable rows.

Against training everything (the plain step) and the seed-002 mask trick
(`entry_stop_gradients` on mid's kernel in the forward pass), under the same optimizer, all
interleaved in one process. After the timed steps the frozen rows are checked bitwise.

    python bench/bench_fused.py [--rounds 5] [--steps 10] [--quick]
"""

from __future__ import annotations

import os
import sys

import common
import numpy as np
import tensorflow as tf
import tf_keras

import graphfreeze as gf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from references import entry_stop_gradients  # noqa: E402

OPTIMIZERS = {"SGD momentum": lambda: tf_keras.optimizers.legacy.SGD(0.01, momentum=0.9),
              "Adam": lambda: tf_keras.optimizers.legacy.Adam(1e-3)}


class MaskedDense(tf_keras.layers.Dense):
    """Dense with the seed-002 trick on the kernel (keep: 1 = trains)."""

    def __init__(self, units, keep, **kwargs):
        super().__init__(units, **kwargs)
        self.keep = keep

    def call(self, inputs):
        kernel = entry_stop_gradients(self.kernel, tf.constant(self.keep))
        return self.activation(tf.matmul(inputs, kernel) + self.bias)


def network(width: int, keep: np.ndarray | None):
    tf_keras.utils.set_random_seed(0)
    mid = tf_keras.layers.Dense(width, activation="relu", name="mid") if keep is None else \
        MaskedDense(width, keep, activation="relu", name="mid")
    return tf_keras.Sequential([tf_keras.layers.Dense(width, activation="relu", name="a",
                                                      input_shape=(64,)),
                                mid, tf_keras.layers.Dense(10, name="b")])


def step_of(model, optimizer):
    loss_fn = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return common.train_step(model, optimizer, loss_fn)


def main(argv=None) -> int:
    args = common.arguments(__doc__, rounds=5, steps=10).parse_args(argv)
    width, new = (256, 16) if args.quick else (2048, 64)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 64)).astype("float32")
    y = rng.integers(0, 10, (64,)).astype("int32")
    frozen_rows = list(range(width - new))
    keep = np.zeros((width, width), "float32")
    keep[width - new:] = 1
    runners, checks = {}, []
    for name, make in OPTIMIZERS.items():
        model = network(width, None)
        step = step_of(model, make())
        rw = gf.rewrite(step, [gf.Rows("mid/kernel", frozen_rows)], x, y)
        kernel = model.get_layer("mid").kernel
        checks.append((name, kernel, kernel.numpy()[:width - new].copy()))
        runners[f"{name}: graphfreeze"] = (lambda s: lambda: s(x, y))(rw)
        plain = tf.function(step_of(network(width, None), make()))
        runners[f"{name}: train everything"] = (lambda s: lambda: s(x, y))(plain)
        masked = tf.function(step_of(network(width, keep), make()))
        runners[f"{name}: seed-002 mask trick"] = (lambda s: lambda: s(x, y))(masked)
    times = common.interleaved(runners, rounds=args.rounds, steps=args.steps)
    for name, kernel, before in checks:
        assert np.array_equal(kernel.numpy()[:width - new], before), f"{name}: frozen rows moved"
    ratios = {k: v / times[k.split(":")[0] + ": train everything"] for k, v in times.items()}
    print(common.table(f"{width} x {width} kernel, {new} trainable rows, batch 64 "
                       f"(median of {args.rounds} rounds x {args.steps} steps)",
                       [(k, f"{v * 1e3:.2f}", f"{ratios[k]:.2f}") for k, v in times.items()],
                       ("variant", "ms/step", "x train everything")))
    path = common.write_json("fused" + ("_quick" if args.quick else ""), {
        "config": {"width": width, "trainable_rows": new, "batch": 64, "rounds": args.rounds,
                   "steps_per_round": args.steps},
        "seconds_per_step": times, "ratio_vs_train_everything": ratios,
        "command": "python bench/bench_fused.py " + " ".join(argv or sys.argv[1:])})
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
