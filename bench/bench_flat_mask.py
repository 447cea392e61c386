"""Issue 14 item 3: where flat gather/scatter beats the dense select for an unstructured Mask.

A partly frozen variable whose mask is not whole rows or columns (a random `gf.Mask`) can
have its optimizer update run on the flat vector of trainable entries (GatherNd of the
gradient, variable and slots, ScatterNd back) or on the whole variable with the slot writes
guarded by the dense mask (a select per slot). Both keep frozen entries and their slots
bitwise unchanged (S1, S4); this bench times the two side by side in one process for a
[2048, 2048] kernel between two trainable layers, Adam, at several trainable fractions,
and so places `slice_updates.FLAT_AT` (the fraction up to which the flat form is used).

    python bench/bench_flat_mask.py [--rounds 5] [--quick]
"""

from __future__ import annotations

import importlib
import sys

import common
import keras
import numpy as np
import tensorflow as tf

import graphfreeze as gf

SLICE = importlib.import_module("graphfreeze.passes.slice_updates")


def model_and_step(width: int):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(width, name="a"),
                              keras.layers.Dense(width, name="mid"), keras.layers.Dense(10, name="b")])
    return model, tf.function(common.train_step(model, keras.optimizers.Adam(1e-3)))


def main(argv=None) -> int:
    args = common.arguments(__doc__, rounds=5, steps=10).parse_args(argv)
    width, batch = (512, 32) if args.quick else (2048, 64)
    fractions = [0.002, 0.01, 0.02, 0.05, 0.2]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 64)).astype("float32")
    y = rng.integers(0, 10, (batch,)).astype("int32")
    runners, saved = {}, SLICE.FLAT_AT
    try:
        for f in fractions:
            frozen = rng.random((width, width)) >= f
            for mode, flat_at in (("flat", 1.0), ("dense", 0.0)):
                SLICE.FLAT_AT = flat_at
                _, step = model_and_step(width)
                rw = gf.freeze(gf.Mask("mid/kernel", frozen))(step)
                rw.rewritten(x, y)  # rewritten now, under this FLAT_AT
                runners[f"{mode} {f:.1%}"] = (lambda s: lambda: s(x, y))(rw)
    finally:
        SLICE.FLAT_AT = saved
    times = common.interleaved(runners, rounds=args.rounds, steps=args.steps)
    rows = [(f"{f:.1%}", f"{times[f'flat {f:.1%}'] * 1e3:.2f}", f"{times[f'dense {f:.1%}'] * 1e3:.2f}",
             f"{times[f'flat {f:.1%}'] / times[f'dense {f:.1%}']:.2f}") for f in fractions]
    print(common.table(f"Random Mask on a {width}x{width} kernel, Adam, batch {batch} "
                       f"(median of {args.rounds} rounds x {args.steps} steps)", rows,
                       ("trains", "flat ms/step", "dense ms/step", "flat / dense")))
    path = common.write_json("flat_mask" + ("_quick" if args.quick else ""), {
        "config": {"width": width, "batch": batch, "optimizer": "Adam", "rounds": args.rounds,
                   "steps_per_round": args.steps, "flat_at": saved},
        "seconds_per_step": times,
        "flat_over_dense": {f"{f:.1%}": times[f"flat {f:.1%}"] / times[f"dense {f:.1%}"]
                            for f in fractions},
        "command": "python bench/bench_flat_mask.py " + " ".join(argv or sys.argv[1:])})
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
