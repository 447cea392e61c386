"""Full reads of a sparsely updated variable alias its buffer (passes/read_without_copy.py).

A sliced update writes with scatters and strided-slice assignments, which put a variable in
TensorFlow's copy-on-read mode: every later full read would copy it. The rewrite puts a
DisableCopyOnRead before each such read (outside XLA) and lets TensorFlow copy the buffer
at a sparse write only when a read's value is still in use. These tests check the graph
has that shape, and that values stay right where aliasing matters: a value read before a
sparse write and used after it keeps the old entries, bit for bit.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batches, make_step, mlp
from references import keep_of, masked_mlp

import graphfreeze as gf

SIZES = (6, 12, 10, 3)  # hidden2/kernel [12, 10], grown: 8 old rows, 7 old columns
FROZEN = np.zeros((12, 10), bool)
FROZEN[:8, :7] = True
OUT_FROZEN = np.zeros((10, 3), bool)
OUT_FROZEN[:, 0] = True
RULES = [gf.Columns("hidden2/kernel", range(7)), gf.Unfreeze(gf.Rows("hidden2/kernel", range(8, 12))),
         gf.Columns("out/kernel", [0])]  # an L block by block, and a slice along axis 1
DATA = batches(4, (16, 6), (16, 3))
SPARSE_WRITES = ("ResourceScatter", "ResourceStridedSliceAssign", "ResourceSparseApply")


def _reads_and_their_guards(ir):
    """(full reads of sparsely written resources, those with a DisableCopyOnRead before them
    on the same handle)."""
    written = {ir.inputs(n)[0] for n, op in ir.graph.nodes(data="op") if op.startswith(SPARSE_WRITES)}
    reads = [n for n, op in ir.graph.nodes(data="op")
             if op == "ReadVariableOp" and ir.inputs(n)[0] in written]
    guarded = [r for r in reads if any(ir.op(c) == "DisableCopyOnRead" and ir.inputs(c)[0] ==
                                       ir.inputs(r)[0] for c in ir.control_inputs(r))]
    return reads, guarded


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_full_reads_of_sliced_variables_alias_their_buffer(jit):
    model = mlp(SIZES)
    reference = masked_mlp(SIZES, {"hidden2": (keep_of(FROZEN), None),
                                   "out": (keep_of(OUT_FROZEN), None)})
    reference.set_weights(model.get_weights())
    opt, ref_opt = keras.optimizers.Adam(0.05), keras.optimizers.Adam(0.05)
    step = tf.function(make_step(model, opt), jit_compile=True if jit else None)
    ref_step = tf.function(make_step(reference, ref_opt), jit_compile=jit or None)
    rw = gf.rewrite(step, RULES, *DATA[0])

    notes = rw.plan.notes
    assert notes.slicing["sequential/hidden2/kernel"].startswith("blocks: 2"), notes.slicing
    assert notes.slicing["sequential/out/kernel"].endswith("consecutive"), notes.slicing
    ops = {op for _, op in rw.graph.nodes(data="op")}
    assert "ResourceGather" not in ops  # a row read is a read then a gather: no copy-on-read
    reads, guarded = _reads_and_their_guards(rw.ir)
    if jit:  # XLA has no DisableCopyOnRead kernel and keeps variables in its own buffers
        assert reads and not guarded and "DisableCopyOnRead" not in ops
    else:
        assert reads and guarded == reads, sorted(set(reads) - set(guarded))

    kernel = model.get_layer("hidden2").kernel
    frozen_before = kernel.numpy()[FROZEN]
    for x, y in DATA:
        np.testing.assert_allclose(rw(x, y), ref_step(x, y), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(kernel.numpy()[FROZEN], frozen_before)
    for w, w_ref in zip(model.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(w.numpy(), w_ref.numpy(), rtol=1e-5, atol=1e-6)


def test_a_value_read_before_a_sliced_write_keeps_the_old_entries():
    """The step returns the kernel as read before the update and as read after it. The
    first read aliases the buffer (copy-on-read is off), and its value is used only after
    the sparse writes: TensorFlow must copy the buffer before writing it, or that value
    would show the update."""
    model = mlp(SIZES)
    opt = keras.optimizers.Adam(0.05)
    kernel = model.get_layer("hidden2").kernel
    train = make_step(model, opt)

    def step(x, y):
        before = tf.identity(kernel.value)
        loss = train(x, y)
        after = kernel.value
        return before + 0.0 * after, after, loss

    rw = gf.rewrite(tf.function(step), RULES, *DATA[0])
    reads, guarded = _reads_and_their_guards(rw.ir)
    assert reads and guarded == reads
    for x, y in DATA:
        start = kernel.numpy()
        before, after, _ = rw(x, y)
        np.testing.assert_array_equal(before.numpy(), start)
        np.testing.assert_array_equal(after.numpy(), kernel.numpy())
        assert not np.array_equal(after.numpy()[~FROZEN], start[~FROZEN])
        np.testing.assert_array_equal(after.numpy()[FROZEN], start[FROZEN])


def test_plain_whole_freezing_adds_nothing():
    """No sparse write, no DisableCopyOnRead: whole-variable freezing keeps its graph."""
    model = mlp(SIZES)
    rw = gf.rewrite(tf.function(make_step(model, keras.optimizers.Adam(0.05))),
                    ["hidden2/*"], *DATA[0])
    assert "DisableCopyOnRead" not in {op for _, op in rw.graph.nodes(data="op")}
