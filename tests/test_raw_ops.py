"""Writes that Keras 3 does not emit but TensorFlow code does: fused ResourceApply*
kernels, every scatter kind, and ops the passes do not know (issues 2 and 3)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import graphfreeze as gf

X = np.linspace(-1, 1, 12, dtype="float32").reshape(4, 3)


def _variables():
    rng = np.random.default_rng(0)
    return (tf.Variable(rng.normal(size=(3, 5)).astype("float32"), name="w"),
            tf.Variable(rng.normal(size=(5,)).astype("float32"), name="b"),
            tf.Variable(np.zeros((3, 5), "float32"), name="w_accum"))


def test_fused_apply_ops_are_removed_for_whole_variables():
    w, b, accum = _variables()

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.tanh(x @ w + b) ** 2)
        gw, gb = tape.gradient(loss, [w, b])
        tf.raw_ops.ResourceApplyMomentum(var=w.handle, accum=accum.handle, lr=0.1, grad=gw,
                                         momentum=0.9)
        tf.raw_ops.ResourceApplyGradientDescent(var=b.handle, alpha=0.1, delta=gb)
        return loss

    rw = gf.rewrite(step, ["w"], X)
    before_w, before_b, before_acc = w.numpy().copy(), b.numpy().copy(), accum.numpy().copy()
    for _ in range(3):
        rw(X)
    assert np.array_equal(w.numpy(), before_w)
    assert np.array_equal(accum.numpy(), before_acc)  # the fused op owned it: untouched
    assert not np.array_equal(b.numpy(), before_b)
    assert not [n for n, op in rw.graph.nodes(data="op") if op == "ResourceApplyMomentum"]


def test_partial_freeze_of_fused_write_without_a_partial_form_is_refused_by_name():
    """A fused kernel with neither an elementwise form nor, for columns, a sparse one (the
    others are run on the trainable entries: tests/test_fused_partial.py)."""
    w, b, accum = _variables()

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(x @ w)
        gw = tape.gradient(loss, w)
        tf.raw_ops.ResourceApplyProximalAdagrad(var=w.handle, accum=accum.handle, lr=0.1,
                                                l1=0.0, l2=0.0, grad=gw)
        return loss

    before = w.numpy().copy()
    with pytest.raises(gf.UnsupportedGraphError,
                       match="ResourceApplyProximalAdagrad.*'w'.*partly frozen"):
        gf.rewrite(step, [gf.Columns("w", [0])], X)
    assert np.array_equal(w.numpy(), before)


@pytest.mark.parametrize("kind", ["update", "max", "mul", "div", "add", "sub", "min"])
def test_scatter_guards(kind):
    table = tf.Variable(np.arange(1, 25, dtype="float32").reshape(6, 4), name="table")
    ids = tf.constant([0, 2, 3, 5])
    # NaN for the frozen rows 2 and 5: a guard that multiplied would write NaN there
    updates = tf.constant(np.array([[7.5] * 4, [np.nan] * 4, [7.5] * 4, [np.inf, np.nan, -np.inf, 1.0]],
                                   "float32"))
    op = {"update": tf.raw_ops.ResourceScatterUpdate, "max": tf.raw_ops.ResourceScatterMax,
          "min": tf.raw_ops.ResourceScatterMin, "mul": tf.raw_ops.ResourceScatterMul,
          "div": tf.raw_ops.ResourceScatterDiv, "add": tf.raw_ops.ResourceScatterAdd,
          "sub": tf.raw_ops.ResourceScatterSub}[kind]

    def write(u):
        op(resource=table.handle, indices=ids, updates=u)
        return table.read_value()

    frozen_rows = [2, 5]
    rw = gf.rewrite(write, [gf.Rows("table", frozen_rows)], updates)
    expected = table.numpy().copy()
    rows = ids.numpy()
    apply = {"update": lambda a, u: u, "max": np.maximum, "min": np.minimum,
             "mul": np.multiply, "div": np.divide, "add": np.add, "sub": np.subtract}[kind]
    for r, u in zip(rows, updates.numpy()):
        if r not in frozen_rows:
            expected[r] = apply(expected[r], u)
    result = rw(updates).numpy()
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    np.testing.assert_array_equal(table.numpy(), expected)


@pytest.mark.parametrize("kind", ["update", "add"])
def test_scatter_nd_guards(kind):
    table = tf.Variable(np.arange(12, dtype="float32").reshape(3, 4), name="grid")
    indices = tf.constant([[0, 1], [1, 1], [2, 3]])
    updates = tf.constant([10.0, np.nan, 30.0])  # NaN for the frozen entry [1, 1]
    op = tf.raw_ops.ResourceScatterNdUpdate if kind == "update" else tf.raw_ops.ResourceScatterNdAdd

    def write(u):
        op(ref=table.handle, indices=indices, updates=u)
        return table.read_value()

    frozen = np.zeros((3, 4), bool)
    frozen[1, 1] = True
    rw = gf.rewrite(write, [gf.Mask("grid", frozen)], updates)
    expected = table.numpy().copy()
    for (r, c), u in zip(indices.numpy(), updates.numpy()):
        if not frozen[r, c]:
            expected[r, c] = u if kind == "update" else expected[r, c] + u
    np.testing.assert_array_equal(rw(updates).numpy(), expected)


def test_unknown_op_on_frozen_resource_is_refused_by_name():
    counter = tf.Variable(0, name="counter")
    w = tf.Variable(1.0, name="w2")

    def step():
        tf.raw_ops.ResourceCountUpTo(resource=counter.handle, limit=10, T=tf.int32)
        return w * 2.0

    with pytest.raises(gf.UnsupportedGraphError, match="ResourceCountUpTo node") as e:
        gf.rewrite(step, ["counter"])
    assert "'counter'" in str(e.value)
    assert int(counter.numpy()) == 0


def test_resource_reaching_a_body_through_an_unknown_op_is_refused():
    """tf.data's map function captures the variable; MapDataset is not a call op the
    passes follow, so freezing the variable is refused rather than done partially."""
    w = tf.Variable(np.ones((3,), "float32"), name="mapped")
    opt = tf.keras.optimizers.SGD(0.1)

    def step(x):
        ds = tf.data.Dataset.from_tensor_slices(x).map(lambda r: r * w)
        total = ds.reduce(tf.zeros([3]), lambda a, b: a + b)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(total * w)
        opt.apply_gradients([(tape.gradient(loss, w), w)])
        return loss

    with pytest.raises(gf.UnsupportedGraphError, match=r"'mapped'.*(MapDataset|Dataset)"):
        gf.rewrite(step, ["mapped"], X)


def test_fused_batchnorm_switches_to_inference_mode_forward_and_backward():
    """TF1-style fused BatchNorm (FusedBatchNormV3, statistics updated with assign_sub):
    with batchnorm_inference the op and its gradient op run in inference mode, equal to
    the same step written in inference mode by hand; the conv below it still trains."""
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(4, 6, 6, 3)).astype("float32") for _ in range(3)]

    def variables():
        return {"w": tf.Variable(rng.normal(size=(3, 3, 3, 4)).astype("float32") * 0.3, name="conv_w"),
                "gamma": tf.Variable(np.linspace(0.5, 1.5, 4, dtype="float32"), name="bn_gamma"),
                "beta": tf.Variable(np.linspace(-0.2, 0.2, 4, dtype="float32"), name="bn_beta"),
                "mean": tf.Variable(np.linspace(-0.3, 0.3, 4, dtype="float32"), name="bn_mean"),
                "var": tf.Variable(np.linspace(0.5, 2.0, 4, dtype="float32"), name="bn_var"),
                "head": tf.Variable(rng.normal(size=(4,)).astype("float32"), name="head")}

    def step_for(v, training):
        def step(x):
            with tf.GradientTape() as tape:
                h = tf.nn.conv2d(x, v["w"], 1, "SAME")
                if training:
                    y, m, s = tf.compat.v1.nn.fused_batch_norm(h, v["gamma"], v["beta"],
                                                               epsilon=1e-3, is_training=True)
                    v["mean"].assign_sub((v["mean"] - m) * 0.1)
                    v["var"].assign_sub((v["var"] - s) * 0.1)
                else:
                    y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                        h, v["gamma"], v["beta"], mean=v["mean"], variance=v["var"], epsilon=1e-3,
                        is_training=False)
                loss = tf.reduce_sum(tf.tanh(tf.reduce_mean(y, [1, 2]) * v["head"]) ** 2)
            trained = [v["w"], v["head"]] + ([v["gamma"], v["beta"]] if training else [])
            for var, g in zip(trained, tape.gradient(loss, trained)):
                var.assign_sub(0.1 * g)
            return loss
        return step

    ours, ref = variables(), variables()
    for k in ref:
        ref[k].assign(ours[k])
    frozen = {k: ours[k].numpy().copy() for k in ("gamma", "beta", "mean", "var")}
    w_before = ours["w"].numpy().copy()
    rw = gf.rewrite(step_for(ours, True), ["bn_*"], xs[0], batchnorm_inference=True)
    ref_step = tf.function(step_for(ref, False))
    for x in xs:
        rw(x)
        ref_step(x)
    for k, value in frozen.items():
        assert np.array_equal(ours[k].numpy(), value), k
    for k in ("w", "head"):
        np.testing.assert_allclose(ours[k].numpy(), ref[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    assert not np.array_equal(ours["w"].numpy(), w_before)
    fused = [d["nodedef"] for _, d in rw.graph.nodes(data=True) if d["op"].startswith("FusedBatchNorm")]
    assert fused and not any(nd.attr["is_training"].b for nd in fused)
