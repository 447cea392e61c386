"""One worker of the MultiWorkerMirroredStrategy test (run by tests/test_distribute.py).

Usage: python mwms_worker.py OUT.json   (TF_CONFIG in the environment)

Trains the same small model twice under the strategy, once with graphfreeze freezing
`hidden/*` and once with Keras trainable=False, and writes what the parent compares.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphfreeze as gf  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()


def build(freeze_with_keras: bool):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="hidden"),
                                  keras.layers.Dense(3, name="out")])
        if freeze_with_keras:
            model.get_layer("hidden").trainable = False
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)
    return model, optimizer


def step_for(model, optimizer):
    def step_fn(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2) / strategy.num_replicas_in_sync
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def dist_step(x, y):
        return strategy.reduce("SUM", strategy.run(step_fn, args=(x, y)), axis=None)

    return dist_step


def main(out: str) -> int:
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    rng = np.random.default_rng(task)  # each worker feeds its own shard
    batches = [(rng.normal(size=(8, 6)).astype("float32"), rng.normal(size=(8, 3)).astype("float32"))
               for _ in range(4)]
    model, optimizer = build(False)
    reference, ref_optimizer = build(True)
    rw = gf.rewrite(step_for(model, optimizer), ["hidden/*"], *batches[0])
    ref_step = step_for(reference, ref_optimizer)
    frozen_before = [v.numpy().tolist() for v in model.get_layer("hidden").variables]
    for x, y in batches:
        rw(x, y)
        ref_step(x, y)
    frozen_after = [v.numpy().tolist() for v in model.get_layer("hidden").variables]
    result = {
        "task": task,
        "frozen_unchanged": frozen_after == frozen_before,
        "weights": [w.tolist() for w in model.get_weights()],
        "reference": [w.tolist() for w in reference.get_weights()],
        "pruned": sorted(rw.report().pruned_state),
    }
    with open(out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
