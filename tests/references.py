"""The peers graphfreeze is checked against, written the way users write them.

`entry_stop_gradients` is the seed-002 trick verbatim (mask: 1 = trains); the Masked*
layers apply it to a Keras layer's weights in the forward pass.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops


def entry_stop_gradients(target, mask):
    """Seed 002: gradients flow only where mask == 1."""
    mask_h = 1 - mask
    return tf.stop_gradient(mask_h * target) + mask * target


class MaskedDense(keras.layers.Dense):
    """Dense whose kernel/bias go through entry_stop_gradients (keep masks: 1 = trains)."""

    def __init__(self, units, kernel_keep=None, bias_keep=None, **kwargs):
        super().__init__(units, **kwargs)
        self.kernel_keep, self.bias_keep = kernel_keep, bias_keep

    def call(self, inputs, training=None):
        kernel = self.kernel if self.kernel_keep is None else \
            entry_stop_gradients(self.kernel, tf.constant(self.kernel_keep, self.kernel.dtype))
        x = ops.matmul(inputs, kernel)
        if self.use_bias:
            bias = self.bias if self.bias_keep is None else \
                entry_stop_gradients(self.bias, tf.constant(self.bias_keep, self.bias.dtype))
            x = ops.add(x, bias)
        return self.activation(x) if self.activation is not None else x


class MaskedEmbedding(keras.layers.Embedding):
    """Embedding with the seed-002 mask applied at the lookup (mask rows gathered by id).

    Masking the whole table instead would densify the gradient, and Keras optimizers
    treat dense and IndexedSlices gradients differently when an id repeats in a batch
    (Adam squares the slices before summing duplicates), so the reference must stay
    sparse to be comparable.
    """

    def __init__(self, input_dim, output_dim, keep=None, **kwargs):
        super().__init__(input_dim, output_dim, **kwargs)
        self.keep = keep

    def call(self, inputs):
        ids = ops.cast(inputs, "int32")
        rows = ops.take(self.embeddings, ids, axis=0)
        if self.keep is None:
            return rows
        keep = tf.gather(tf.constant(self.keep, self.embeddings.dtype), ids)
        return entry_stop_gradients(rows, keep)


def masked_mlp(sizes, keeps, activation="tanh", seed=0):
    """The MLP of conftest.mlp, each Dense masked by keeps[name] = (kernel_keep, bias_keep)."""
    keras.utils.set_random_seed(seed)
    names = [f"hidden{i + 1}" for i in range(len(sizes) - 2)] + ["out"]
    layers = [keras.Input((sizes[0],))]
    for i, (n, name) in enumerate(zip(sizes[1:], names)):
        k, b = keeps.get(name, (None, None))
        layers.append(MaskedDense(n, kernel_keep=k, bias_keep=b, name=name,
                                  activation=None if i == len(sizes) - 2 else activation))
    return keras.Sequential(layers)


def keep_of(frozen: np.ndarray) -> np.ndarray:
    return (~frozen).astype("float32")


def conv_programs(frozen: np.ndarray, seed: int = 4):
    """conv1 (trains) -> conv2 [3, 3, 4, 6] -> dense (trains), Adam, as plain TensorFlow over
    tf.Variables, twice from the same values: the plain step and the reference step, whose
    conv2 kernel goes through the seed-002 stop-gradient mask (`frozen`: True = frozen).
    Returns (step, its variables, reference tf.function, its variables, initial values, data)."""
    rng = np.random.default_rng(seed)
    init = {"c1": rng.normal(0, 0.3, (3, 3, 2, 4)), "c2": rng.normal(0, 0.3, (3, 3, 4, 6)),
            "d": rng.normal(0, 0.3, (6 * 5 * 5, 3))}
    keep = tf.constant(keep_of(frozen))
    data = [(rng.normal(size=(4, 5, 5, 2)).astype("float32"), rng.normal(size=(4, 3)).astype("float32"))
            for _ in range(4)]

    def program(masked):
        w = {k: tf.Variable(v.astype("float32"), name=k) for k, v in init.items()}
        optimizer = keras.optimizers.Adam(1e-2)

        def step(x, y):
            with tf.GradientTape() as tape:
                c2 = entry_stop_gradients(w["c2"], keep) if masked else w["c2"]
                h = tf.tanh(tf.nn.conv2d(x, w["c1"], 1, "SAME"))
                h = tf.tanh(tf.nn.conv2d(h, c2, 1, "SAME"))
                loss = tf.reduce_mean(tf.square(tf.reshape(h, (4, -1)) @ w["d"] - y))
            variables = list(w.values())
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss

        return step, w

    step, w = program(False)
    ref_step, w_ref = program(True)
    return step, w, tf.function(ref_step), w_ref, init, data


def assert_conv_programs_agree(rewritten, ref_step, w, w_ref, init, frozen, data):
    """Run both `conv_programs` steps over `data`: equal losses, conv2's frozen entries
    bitwise unchanged (S1), everything else equal to the reference."""
    for x, y in data:
        np.testing.assert_allclose(rewritten(x, y).numpy(), ref_step(x, y).numpy(), rtol=1e-5)
    assert np.array_equal(w["c2"].numpy()[frozen], init["c2"].astype("float32")[frozen])
    for k in init:
        np.testing.assert_allclose(w[k].numpy()[~frozen] if k == "c2" else w[k].numpy(),
                                   w_ref[k].numpy()[~frozen] if k == "c2" else w_ref[k].numpy(),
                                   atol=1e-5, rtol=1e-5)
