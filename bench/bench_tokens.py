"""Trainable tokens (PEFT's `trainable_token_indices`): graphfreeze against the program an
expert writes by hand, and against training everything.

A 32,000 x 512 embedding table tied to the output projection, under two residual MLP blocks
(512 -> 2048 -> 512), batch 8 x 64 tokens, AdamW; only 16 new token rows train.

* graphfreeze: the plain full step, `gf.freeze("*", gf.Unfreeze(gf.Rows(table, new_rows)))`;
* hand-written split: the frozen table and blocks as constants, the 16 rows (tokens appended
  to the vocabulary, the last rows) as their own variable, gathered with `tf.where` at the
  lookup and projected with a second small matmul whose logits are concatenated to the
  frozen rows'; the optimizer only ever sees the 16 rows;
* train everything: the plain full step.

All three run interleaved in one process.

    python bench/bench_tokens.py [--rounds 7] [--quick]
"""

from __future__ import annotations

import sys

import common
import keras
import numpy as np
import tensorflow as tf

import graphfreeze as gf


def weights(vocab: int, width: int, hidden: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"table": rng.normal(0, 0.02, (vocab, width))}
    for b in range(2):
        out[f"block{b}/w1"] = rng.normal(0, width ** -0.5, (width, hidden))
        out[f"block{b}/w2"] = rng.normal(0, hidden ** -0.5, (hidden, width))
    return {k: v.astype("float32") for k, v in out.items()}


def blocks(x: tf.Tensor, w: dict) -> tf.Tensor:
    for b in range(2):
        x = x + tf.nn.relu(x @ w[f"block{b}/w1"]) @ w[f"block{b}/w2"]
    return x


def full_step(init: dict[str, np.ndarray]):
    """The plain step over variables for everything (graphfreeze's input; also 'train
    everything')."""
    w = {k: tf.Variable(v, name=k) for k, v in init.items()}
    optimizer = keras.optimizers.AdamW(1e-3)
    variables = list(w.values())

    def step(ids, labels):
        with tf.GradientTape() as tape:
            x = blocks(tf.gather(w["table"], ids), w)
            logits = tf.einsum("btd,vd->btv", x, w["table"])
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    return step, w


def split_step(init: dict[str, np.ndarray], n_new: int):
    """The hand-written program: constants for what is frozen, a variable for the new rows
    (the last `n_new` rows: tokens appended to the vocabulary)."""
    const = {k: tf.constant(v) for k, v in init.items()}
    vocab = init["table"].shape[0]
    old_rows = tf.constant(init["table"][: vocab - n_new])
    new = tf.Variable(init["table"][vocab - n_new:], name="new_rows")
    optimizer = keras.optimizers.AdamW(1e-3)

    def step(ids, labels):
        with tf.GradientTape() as tape:
            is_new = ids >= vocab - n_new
            looked_up = tf.where(is_new[..., None], tf.gather(new, tf.maximum(ids - (vocab - n_new), 0)),
                                 tf.gather(old_rows, tf.minimum(ids, vocab - n_new - 1)))
            x = blocks(looked_up, const)
            logits = tf.concat([tf.einsum("btd,vd->btv", x, old_rows),
                                tf.einsum("btd,nd->btn", x, new)], axis=-1)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        optimizer.apply_gradients([(tape.gradient(loss, new), new)])
        return loss

    return step, new


def main(argv=None) -> int:
    args = common.arguments(__doc__, rounds=7, steps=5).parse_args(argv)
    vocab, width, hidden, batch, seq, n_new = ((4000, 128, 512, 4, 32, 16) if args.quick
                                               else (32000, 512, 2048, 8, 64, 16))
    init = weights(vocab, width, hidden)
    rng = np.random.default_rng(1)
    new_rows = np.arange(vocab - n_new, vocab)  # tokens appended to the vocabulary
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    ids[:, ::4] = rng.choice(new_rows, ids[:, ::4].shape)  # the new tokens occur in the batch
    labels = rng.integers(0, vocab, (batch, seq)).astype(np.int32)

    gf_fn, gf_vars = full_step(init)
    gf_step = gf.freeze("*", gf.Unfreeze(gf.Rows(gf_vars["table"], new_rows)))(tf.function(gf_fn))
    everything, _ = full_step(init)
    everything = tf.function(everything)
    split, _ = split_step(init, n_new)
    split = tf.function(split)

    times = common.interleaved({
        "graphfreeze (Rows rule)": lambda: gf_step(ids, labels),
        "hand-written split program": lambda: split(ids, labels),
        "train everything": lambda: everything(ids, labels),
    }, rounds=args.rounds, steps=args.steps)
    path = common.publish(
        "tokens", f"Trainable tokens: {n_new} of {vocab:,} rows of a tied {vocab:,}x{width} table, "
        f"batch {batch}x{seq}, AdamW (median of {args.rounds} rounds x {args.steps} steps)", times,
        "hand-written split program", "ratio_vs_hand_written",
        {"vocab": vocab, "width": width, "hidden": hidden, "batch": batch, "sequence": seq,
         "trainable_rows": n_new, "optimizer": "AdamW", "rounds": args.rounds,
         "steps_per_round": args.steps}, argv, "bench_tokens.py", args.quick)
    everything_s = times["train everything"]
    print("\n" + "\n".join(f"{k}: {v / everything_s:.2f}x train everything" for k, v in times.items()))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
