"""Issue 13 bench: a random `gf.Mask` over a 2,000,000 x 256 embedding rewrites and runs.

The mask (512M entries, half frozen, no structure) is stored once, eight entries per
byte: 64 MB in the rewritten GraphDef (as bools it would be 512 MB; as the two float32
copies of earlier versions, 4 GB, past protobuf's 2 GB limit). The step is an embedding lookup, mean pooling
and a Dense head under SGD, so the gradient of the table is sparse and the mask rows are
gathered by id. Reported: one plain trace of the step, `gf.rewrite` (tracing included),
the rewritten GraphDef's size and the mask constant's share of it, the time of a step
against the unfrozen step (interleaved), and the peak resident memory of the process.

    python bench/bench_large_mask.py [--rows 2000000] [--dim 256] [--quick]
"""

from __future__ import annotations

import resource
import sys
import time

import common
import keras
import numpy as np
import tensorflow as tf

import graphfreeze as gf


def random_mask(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """Half the entries frozen at random, built without a float64 temporary."""
    bits = np.random.default_rng(seed).integers(0, 256, size=rows * dim // 8, dtype=np.uint8)
    return np.unpackbits(bits).view(bool).reshape(rows, dim)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None) -> int:
    parser = common.arguments(__doc__, rounds=5, steps=5)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args(argv)
    rows, dim = (min(args.rows, 200_000), args.dim) if args.quick else (args.rows, args.dim)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,), dtype="int32"),
                              # zeros: a random initializer's temporaries would double the
                              # table's 2 GB in memory; the gradient still reaches every row
                              keras.layers.Embedding(rows, dim, name="emb",
                                                     embeddings_initializer="zeros"),
                              keras.layers.GlobalAveragePooling1D(),
                              keras.layers.Dense(1, name="head")])
    rng = np.random.default_rng(1)
    x = rng.integers(0, rows, size=(64, 16)).astype("int32")
    y = rng.normal(size=(64, 1)).astype("float32")
    step = common.train_step(model, keras.optimizers.SGD(0.1), keras.losses.MeanSquaredError())
    mask = random_mask(rows, dim)

    start = time.perf_counter()
    graph_def = tf.function(step).get_concrete_function(x, y).graph.as_graph_def()
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    rw = gf.rewrite(step, [gf.Mask("emb/embeddings", mask)], x, y)
    rewrite_s = time.perf_counter() - start
    rewritten = rw.graph_def
    consts = [n for n in rewritten.node if n.name.startswith("graphfreeze/frozen/")]
    mask_bytes = sum(n.ByteSize() for n in consts)

    table = model.get_layer("emb").embeddings
    touched = np.unique(x)
    frozen_touched = mask[touched]
    before = table.numpy()[touched]
    rw(x, y)
    after = table.numpy()[touched]
    ok = bool(np.array_equal(after[frozen_touched], before[frozen_touched])
              and not np.array_equal(after[~frozen_touched], before[~frozen_touched]))
    plain = tf.function(step)
    times = common.interleaved({"graphfreeze": lambda: rw(x, y), "train everything": lambda: plain(x, y)},
                               rounds=args.rounds, steps=args.steps, warmup=1)

    rows_out = [
        ("plain trace of the step", f"{trace_s:.2f} s", f"{graph_def.ByteSize() / 2**20:.1f} MiB"),
        ("gf.rewrite (trace included)", f"{rewrite_s:.2f} s",
         f"{rewritten.ByteSize() / 2**20:.1f} MiB (mask {mask_bytes / 2**20:.1f} MiB, "
         f"{len(consts)} const)"),
        ("step, graphfreeze", f"{times['graphfreeze'] * 1e3:.1f} ms",
         f"{times['graphfreeze'] / times['train everything']:.2f}x train everything"),
        ("step, train everything", f"{times['train everything'] * 1e3:.1f} ms", "1.00x"),
        ("peak resident memory", f"{peak_rss_gb():.2f} GiB", f"table {rows * dim * 4 / 2**30:.2f} GiB"),
    ]
    print(common.table(f"random Mask over a {rows:,} x {dim} embedding ({int(mask.sum()):,} of "
                       f"{mask.size:,} entries frozen), SGD, batch 64 x 16 ids; frozen entries "
                       f"unchanged: {ok}", rows_out, ("what", "time", "size")))
    path = common.write_json("large_mask" + ("_quick" if args.quick else ""), {
        "config": {"rows": rows, "dim": dim, "frozen": int(mask.sum()), "batch": [64, 16],
                   "optimizer": "SGD(0.1)", "rounds": args.rounds, "steps": args.steps},
        "plain_trace_s": trace_s, "rewrite_s": rewrite_s,
        "graph_def_bytes": {"traced": graph_def.ByteSize(), "rewritten": rewritten.ByteSize(),
                            "mask_consts": mask_bytes},
        "mask_consts": len(consts), "seconds_per_step": times,
        "peak_rss_gib": peak_rss_gb(), "frozen_entries_unchanged": ok,
        "command": "python bench/bench_large_mask.py " + " ".join(argv or sys.argv[1:])})
    print(f"\nwritten {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
