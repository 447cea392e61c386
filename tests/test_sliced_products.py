"""Sliced weight gradients (issue 14 item 1): for whole trainable rows or columns the
weight-gradient op (MatMul, the tied projection's Einsum, a lookup's segment sum, a Conv2D
filter gradient) is computed on the trainable lines only; results equal the references."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_step, mlp
from references import assert_conv_programs_agree, conv_programs
from test_sliced import DATA, SIZES, _rules, _slots

import graphfreeze as gf


@pytest.mark.parametrize("kind", ["rows", "columns", "unfreeze_rows"])
def test_weight_gradient_product_is_computed_on_the_slice(kind):
    """hidden1/kernel [6, 12]: the plain step's weight-gradient MatMul is [6, 12]; the
    rewritten one is [trainable rows, 12] or [6, trainable columns], and no product of the
    kernel's full shape is left."""
    rules, frozen = _rules(kind)
    model = mlp(SIZES)
    step = make_step(model, keras.optimizers.Adam(1e-2))
    plain = tf.function(step).get_concrete_function(*DATA[0]).graph
    assert (6, 12) in {tuple(op.outputs[0].shape) for op in plain.get_operations()
                       if op.type == "MatMul"}
    rw = gf.rewrite(step, rules, *DATA[0])
    products = [d["shapes"][0] for _, d in rw.graph.nodes(data=True) if d["op"] == "MatMul"]
    assert (6, 12) not in products, products
    rows, columns = (~frozen).any(1).sum(), (~frozen).any(0).sum()
    assert ((rows, 12) if kind != "columns" else (6, columns)) in products, products
    start = model.get_layer("hidden1").kernel.numpy().copy()
    rw(*DATA[0])
    now = model.get_layer("hidden1").kernel.numpy()
    assert np.array_equal(now[frozen], start[frozen]) and not np.array_equal(now, start)


def _tied_weights(vocab=40, width=8):
    rng = np.random.default_rng(0)
    return (rng.normal(0, 0.3, (vocab, width)).astype("float32"),
            rng.normal(0, 0.3, (width, width)).astype("float32"))


def _tied_loss(rows_of, table_for_logits, w, ids, labels):
    x = tf.tanh(rows_of(ids) @ w)
    logits = table_for_logits(x)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


def test_tied_embedding_with_a_few_trainable_rows_equals_hand_split_program():
    """A table used by a lookup and by the output projection (einsum), a layer between them
    that trains; three rows of the table train. Reference: the hand-split program (the
    three rows their own variable, the rest a constant). The table's gradient is computed
    for the three rows only: no full-size einsum or segment sum is left."""
    table0, w0 = _tied_weights()
    new_rows = np.array([3, 17, 38])
    rng = np.random.default_rng(2)
    data = [(rng.integers(0, 40, (4, 6)).astype("int32"), rng.integers(0, 40, (4, 6)).astype("int32"))
            for _ in range(4)]
    data = [(np.where(np.arange(6) % 3 == 0, new_rows[np.arange(6) % 3], ids), y) for ids, y in data]
    table, w = tf.Variable(table0, name="table"), tf.Variable(w0, name="w")
    optimizer = keras.optimizers.Adam(1e-2)

    def step(ids, labels):
        with tf.GradientTape() as tape:
            loss = _tied_loss(lambda i: tf.gather(table, i),
                              lambda x: tf.einsum("btd,vd->btv", x, table), w, ids, labels)
        grads = tape.gradient(loss, [table, w])
        optimizer.apply_gradients(zip(grads, [table, w]))
        return loss

    frozen_rows = np.setdiff1d(np.arange(40), new_rows)
    new = tf.Variable(table0[new_rows], name="new")
    w_ref = tf.Variable(w0, name="w_ref")
    position = np.full(40, -1)
    position[new_rows] = np.arange(3)
    ref_optimizer = keras.optimizers.Adam(1e-2)

    @tf.function
    def ref_step(ids, labels):
        def assembled():  # the frozen rows as a constant, the new ones gathered in place
            rows = [tf.constant(table0[i])[None] if position[i] < 0 else new[position[i]][None]
                    for i in range(40)]
            return tf.concat(rows, 0)
        with tf.GradientTape() as tape:
            full = assembled()
            loss = _tied_loss(lambda i: tf.gather(full, i),
                              lambda x: tf.einsum("btd,vd->btv", x, full), w_ref, ids, labels)
        grads = tape.gradient(loss, [new, w_ref])
        ref_optimizer.apply_gradients(zip(grads, [new, w_ref]))
        return loss

    rw = gf.rewrite(step, ["*", gf.Unfreeze(gf.Rows("table", new_rows)), gf.Unfreeze("w")], *data[0])
    for ids, labels in data:
        np.testing.assert_allclose(rw(ids, labels).numpy(), ref_step(ids, labels).numpy(), rtol=1e-5)
    now = table.numpy()
    assert np.array_equal(now[frozen_rows], table0[frozen_rows])  # S1
    np.testing.assert_allclose(now[new_rows], new.numpy(), atol=1e-5)
    np.testing.assert_allclose(w.numpy(), w_ref.numpy(), atol=1e-5)
    for slot in _slots(optimizer, "table"):  # S4: never written at frozen rows
        assert not slot.numpy()[frozen_rows].any() and slot.numpy()[new_rows].any()
    full = [(n, d["op"]) for n, d in rw.graph.nodes(data=True) if d["shapes"] and
            d["shapes"][0] == (40, 8) and d["op"] in ("Einsum", "UnsortedSegmentSum", "AddN", "MatMul")]
    assert not full, full
    assert len(rw.plan.notes.sliced_writes) == 3 and not rw.plan.notes.unsliced


def test_conv2d_with_frozen_output_channels_equals_seed002_reference():
    """conv1 (trains) -> conv2 with output channels 1, 4, 5 frozen -> dense (trains), Adam;
    the reference masks conv2's kernel with the seed-002 stop-gradient by hand. The filter
    gradient is computed for the trainable channels only."""
    frozen_channels = [1, 4, 5]
    frozen = np.zeros((3, 3, 4, 6), bool)
    frozen[..., frozen_channels] = True
    step, w, ref_step, w_ref, init, data = conv_programs(frozen)
    rw = gf.rewrite(step, [gf.Columns("c2", frozen_channels)], *data[0])
    assert_conv_programs_agree(rw, ref_step, w, w_ref, init, frozen, data)
    filters = [d["shapes"][0] for _, d in rw.graph.nodes(data=True) if d["op"] == "Conv2DBackpropFilter"]
    assert (3, 3, 4, 3) in filters and (3, 3, 4, 6) not in filters, filters
    assert len(rw.plan.notes.sliced_writes) == 3 and not rw.plan.notes.unsliced
