"""Discriminative fine-tuning (ULMFiT, BEiT layer decay) of a keras.applications model in `fit`.

`gf.layer_decay(model, 0.95)` gives the last layer with weights the learning-rate factor
1.0 and each earlier one 0.95 times the next; composed with a freeze of the stem
(`"Conv1/*", "bn_Conv1/*"`, statistics included), one `gf.keras.freeze` call sets per-layer learning rates
without one optimizer per layer. The script fine-tunes MobileNetV2 (weights=None, 32x32
inputs, a new 5-class head) for one step with Adam next to a plain copy and checks its
claim: the stem is bitwise unchanged, every other layer moved exactly its factor times what
the plain step moved it, and BatchNorm statistics moved as in the plain model.

    python examples/discriminative_finetuning.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import graphfreeze as gf  # noqa: E402

DECAY = 0.95
STEM = ("Conv1", "bn_Conv1")


def network() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                          classes=5)


def fit_one_step(model: keras.Model, x: np.ndarray, y: np.ndarray) -> None:
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)


def main() -> int:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 5, size=(16,)).astype("int32")
    model, plain = network(), network()
    plain.set_weights(model.get_weights())
    before = [w.numpy() for w in model.weights]
    for m in (model, plain):
        m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")

    rules = gf.layer_decay(model, DECAY)
    factors = {r.target.name: r.factor for r in rules}
    gf.keras.freeze(model, *rules, *(f"{name}/*" for name in STEM))
    fit_one_step(model, x, y)
    fit_one_step(plain, x, y)

    report = gf.keras.rewritten(model).report()
    lines = str(report).splitlines()
    print("\n".join(lines[:8] + ["    ..."] + lines[-6:]))
    print(report.summary())
    print(f"{len(rules)} layers with weights; factors from {min(factors.values()):.3g} "
          f"({rules[0].target.name}) to 1 ({rules[-1].target.name})")

    ok, worst = True, 0.0
    index = {id(w): i for i, w in enumerate(model.weights)}
    for layer, twin in zip(model.layers, plain.layers):
        for w, p in zip(layer.weights, twin.weights):
            old, new, ref = before[index[id(w)]], w.numpy(), p.numpy()
            if layer.name in STEM:
                ok &= np.array_equal(new, old)          # frozen (statistics too): bitwise unchanged
            elif w.trainable:
                expected = old + factors[layer.name] * (ref - old)
                err = float(np.max(np.abs(new - expected)))
                worst = max(worst, err / max(float(np.max(np.abs(ref - old))), 1e-12))
                good = bool(np.allclose(new, expected, rtol=1e-4, atol=1e-7))
                if not good:
                    print(f"  {w.path}: off by {err:.2e}")
                ok &= good
            else:                                       # BatchNorm statistics: not scaled
                good = bool(np.allclose(new, ref, rtol=1e-5, atol=1e-6))
                if not good:
                    print(f"  {w.path}: statistics differ from the plain model")
                ok &= good
    print(f"largest deviation from factor x plain update: {worst:.2e} of the update")
    print("claim: stem bitwise unchanged, each layer moved its factor times the plain update, "
          "BatchNorm statistics as in the plain model:", "OK" if ok else "VIOLATED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
