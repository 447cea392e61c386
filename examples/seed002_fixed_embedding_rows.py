"""Seed 002: keep some embedding rows (domain words) fixed while the others train.

"In a word embedding, some predefined domain-related words stay unchanged (initialised
with domain embeddings) while the general words change." The question's answer builds a
stop-gradient mask over the whole matrix; graphfreeze masks the sparse gradient instead
(the row mask is gathered with the looked-up ids, so it never densifies) and guards the
optimizer's writes so momentum cannot move a domain row either. The script checks its
claim: domain rows bitwise unchanged, every other looked-up row trained.

    python examples/seed002_fixed_embedding_rows.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphfreeze as gf  # noqa: E402

VOCAB = ["<pad>", "the", "a", "is", "not", "good", "bad", "great", "awful", "movie", "plot",
         "acting", "aspirin", "ibuprofen", "dosage", "tablet", "fever", "pain", "relief", "mg"]
DOMAIN_WORDS = ["aspirin", "ibuprofen", "dosage", "tablet", "mg"]  # pretrained, kept fixed


def main(steps: int = 60) -> int:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, len(VOCAB), size=(512, 6)).astype("int32")
    positive = {VOCAB.index(w) for w in ("good", "great", "relief")}
    labels = np.isin(ids, list(positive)).any(axis=1).astype("int32")

    model = keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(len(VOCAB), 8, name="embedding"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(2, name="classifier"),
    ])
    domain = [VOCAB.index(w) for w in DOMAIN_WORDS]
    table = model.get_layer("embedding").embeddings
    pretrained = table.numpy()
    pretrained[domain] = rng.normal(size=(len(domain), 8))  # "domain embeddings"
    table.assign(pretrained)

    optimizer = keras.optimizers.SGD(0.5, momentum=0.9)
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @gf.freeze(gf.Rows("embedding/embeddings", domain))
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = xent(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    before = table.numpy().copy()
    for i in range(steps):
        batch = slice((i * 64) % 512, (i * 64) % 512 + 64)
        loss = train_step(ids[batch], labels[batch])
    rw = train_step.rewritten(ids[:64], labels[:64])
    print(rw.report())
    print(f"final loss {float(loss):.4f}; the gradient mask is sparse: "
          f"{sorted({d['op'] for _, d in rw.graph.nodes(data=True) if d.get('inserted')})}")

    after = table.numpy()
    general = [i for i in range(1, len(VOCAB)) if i not in domain]
    ok = np.array_equal(after[domain], before[domain]) and \
        all(not np.array_equal(after[i], before[i]) for i in general)
    print("claim: domain-word rows bitwise unchanged, general-word rows trained:",
          "OK" if ok else "VIOLATED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
