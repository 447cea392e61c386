"""Masks that vary along two axes, sliced block by block (issue 14, the seed-000 "grow"
case): a middle kernel grown by new units keeps its old-to-old block frozen, so its
trainable entries form an L (new rows, all columns; old rows, new columns)."""

from __future__ import annotations

import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batches, make_step, mirrored, mlp
from references import assert_conv_programs_agree, conv_programs, keep_of, masked_mlp
from test_sliced import OPTIMIZERS, _components

import graphfreeze as gf

BLOCKS = importlib.import_module("graphfreeze.passes.slice_blocks")

SIZES = (6, 12, 10, 3)  # hidden2/kernel [12, 10] is grown: 8 old rows, 7 old columns
OLD_ROWS, OLD_COLUMNS = 8, 7
DATA = batches(8, (16, 6), (16, 3))
FROZEN = np.zeros((12, 10), bool)
FROZEN[:OLD_ROWS, :OLD_COLUMNS] = True

def _rules(style):
    if style == "mask":
        return [gf.Mask("hidden2/kernel", FROZEN)]
    return [gf.Columns("hidden2/kernel", range(OLD_COLUMNS)),  # as bench/bench_partial.py
            gf.Unfreeze(gf.Rows("hidden2/kernel", range(OLD_ROWS, 12)))]


def _slots(optimizer, name):
    return [v for v in optimizer.variables if f"{name}_" in v.path]


def _slot_kind(slot, name):
    return slot.path.rsplit(f"{name}_", 1)[1]


def _built_up(opt_name):
    """A model and its optimizer after three plain steps (momentum and moments built up)."""
    model = mlp(SIZES)
    optimizer = OPTIMIZERS[opt_name]()
    step = make_step(model, optimizer)
    plain = tf.function(step)
    for x, y in DATA[:3]:
        plain(x, y)
    return model, optimizer, step


def _assert_blocks_products(rw):
    """No [12, 10] weight-gradient product is left for hidden2; the two blocks' are there."""
    products = [d["shapes"][0] for _, d in rw.graph.nodes(data=True) if d["op"] == "MatMul"]
    assert (12, 10) not in products, products
    assert {(OLD_ROWS, 10 - OLD_COLUMNS), (12 - OLD_ROWS, 10)} <= set(products), products
    notes = rw.plan.notes
    assert notes.slicing["sequential/hidden2/kernel"].startswith("blocks: 2"), notes.slicing
    assert not notes.unsliced, notes.unsliced


class _HandSplit(tf.Module):
    """The program an expert writes: hidden2's frozen block a constant, its new rows and
    its old rows' new columns two variables, put together with concat."""

    def __init__(self, model):
        super().__init__()
        w1, b1, k, b2, w3, b3 = (v.numpy() for v in model.trainable_variables)
        self.frozen = tf.constant(k[:OLD_ROWS, :OLD_COLUMNS])
        self.new_columns = keras.Variable(k[:OLD_ROWS, OLD_COLUMNS:], name="new_columns")
        self.new_rows = keras.Variable(k[OLD_ROWS:], name="new_rows")
        self.rest = {n: keras.Variable(v, name=n) for n, v in
                     zip(("w1", "b1", "b2", "w3", "b3"), (w1, b1, b2, w3, b3))}

    def kernel(self):
        return tf.concat([tf.concat([self.frozen, self.new_columns], 1), self.new_rows], 0)

    def __call__(self, x):
        r = self.rest
        h = tf.tanh(x @ r["w1"] + r["b1"])
        h = tf.tanh(h @ self.kernel() + r["b2"])
        return h @ r["w3"] + r["b3"]

    @property
    def variables_in_order(self):
        r = self.rest
        return [r["w1"], r["b1"], self.new_columns, self.new_rows, r["b2"], r["w3"], r["b3"]]


def _copy_state(model, optimizer, split, ref_optimizer):
    """The built-up slots of the plain run, cut for the hand-split variables."""
    ref_optimizer.build(split.variables_in_order)
    ref_optimizer.iterations.assign(optimizer.iterations)
    names = {"hidden1": ("w1", "b1"), "hidden2": ("kernel", "b2"), "out": ("w3", "b3")}
    for layer, (kernel_name, bias_name) in names.items():
        for var, target in zip(model.get_layer(layer).trainable_variables, (kernel_name, bias_name)):
            name = var.path.replace("/", "_").split("sequential_", 1)[1]
            for slot in _slots(optimizer, name):
                value, kind = slot.numpy(), _slot_kind(slot, name)
                if target == "kernel":
                    parts = {"new_columns": value[:OLD_ROWS, OLD_COLUMNS:], "new_rows": value[OLD_ROWS:]}
                else:
                    parts = {target: value}
                for part, v in parts.items():
                    (ref_slot,) = [s for s in _slots(ref_optimizer, part) if _slot_kind(s, part) == kind]
                    ref_slot.assign(v)


@pytest.mark.parametrize("style", ["columns_rows", "mask"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_l_shaped_middle_kernel_equals_hand_split_program(opt_name, style):
    """Moments built up before freezing; the rewritten step against the hand-split program
    (trainable layers below and above); frozen entries of the kernel and of every slot
    bitwise unchanged, trainable ones moved."""
    model, optimizer, step = _built_up(opt_name)
    split = _HandSplit(model)
    ref_optimizer = OPTIMIZERS[opt_name]()
    _copy_state(model, optimizer, split, ref_optimizer)
    kernel = model.get_layer("hidden2").kernel
    slots = _slots(optimizer, "hidden2_kernel")
    assert len(slots) >= 1
    before = {v.path: v.numpy().copy() for v in [kernel, *slots]}

    @tf.function
    def ref_step(x, y):
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y, split(x))
        grads = tape.gradient(loss, split.variables_in_order)
        ref_optimizer.apply_gradients(zip(grads, split.variables_in_order))
        return loss

    rw = gf.rewrite(step, _rules(style), *DATA[0])
    _assert_blocks_products(rw)
    for x, y in DATA[3:]:
        np.testing.assert_allclose(rw(x, y).numpy(), ref_step(x, y).numpy(), rtol=1e-5)
    for v in [kernel, *slots]:  # S1, S4
        now = v.numpy()
        assert np.array_equal(now[FROZEN], before[v.path][FROZEN]), f"{v.path}: frozen entries moved"
        assert not np.array_equal(now[~FROZEN], before[v.path][~FROZEN]), f"{v.path} did not train"
    np.testing.assert_allclose(kernel.numpy(), split.kernel().numpy(), atol=1e-5, rtol=1e-5)
    for name, layer_vars in (("hidden1", ("w1", "b1")), ("out", ("w3", "b3"))):
        for var, ref_name in zip(model.get_layer(name).trainable_variables, layer_vars):
            np.testing.assert_allclose(var.numpy(), split.rest[ref_name].numpy(), atol=1e-5, rtol=1e-5)


def _seed002_pair(opt_name, jit=False, strategy=None):
    """The model after built-up steps and the seed-002 masked reference with the same
    weights and optimizer state, its frozen entries' slots at zero (with theirs the seed-002
    optimizer would keep moving frozen weights)."""
    scope = strategy.scope() if strategy else _null()
    with scope:
        model = mlp(SIZES)
        reference = masked_mlp(SIZES, {"hidden2": (keep_of(FROZEN), None)})
        optimizer, ref_optimizer = OPTIMIZERS[opt_name](), OPTIMIZERS[opt_name]()
        optimizer.build(model.trainable_variables)
        ref_optimizer.build(reference.trainable_variables)
    wrap = _distributed(strategy) if strategy else \
        (lambda f: tf.function(f, jit_compile=True if jit else None))
    plain = wrap(make_step(model, optimizer))
    for x, y in DATA[:3]:
        plain(x, y)
    reference.set_weights(model.get_weights())
    for a, b in zip(optimizer.variables, ref_optimizer.variables):
        b.assign(a)
    for b in _slots(ref_optimizer, "hidden2_kernel"):
        b.assign(np.where(FROZEN, 0, b.numpy()))
    rw = gf.rewrite(wrap(make_step(model, optimizer)), _rules("columns_rows"), *DATA[0])
    return model, optimizer, reference, rw, wrap(make_step(reference, ref_optimizer))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _distributed(strategy):
    return lambda step: tf.function(lambda x, y: strategy.reduce(
        "SUM", strategy.run(step, args=(x, y)), axis=None))


def _check_against_seed002(model, optimizer, reference, rw, ref_step, atol=1e-5):
    slots = _slots(optimizer, "hidden2_kernel")
    kernel = model.get_layer("hidden2").kernel
    tracked = [kernel, *slots]
    before = {v.path: [c.numpy().copy() for c in _components(v)] for v in tracked}
    for x, y in DATA[3:]:
        rw(x, y)
        ref_step(x, y)
    for v in tracked:  # S1, S4 (on every replica)
        for c, b in zip(_components(v), before[v.path]):
            assert np.array_equal(c.numpy()[FROZEN], b[FROZEN]), f"{v.path} moved"
            assert not np.array_equal(c.numpy()[~FROZEN], b[~FROZEN]), f"{v.path} did not train"
    np.testing.assert_allclose(kernel.numpy()[~FROZEN],
                               reference.get_layer("hidden2").kernel.numpy()[~FROZEN], atol=atol, rtol=1e-5)
    for name in ("hidden1", "out"):  # trainable layers below and above
        for va, vb in zip(model.get_layer(name).variables, reference.get_layer(name).variables):
            np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=atol, rtol=1e-5)
    np.testing.assert_allclose(model.get_layer("hidden2").bias.numpy(),
                               reference.get_layer("hidden2").bias.numpy(), atol=atol, rtol=1e-5)


# AdamW has no comparable seed-002 reference (decoupled decay moves the reference's frozen
# entries); it is checked against the hand-split program above.
@pytest.mark.parametrize("opt_name", sorted(set(OPTIMIZERS) - {"adamw"}))
def test_l_shaped_middle_kernel_equals_seed002_reference(opt_name):
    model, optimizer, reference, rw, ref_step = _seed002_pair(opt_name)
    _assert_blocks_products(rw)
    _check_against_seed002(model, optimizer, reference, rw, ref_step)


def test_l_shaped_blocks_under_xla():
    model, optimizer, reference, rw, ref_step = _seed002_pair("adam", jit=True)
    assert rw.function._jit_compile is True
    _assert_blocks_products(rw)
    _check_against_seed002(model, optimizer, reference, rw, ref_step, atol=1e-4)


def test_l_shaped_blocks_on_every_replica():
    strategy = mirrored()
    model, optimizer, reference, rw, ref_step = _seed002_pair("adam", strategy=strategy)
    notes = rw.plan.notes
    assert not notes.unsliced, notes.unsliced
    assert len(notes.sliced_writes) == 2 * 3 * strategy.num_replicas_in_sync, notes.sliced_writes
    _check_against_seed002(model, optimizer, reference, rw, ref_step)


def _vf(frozen):
    from graphfreeze.rules import VariableFreeze

    return VariableFreeze(None, frozen)


def test_blocks_of_partitions_the_trainable_entries():
    """Blocks are disjoint and cover exactly the trainable entries; grouping is along the
    axis that gives fewer; a random mask gives more blocks than MAX_BLOCKS."""
    def covered(frozen, blocks):
        seen = np.zeros(frozen.shape, int)
        for block in blocks:
            lines = [np.arange(n) for n in frozen.shape]
            for axis, idx in block:
                lines[axis] = idx
            seen[np.ix_(*lines)] += 1
        return seen

    cross = np.ones((9, 11), bool)
    cross[3:5] = False
    cross[:, 6] = False
    stairs = np.ones((6, 6), bool)
    stairs[:2, :2] = stairs[2:4, :4] = stairs[4:, :] = False
    conv = np.zeros((3, 3, 5, 4), bool)
    conv[..., :3, :2] = True
    whole = FROZEN.copy()  # a column and a row frozen whole besides the old block
    whole[:, 8] = whole[10] = True
    for frozen, n in ((FROZEN, 2), (cross, 2), (stairs, 3), (conv, 2), (whole, 2)):
        count, blocks = BLOCKS.blocks_of(_vf(frozen))
        assert count == len(blocks) == n, blocks
        seen = covered(frozen, blocks)
        assert (seen == ~frozen).all(), seen
    rectangle, rows = BLOCKS.blocks_of(_vf(FROZEN))[1]  # in the order of their first row
    assert [a for a, _ in rectangle] == [0, 1] and [a for a, _ in rows] == [0]
    random = np.random.default_rng(0).random((12, 10)) < 0.5
    assert BLOCKS.blocks_of(_vf(random))[0] > BLOCKS.MAX_BLOCKS
    model = mlp(SIZES)
    rw = gf.rewrite(make_step(model, keras.optimizers.Adam(1e-2)),
                    [gf.Mask("hidden2/kernel", random)], *DATA[0])
    assert rw.plan.notes.slicing["sequential/hidden2/kernel"].startswith("dense"), rw.plan.notes.slicing


def test_conv2d_grown_in_both_channel_axes_equals_seed002_reference():
    """conv1 (trains) -> conv2 [3, 3, 4, 6] grown from 3 to 4 input and 4 to 6 output
    channels, old x old frozen -> dense (trains), Adam; the reference masks conv2's kernel
    with the seed-002 stop-gradient by hand. The filter gradient is computed per block
    (input channels gathered from the image, output channels from the output gradient)."""
    frozen = np.zeros((3, 3, 4, 6), bool)
    frozen[:, :, :3, :4] = True
    step, w, ref_step, w_ref, init, data = conv_programs(frozen)
    rules = [gf.Mask("c2", frozen)]
    rw = gf.rewrite(step, rules, *data[0])
    assert_conv_programs_agree(rw, ref_step, w, w_ref, init, frozen, data)
    filters = [d["shapes"][0] for _, d in rw.graph.nodes(data=True) if d["op"] == "Conv2DBackpropFilter"]
    assert (3, 3, 3, 2) in filters and (3, 3, 1, 6) in filters and (3, 3, 4, 6) not in filters, filters
    notes = rw.plan.notes
    assert notes.slicing["c2"].startswith("blocks: 2") and not notes.unsliced
    assert len(notes.sliced_writes) == 2 * 3, notes.sliced_writes


@pytest.mark.parametrize("jit", [False, True])
def test_l_of_scattered_lines_is_scattered_back(jit):
    """Old rows and columns that are not consecutive: the rectangle block is written back
    with ResourceScatterNd* at its index tuples (not a strided slice); Adam, trainable
    layers on both sides, against the seed-002 mask by hand; frozen entries and slots kept."""
    frozen = np.zeros((12, 10), bool)
    frozen[np.ix_([0, 2, 3, 5, 6, 9, 10, 11], [0, 1, 3, 4, 6, 8, 9])] = True
    model = mlp(SIZES)
    reference = masked_mlp(SIZES, {"hidden2": (keep_of(frozen), None)})
    reference.set_weights(model.get_weights())
    optimizer = OPTIMIZERS["adam"]()
    step = make_step(model, optimizer)
    rw = gf.rewrite(tf.function(step, jit_compile=True) if jit else step,
                    [gf.Mask("hidden2/kernel", frozen)], *DATA[0])
    ref_step = tf.function(make_step(reference, OPTIMIZERS["adam"]()), jit_compile=jit or None)
    ops = {rw.ir.op(n) for n in rw.plan.notes.sliced_writes}
    assert {"ResourceScatterNdAdd", "ResourceScatterAdd", "ResourceScatterSub"} <= ops, ops
    assert rw.plan.notes.slicing["sequential/hidden2/kernel"].startswith("blocks: 2")
    kernel = model.get_layer("hidden2").kernel
    start = kernel.numpy().copy()
    for x, y in DATA:
        rw(x, y)
        ref_step(x, y)
    assert np.array_equal(kernel.numpy()[frozen], start[frozen])
    for slot in _slots(optimizer, "hidden2_kernel"):  # S4: built from zero, never written there
        assert not slot.numpy()[frozen].any() and slot.numpy()[~frozen].any()
    np.testing.assert_allclose(kernel.numpy()[~frozen],
                               reference.get_layer("hidden2").kernel.numpy()[~frozen], atol=1e-4, rtol=1e-5)
    for name in ("hidden1", "out"):
        for va, vb in zip(model.get_layer(name).variables, reference.get_layer(name).variables):
            np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-4, rtol=1e-5)
