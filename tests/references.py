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
