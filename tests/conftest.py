"""Shared builders for the tests: small real Keras models, steps and references.

References are always computed in the same test: a second model with identical initial
values trained side by side (Keras ``trainable=False`` for whole variables, the seed-002
stop-gradient mask for entries).
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Every rewrite in the suite runs the IR verifier after each pass (graphfreeze.passes.verify),
# subprocesses (tests/mwms_worker.py) included.
os.environ.setdefault("GRAPHFREEZE_VERIFY", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Tests run tiny tensors in two worker processes on a two-core machine: one thread each.
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
# Two logical CPU devices, so MirroredStrategy has two replicas (tests/test_distribute.py).
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)



def pytest_addoption(parser):
    parser.addoption(
        "--matrix-cover", action="store_true",
        help="run every test function, but of each parametrized one only the points of its "
             "matrix needed for every parameter value to run at least once (the first point "
             "always): the oldest CI job's fast subset")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--matrix-cover"):
        return
    # Deterministic (xdist workers collect independently and must agree): collection order,
    # and parameter values told apart by identity (each is one object of its parametrize list).
    covered: dict[tuple[str, str], set[tuple[str, int]]] = {}
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None:
            kept.append(item)
            continue
        values = {(name, id(value)) for name, value in callspec.params.items()}
        seen = covered.setdefault((str(item.path), item.originalname), set())
        if not values <= seen:
            seen |= values
            kept.append(item)
        else:
            dropped.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


OPTIMIZERS = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw_decay": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.05),
    "rmsprop": lambda: keras.optimizers.RMSprop(1e-2),
}


def mlp(sizes=(6, 12, 10, 8, 3), seed=0, names=None, activation="tanh"):
    """A Sequential MLP with named Dense layers: hidden1, hidden2, ..., out."""
    keras.utils.set_random_seed(seed)
    names = names or [f"hidden{i + 1}" for i in range(len(sizes) - 2)] + ["out"]
    layers = [keras.Input((sizes[0],))]
    for i, (n, name) in enumerate(zip(sizes[1:], names)):
        layers.append(keras.layers.Dense(n, activation=None if i == len(sizes) - 2 else activation,
                                         name=name))
    return keras.Sequential(layers)


def twin(model, builder):
    """A second model with the same architecture and identical initial values."""
    other = builder()
    other.set_weights(model.get_weights())
    return other


def make_step(model, optimizer, loss_fn=None, variables=None):
    """The canonical custom training step (plain Python; callers may tf.function it)."""
    loss_fn = loss_fn or keras.losses.MeanSquaredError()

    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        vs = variables if variables is not None else model.trainable_variables
        grads = tape.gradient(loss, vs)
        optimizer.apply_gradients(zip(grads, vs))
        return loss

    return train_step


def batches(n, x_shape, y_shape, seed=1, y_int=None):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=x_shape).astype("float32")
        y = (rng.integers(0, y_int, size=y_shape).astype("int32") if y_int
             else rng.normal(size=y_shape).astype("float32"))
        out.append((x, y))
    return out


def snapshot(variables):
    return {v.path if hasattr(v, "path") else v.name: np.array(v.numpy(), copy=True)
            for v in variables}


def assert_close_models(a, b, atol=1e-5):
    for va, vb in zip(a.variables, b.variables):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=atol, rtol=1e-5,
                                   err_msg=f"{va.path} differs from the reference")


# One MirroredStrategy per process: TF 2.21 reuses collective group and instance keys
# across strategy objects, so a second one collides with the first's collectives (plain
# Keras fit fails the same way). Every test file that needs one shares this one.
_MIRRORED = None


def mirrored():
    global _MIRRORED
    if _MIRRORED is None:
        _MIRRORED = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    return _MIRRORED


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    # Keras's own gc.collect() walks every object the worker has kept (TensorFlow's modules
    # and caches included) before each test: seconds per test late in a run. Collected once
    # here and frozen, the next collection walks only what the tests since have made.
    keras.backend.clear_session(free_memory=False)
    gc.collect()
    gc.freeze()
    yield
    if keras.mixed_precision.global_policy().name != "float32":
        keras.mixed_precision.set_global_policy("float32")
