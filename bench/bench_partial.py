"""Issue 3 bench: the "grow" case, graphfreeze vs the seed-002 forward-mask trick.

8 hidden layers of 1024+64 units; the old 1024 units of every layer are frozen (their
incoming columns and biases; the old-to-old block of every kernel; the old rows of the
output kernel). graphfreeze gets Columns/Rows rules; the peer is the same network with
`entry_stop_gradients` (seed 002) applied to every weight in the forward pass. Both use
Adam and compute the same gradients; they run interleaved in one process.

    python bench/bench_partial.py [--rounds 7] [--quick] [--jit]

--jit compiles all three steps with XLA (`jit_compile=True`) and writes partial_xla.json.
"""

from __future__ import annotations

import os
import sys

import common  # noqa: F401  (sets TF log level first)
import keras
import numpy as np
import tensorflow as tf

import graphfreeze as gf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from references import MaskedDense, keep_of  # noqa: E402


def grown_masks(old: int, new: int, width_in: int, depth: int, classes: int):
    """Frozen masks per layer name: (kernel_frozen, bias_frozen)."""
    masks = {}
    for i in range(depth):
        rows = width_in if i == 0 else old + new
        k = np.zeros((rows, old + new), bool)
        k[: (rows if i == 0 else old), :old] = True
        b = np.zeros(old + new, bool)
        b[:old] = True
        masks[f"hidden{i + 1}"] = (k, b)
    k = np.zeros((old + new, classes), bool)
    k[:old] = True
    masks["out"] = (k, np.ones(classes, bool))
    return masks


def grown_rules(old: int, new: int, depth: int):
    rules = []
    for i in range(depth):
        name = f"hidden{i + 1}"
        rules.append(gf.Columns(f"{name}/kernel", range(old)))
        if i > 0:  # the new units of the layer below feed the old units and train
            rules.append(gf.Unfreeze(gf.Rows(f"{name}/kernel", range(old, old + new))))
        rules.append(gf.Rows(f"{name}/bias", range(old)))
    rules += [gf.Rows("out/kernel", range(old)), "out/bias"]
    return rules


def network(width_in, units, depth, classes, masks=None, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((width_in,))]
    for i in range(depth + 1):
        name = f"hidden{i + 1}" if i < depth else "out"
        n, act = (units, "relu") if i < depth else (classes, None)
        if masks is None:
            layers.append(keras.layers.Dense(n, activation=act, name=name))
        else:
            k, b = masks[name]
            layers.append(MaskedDense(n, activation=act, name=name,
                                      kernel_keep=keep_of(k), bias_keep=keep_of(b)))
    return keras.Sequential(layers)


def main(argv=None) -> int:
    parser = common.arguments(__doc__, rounds=7, steps=10)
    parser.add_argument("--jit", action="store_true", help="every step under XLA (jit_compile=True)")
    args = parser.parse_args(argv)
    old, new, depth, batch, classes = (256, 16, 8, 64, 10) if args.quick else (1024, 64, 8, 256, 10)
    width_in = old
    x = np.random.default_rng(0).normal(size=(batch, width_in)).astype("float32")
    y = np.random.default_rng(1).integers(0, classes, size=(batch,)).astype("int32")
    masks = grown_masks(old, new, width_in, depth, classes)

    ours = network(width_in, old + new, depth, classes)
    peer = network(width_in, old + new, depth, classes, masks=masks)
    peer.set_weights(ours.get_weights())
    def adam_step(model):
        return tf.function(common.train_step(model, keras.optimizers.Adam(1e-3)),
                           jit_compile=args.jit)

    gf_step = gf.freeze(*grown_rules(old, new, depth))(adam_step(ours))
    peer_step = adam_step(peer)
    full_step = adam_step(network(width_in, old + new, depth, classes))

    times = common.interleaved({
        "graphfreeze (Columns/Rows rules)": lambda: gf_step(x, y),
        "seed-002 mask trick": lambda: peer_step(x, y),
        "train everything": lambda: full_step(x, y),
    }, rounds=args.rounds, steps=args.steps)
    frozen = sum(int(k.sum() + b.sum()) for k, b in masks.values())
    total = sum(k.size + b.size for k, b in masks.values())
    xla = ", XLA" if args.jit else ""
    path = common.publish(
        "partial_xla" if args.jit else "partial", f"Grow case: {depth} hidden layers of "
        f"{old}+{new}, batch {batch}, Adam{xla} (median of {args.rounds} rounds x {args.steps} "
        "steps)", times, "seed-002 mask trick", "ratio_vs_mask_trick",
        {"old_units": old, "new_units": new, "depth": depth, "batch": batch, "optimizer": "Adam",
         "jit_compile": args.jit,
         "frozen_parameters": frozen, "parameters": total, "rounds": args.rounds,
         "steps_per_round": args.steps}, argv, "bench_partial.py", args.quick)
    print(f"\nfrozen parameters: {frozen:,} of {total:,}\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
