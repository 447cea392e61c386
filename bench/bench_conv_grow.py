"""Issue 14: a Conv2D grow case (new output channels only) against training everything.

conv1 (trains) -> grown conv2 (3x3, OLD+NEW output channels; the OLD channels frozen:
`gf.Columns` on the kernel's last axis and `gf.Rows` on the bias) -> conv3 (trains) ->
global average pooling -> dense head (trains); batch of 32x32 images, Adam.

* graphfreeze: the plain step with the rules above (weight gradient of conv2 on the new
  output channels only, sliced optimizer updates);
* seed-002 mask trick: the same network with `entry_stop_gradients` on conv2's kernel and
  bias in the forward pass (the correctness reference, and a peer);
* train everything: the plain step.

With `--depthwise`, a MobileNet-style grown block instead: conv1 (3x3, OLD+NEW output
channels, the OLD frozen) -> a DepthwiseConv2D over those channels (the OLD input channels
of its kernel [3, 3, OLD+NEW, 1] frozen by a `gf.Mask` of whole lines along axis 2, and its
bias's OLD entries) -> 1x1 conv (trains) -> pooling -> head; its filter gradient is a
DepthwiseConv2dNativeBackpropFilter on the NEW channels only.

All three run interleaved in one process. The bench checks that two steps of graphfreeze and of
the mask trick from the same weights train the same values (1e-4 relative), and after the
timed steps that the old channels are bitwise unchanged.

    python bench/bench_conv_grow.py [--rounds 7] [--steps 5] [--quick] [--depthwise]
"""

from __future__ import annotations

import os
import sys

import common
import keras
import numpy as np
import tensorflow as tf

import graphfreeze as gf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from references import entry_stop_gradients  # noqa: E402


class _Masked:
    """A conv layer whose kernel and bias go through the seed-002 trick (keep: 1 = trains)."""

    def __init__(self, kernel_keep, bias_keep, **kwargs):
        super().__init__(**kwargs)
        self.kernel_keep, self.bias_keep = kernel_keep, bias_keep

    def call(self, inputs):
        kernel = entry_stop_gradients(self.kernel, tf.constant(self.kernel_keep))
        bias = entry_stop_gradients(self.bias, tf.constant(self.bias_keep))
        return self.activation(self.convolve(inputs, kernel) + bias)


class MaskedConv2D(_Masked, keras.layers.Conv2D):
    @staticmethod
    def convolve(x, kernel):
        return tf.nn.conv2d(x, kernel, strides=1, padding="SAME")


class MaskedDepthwiseConv2D(_Masked, keras.layers.DepthwiseConv2D):
    @staticmethod
    def convolve(x, kernel):
        return tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], padding="SAME")


def _keeps(kernel_shape, old: int, axis: int):
    """Seed-002 keep masks (1 = trains) of a grown layer: lines >= old of `axis`, bias >= old."""
    keep_k = np.zeros(kernel_shape, "float32")
    index = [slice(None)] * len(kernel_shape)
    index[axis] = slice(old, None)
    keep_k[tuple(index)] = 1
    keep_b = np.zeros(kernel_shape[axis], "float32")
    keep_b[old:] = 1
    return keep_k, keep_b


def depthwise_network(image: int, width: int, old: int, new: int, classes: int, masked: bool,
                      seed=0):
    keras.utils.set_random_seed(seed)
    conv = dict(filters=old + new, kernel_size=3, padding="same", activation="relu", name="below")
    grown = dict(kernel_size=3, padding="same", activation="relu", name="grown")
    if masked:
        below = MaskedConv2D(*_keeps((3, 3, 3, old + new), old, 3), **conv)
        depthwise = MaskedDepthwiseConv2D(*_keeps((3, 3, old + new, 1), old, 2), **grown)
    else:
        below, depthwise = keras.layers.Conv2D(**conv), keras.layers.DepthwiseConv2D(**grown)
    return keras.Sequential([
        keras.Input((image, image, 3)), below, depthwise,
        keras.layers.Conv2D(width, 1, activation="relu", name="above"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(classes, name="head"),
    ])


def depthwise_rules(old: int, new: int) -> list:
    kernel_frozen = np.zeros((3, 3, old + new, 1), bool)
    kernel_frozen[:, :, :old] = True
    return [gf.Columns("below/kernel", range(old)), gf.Rows("below/bias", range(old)),
            gf.Mask("grown/kernel", kernel_frozen), gf.Rows("grown/bias", range(old))]


def network(image: int, width: int, old: int, new: int, classes: int, masked: bool, seed=0):
    keras.utils.set_random_seed(seed)
    grown = dict(kernel_size=3, padding="same", activation="relu", name="grown")
    if masked:
        conv2 = MaskedConv2D(*_keeps((3, 3, width, old + new), old, 3), filters=old + new, **grown)
    else:
        conv2 = keras.layers.Conv2D(old + new, **grown)
    return keras.Sequential([
        keras.Input((image, image, 3)),
        keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="below"),
        conv2,
        keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="above"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(classes, name="head"),
    ])


def main(argv=None) -> int:
    parser = common.arguments(__doc__, rounds=7, steps=5)
    parser.add_argument("--depthwise", action="store_true",
                        help="the grown MobileNet-style block (conv + DepthwiseConv2D)")
    args = parser.parse_args(argv)
    image, width, old, new, batch, classes = ((16, 16, 32, 8, 8, 10) if args.quick
                                              else (32, 64, 128, 16, 32, 10))
    x = np.random.default_rng(0).normal(size=(batch, image, image, 3)).astype("float32")
    y = np.random.default_rng(1).integers(0, classes, size=(batch,)).astype("int32")
    if args.depthwise:
        build, rules = depthwise_network, depthwise_rules(old, new)
        grown = {"below": 3, "grown": 2}  # layer -> the kernel axis of its channels
    else:
        build = network
        rules = [gf.Columns("grown/kernel", range(old)), gf.Rows("grown/bias", range(old))]
        grown = {"grown": 3}

    ours = build(image, width, old, new, classes, masked=False)
    peer = build(image, width, old, new, classes, masked=True)
    full = build(image, width, old, new, classes, masked=False)
    peer.set_weights(ours.get_weights())
    full.set_weights(ours.get_weights())
    initial = {name: [w.copy() for w in ours.get_layer(name).get_weights()] for name in grown}

    def adam_step(model):
        return tf.function(common.train_step(model, keras.optimizers.Adam(1e-3)))

    gf_step = gf.freeze(*rules)(adam_step(ours))
    peer_step, full_step = adam_step(peer), adam_step(full)

    # the same training: two steps from the same weights give the same values (checked
    # before timing: over many Adam steps, the two programs' different float rounding drifts)
    for _ in range(2):
        gf_step(x, y), peer_step(x, y)
    for a, b in zip(ours.get_weights(), peer.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    times = common.interleaved({
        "graphfreeze (Columns/Mask rules)" if args.depthwise else "graphfreeze (Columns rule)":
            lambda: gf_step(x, y),
        "seed-002 mask trick": lambda: peer_step(x, y),
        "train everything": lambda: full_step(x, y),
    }, rounds=args.rounds, steps=args.steps)

    # after the timed steps: no gross divergence from the mask trick (Keras's Conv2D and the
    # peer's tf.nn.conv2d + add drift apart by 1e-3 in 28 Adam steps even with nothing
    # frozen), old channels exactly as they were
    for a, b in zip(ours.get_weights(), peer.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-2)
    for name, axis in grown.items():
        kernel, bias = ours.get_layer(name).get_weights()
        old_k, new_k = np.split(kernel, [old], axis=axis)
        np.testing.assert_array_equal(old_k, np.split(initial[name][0], [old], axis=axis)[0])
        np.testing.assert_array_equal(bias[:old], initial[name][1][:old])
        assert not np.array_equal(new_k, np.split(initial[name][0], [old], axis=axis)[1])
    rw = gf_step.rewritten(x, y)
    filters = [tuple(t.shape.as_list()) for op in rw.concrete_function.graph.get_operations()
               if op.type.endswith("BackpropFilter") for t in op.outputs]

    if args.depthwise:
        name, frozen, total = "depthwise_grow", 9 * 3 * old + old + 9 * old + old, \
            (9 * 3 + 1 + 9 + 1) * (old + new)
        title = f"grown conv 3->{old}+{new} + DepthwiseConv2D 3x3 over them, old channels frozen"
    else:
        name, frozen, total = "conv_grow", 9 * width * old + old, 9 * width * (old + new) + old + new
        title = f"Conv2D grow: 3x3 conv {width}->{old}+{new} channels, old channels frozen"
    path = common.publish(
        name, f"{title}, batch {batch}x{image}x{image}, Adam (median of {args.rounds} rounds x "
        f"{args.steps} steps)", times, "train everything", "ratio_vs_train_everything",
        {"image": image, "width": width, "old_channels": old, "new_channels": new,
         "batch": batch, "optimizer": "Adam", "frozen_parameters": frozen,
         "grown_layer_parameters": total, "filter_gradient_shapes": filters,
         "rounds": args.rounds, "steps_per_round": args.steps}, argv, "bench_conv_grow.py",
        args.quick)
    print(f"\nfilter-gradient shapes in the rewritten step: {filters}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
