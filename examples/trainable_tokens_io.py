"""Trainable tokens, saved alone: 16 new rows of a 32,000-word embedding train, and the
file that carries the fine-tune holds those rows and nothing else.

A small language-model head over a 32,000 x 64 embedding gets 16 new tokens. Everything is
frozen but those rows (`"*"`, then `Unfreeze(Rows(...))`), the model trains with plain
`fit`, and `gf.save_trainable` writes the rows as indices plus values together with a
fingerprint of the base model. A fresh copy of the base, built from the same initial
weights, is then brought up to date with `gf.load_trainable`. The script checks its claim:
the file is a tiny fraction of the table, and the loaded model equals the trained one
bitwise; loading into a different base is refused.

    python examples/trainable_tokens_io.py
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import graphfreeze as gf  # noqa: E402

VOCAB, WIDTH = 32_000, 64
NEW_TOKENS = list(range(VOCAB - 16, VOCAB))  # appended to the vocabulary for a new domain


def language_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8,), dtype="int32"), keras.layers.Embedding(VOCAB, WIDTH, name="embedding"),
        keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(5, name="classifier")], name="lm")


def same(a: keras.Model, b: keras.Model) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))


def main() -> int:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(256, 8)).astype("int32")
    ids[:, :3] = rng.choice(NEW_TOKENS, size=(256, 3))  # the new tokens occur in every example
    labels = rng.integers(0, 5, size=(256,)).astype("int32")
    rules = ["*", gf.Unfreeze(gf.Rows("embedding/embeddings", NEW_TOKENS))]

    model = language_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    gf.keras.freeze(model, *rules)
    model.fit(ids, labels, batch_size=32, epochs=2, verbose=0)
    print(gf.keras.rewritten(model).report())

    with tempfile.TemporaryDirectory() as tmp:
        path = gf.save_trainable(os.path.join(tmp, "new_tokens.npz"), model, *rules)
        size, table = os.path.getsize(path), VOCAB * WIDTH * 4
        print(f"{os.path.basename(path)}: {size:,} bytes for 16 rows "
              f"(the table alone is {table:,} bytes: {size / table:.3%})")

        base = language_model()          # the base, as first built (same initial weights)
        untrained = not same(base, model)
        written = gf.load_trainable(path, base)
        print(f"loaded {written} into a fresh base")
        round_trip = untrained and same(base, model)

        other = language_model(seed=1)   # not the base the file was saved from
        try:
            gf.load_trainable(path, other)
            refused = False
        except gf.FreezeError as e:
            print(f"a different base is refused: {str(e)[:100]}...")
            refused = True

    ok = size < table / 100 and round_trip and refused
    print("claim: the file holds the 16 trained rows only (under 1% of the table), loading it "
          "into the base reproduces the trained model bitwise, a different base is refused:",
          "OK" if ok else "VIOLATED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
