"""Seed 003: several NLP networks share their early layers; transfer them automatically.

Two architectures over the same token vocabulary start the same way - an Embedding and a
Conv1D n-gram detector - under different layer names, then diverge: a sentiment model pools
and classifies, a topic model runs an LSTM. We train the sentiment model, let `transfer`
find on the two graphs which layers they have in common (no names, no ad-hoc copy code),
copy those weights, freeze them with the decorator, and train the topic model. The script
checks its claim: the transferred layers are bitwise the sentiment model's and training
left them untouched, while the LSTM and the topic head trained.

    python examples/seed003_shared_early_layers.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphfreeze as gf  # noqa: E402
from graphfreeze.transfer import transfer  # noqa: E402

VOCAB, LENGTH = 400, 16


def sentiment_model() -> keras.Model:
    tokens = keras.Input((LENGTH,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(VOCAB, 16, name="token_embedding")(tokens)
    x = keras.layers.Conv1D(24, 3, padding="same", activation="relu", name="trigram_conv")(x)
    x = keras.layers.GlobalMaxPooling1D(name="pool")(x)
    return keras.Model(tokens, keras.layers.Dense(3, name="sentiment")(x), name="sentiment_net")


def topic_model() -> keras.Model:
    words = keras.Input((LENGTH,), dtype="int32", name="words")
    x = keras.layers.Embedding(VOCAB, 16, name="word_vectors")(words)
    x = keras.layers.Conv1D(24, 3, padding="same", activation="relu", name="ngram_features")(x)
    x = keras.layers.LSTM(16, name="context")(x)
    return keras.Model(words, keras.layers.Dense(3, name="topic")(x), name="topic_net")


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens; a sentiment label (which third of the vocabulary dominates the text) and a
    topic label (which third dominates its second half) - related tasks, as in the seed."""
    tokens = np.random.default_rng(seed).integers(1, VOCAB, size=(n, LENGTH)).astype("int32")
    third = tokens // (VOCAB // 3 + 1)
    counts = lambda t: np.stack([(t == k).sum(1) for k in range(3)], axis=1)  # noqa: E731
    return tokens, counts(third).argmax(1).astype("int32"), \
        counts(third[:, LENGTH // 2:]).argmax(1).astype("int32")


def main(epochs: int = 5) -> int:
    keras.utils.set_random_seed(3)
    tokens, sentiment, topic = data(512, 0)
    xentropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # 1. Train the sentiment network.
    source = sentiment_model()
    source.compile(optimizer=keras.optimizers.Adam(1e-2), loss=xentropy)
    source.fit(tokens, sentiment, batch_size=64, epochs=2, verbose=0)

    # 2. The topic network: transfer finds the common layers on the graphs and copies them.
    target = topic_model()
    rules = transfer(source, target)
    print(rules)
    print()

    # 3. Freeze what was transferred; the LSTM and the head train on the new task.
    optimizer = keras.optimizers.Adam(1e-2)

    @gf.freeze(*rules)
    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = xentropy(yb, target(xb, training=True))
        grads = tape.gradient(loss, target.trainable_variables)
        optimizer.apply_gradients(zip(grads, target.trainable_variables))
        return loss

    transferred = {v.path: v.numpy().copy() for layer in rules for v in layer.weights}
    rest = {v.path: v.numpy().copy() for v in target.trainable_variables if v.path not in transferred}
    losses = [np.mean([float(train_step(tokens[i:i + 64], topic[i:i + 64]))
                       for i in range(0, len(tokens), 64)]) for _ in range(epochs)]
    print(train_step.rewritten(tokens[:64], topic[:64]).report())
    print(f"topic-task loss: {losses[0]:.4f} in the first epoch, {losses[-1]:.4f} in the last")

    copied = all(s.numpy().tobytes() == t.numpy().tobytes()
                 for pair in rules.pairs for s, t in zip(pair.source.weights, pair.target.weights))
    unchanged = all(v.numpy().tobytes() == transferred[v.path].tobytes()
                    for layer in rules for v in layer.weights)
    trained = all(not np.array_equal(v.numpy(), rest[v.path])
                  for v in target.trainable_variables if v.path in rest)
    names = [(p.source.name, p.target.name) for p in rules.pairs]
    ok = (names == [("token_embedding", "word_vectors"), ("trigram_conv", "ngram_features")]
          and copied and unchanged and trained)
    print("claim: embedding and conv transferred under new names, bitwise equal to the sentiment "
          "net's and unchanged by training; the LSTM and the topic head trained:",
          "OK" if ok else "VIOLATED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
