"""Sliced optimizer updates for partly frozen variables (issue 14): S4 for rows, columns
and entries, and the trainable entries still equal the seed-002 reference."""

from __future__ import annotations

import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batches, make_step, mirrored, mlp
from references import keep_of, masked_mlp

import graphfreeze as gf

SLICE = importlib.import_module("graphfreeze.passes.slice_updates")

SIZES = (6, 12, 10, 3)
DATA = batches(8, (16, 6), (16, 3))

OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "rmsprop_momentum": lambda: keras.optimizers.RMSprop(1e-2, momentum=0.9),
}


def _rules(kind):
    """Rules over hidden1/kernel [6, 12] (hidden2 and out train on both sides) and the
    frozen mask they mean."""
    if kind == "rows":
        frozen = np.zeros((6, 12), bool)
        frozen[[0, 2, 5]] = True
        return [gf.Rows("hidden1/kernel", [0, 2, 5])], frozen
    if kind == "columns":
        frozen = np.zeros((6, 12), bool)
        frozen[:, 3:9] = True
        return [gf.Columns("hidden1/kernel", slice(3, 9))], frozen
    if kind == "unfreeze_rows":  # everything frozen except rows 1 and 4 of hidden1/kernel
        frozen = np.ones((6, 12), bool)
        frozen[[1, 4]] = False
        return ["hidden1/kernel", gf.Unfreeze(gf.Rows("hidden1/kernel", [1, 4]))], frozen
    assert kind in ("mask", "mask_flat"), kind
    frozen = np.random.default_rng(3).random((6, 12)) < 0.5
    return [gf.Mask("hidden1/kernel", frozen)], frozen


def _mode(kind, monkeypatch):
    """"mask_flat": the same random Mask, sliced to its flat trainable entries (below
    FLAT_AT); "mask" (half the entries train) is guarded with the dense mask instead."""
    if kind == "mask_flat":
        monkeypatch.setattr(SLICE, "FLAT_AT", 1.0)


def _assert_written(notes, kind, writes):
    """At least `writes` writes (variable and slots) scattered at the trainable entries, or for a
    dense Mask the slot writes guarded and none sliced; never "not sliced"."""
    assert not notes.unsliced, notes.unsliced
    if kind == "mask":
        assert not notes.sliced_writes and len(notes.guarded_writes) >= writes
        return
    assert len(notes.sliced_writes) >= writes, notes.sliced_writes


def _slots(optimizer, name="hidden1_kernel"):
    return [v for v in optimizer.variables if name in v.path]


@pytest.mark.parametrize("kind", ["rows", "columns", "mask", "mask_flat", "unfreeze_rows"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_slots_of_frozen_entries_are_a_pause(opt_name, kind, monkeypatch):
    _mode(kind, monkeypatch)
    model = mlp(SIZES)
    optimizer = OPTIMIZERS[opt_name]()
    step = make_step(model, optimizer)
    plain = tf.function(step)
    for x, y in DATA[:3]:  # momentum and moments built up before freezing
        plain(x, y)
    rules, frozen = _rules(kind)
    slots = _slots(optimizer)
    assert slots, "the optimizer has slots for hidden1/kernel"
    kernel = model.get_layer("hidden1").kernel
    before = {v.path: v.numpy().copy() for v in [*slots, kernel]}
    rw = gf.rewrite(step, rules, *DATA[0])
    for x, y in DATA:
        rw(x, y)
    for v in [*slots, kernel]:
        now = v.numpy()
        assert np.array_equal(now[frozen], before[v.path][frozen]), f"{v.path}: frozen entries moved"
        assert not np.array_equal(now[~frozen], before[v.path][~frozen]), f"{v.path} did not train"
    notes = rw.plan.notes
    _assert_written(notes, kind, 1 + len(slots))
    # the writes are scatters at the trainable entries, not full-size assignments
    ops = {rw.ir.op(n) for n in notes.sliced_writes}
    assert all(op.startswith("ResourceScatter") for op in ops), ops


def _reference_pair(kind, make_opt, jit=False):
    rules, frozen = _rules(kind)
    model = mlp(SIZES)
    reference = masked_mlp(SIZES, {"hidden1": (keep_of(frozen), None)})
    reference.set_weights(model.get_weights())
    step = make_step(model, make_opt())
    if jit:
        step = tf.function(step, jit_compile=True)
    rw = gf.rewrite(step, rules, *DATA[0])
    ref_step = tf.function(make_step(reference, make_opt()), jit_compile=jit or None)
    return model, reference, rw, ref_step, frozen


def _assert_trainable_match(model, reference, frozen, atol=1e-5):
    a, b = model.get_layer("hidden1").kernel.numpy(), reference.get_layer("hidden1").kernel.numpy()
    np.testing.assert_allclose(a[~frozen], b[~frozen], atol=atol, rtol=1e-5)
    for name in ("hidden2", "out"):  # trainable layers after the partly frozen one
        for va, vb in zip(model.get_layer(name).variables, reference.get_layer(name).variables):
            np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=atol, rtol=1e-5)


# Under the seed-002 mask, decoupled weight decay still moves the reference's frozen
# entries and so its forward pass: AdamW has no comparable masked reference (S1 and S4
# are checked for it above).
@pytest.mark.parametrize("kind", ["rows", "columns", "mask", "mask_flat", "unfreeze_rows"])
@pytest.mark.parametrize("opt_name", sorted(set(OPTIMIZERS) - {"adamw"}))
def test_trainable_entries_equal_seed002_reference(opt_name, kind, monkeypatch):
    _mode(kind, monkeypatch)
    model, reference, rw, ref_step, frozen = _reference_pair(kind, OPTIMIZERS[opt_name])
    start = model.get_layer("hidden1").kernel.numpy().copy()
    for x, y in DATA:
        rw(x, y)
        ref_step(x, y)
    _assert_trainable_match(model, reference, frozen)
    assert np.array_equal(model.get_layer("hidden1").kernel.numpy()[frozen], start[frozen])


@pytest.mark.parametrize("kind", ["rows", "columns", "mask", "mask_flat"])
@pytest.mark.parametrize("opt_name", sorted(set(OPTIMIZERS) - {"adamw"}))
def test_pause_after_built_up_state_equals_seed002_reference(opt_name, kind, monkeypatch):
    """Slots built up by plain steps first: frozen entries' slots stay bitwise as they were,
    trainable entries match the seed-002 mask whose optimizer starts from the same slots
    with the frozen entries' at zero (with theirs, it would keep moving frozen weights)."""
    _mode(kind, monkeypatch)
    rules, frozen = _rules(kind)
    model = mlp(SIZES)
    optimizer = OPTIMIZERS[opt_name]()
    step = make_step(model, optimizer)
    plain = tf.function(step)
    for x, y in DATA[:3]:
        plain(x, y)
    reference = masked_mlp(SIZES, {"hidden1": (keep_of(frozen), None)})
    reference.set_weights(model.get_weights())
    ref_optimizer = OPTIMIZERS[opt_name]()
    ref_optimizer.build(reference.trainable_variables)
    for a, b in zip(optimizer.variables, ref_optimizer.variables):
        b.assign(a)
    ref_slots = _slots(ref_optimizer)
    assert ref_slots
    for b in ref_slots:
        b.assign(np.where(frozen, 0, b.numpy()))
    slots = _slots(optimizer)
    before = {v.path: v.numpy().copy() for v in slots}
    start = model.get_layer("hidden1").kernel.numpy().copy()
    rw = gf.rewrite(step, rules, *DATA[0])
    ref_step = tf.function(make_step(reference, ref_optimizer))
    for x, y in DATA[3:]:
        rw(x, y)
        ref_step(x, y)
    for v in slots:
        assert np.array_equal(v.numpy()[frozen], before[v.path][frozen]), f"{v.path} moved"
    assert np.array_equal(model.get_layer("hidden1").kernel.numpy()[frozen], start[frozen])
    _assert_trainable_match(model, reference, frozen)


@pytest.mark.parametrize("kind", ["rows", "columns"])
def test_sliced_updates_under_xla(kind):
    model, reference, rw, ref_step, frozen = _reference_pair(kind, OPTIMIZERS["adam"], jit=True)
    start = model.get_layer("hidden1").kernel.numpy().copy()
    for x, y in DATA:
        rw(x, y)
        ref_step(x, y)
    assert rw.function._jit_compile is True and rw.plan.notes.sliced_writes
    _assert_trainable_match(model, reference, frozen, atol=1e-4)
    assert np.array_equal(model.get_layer("hidden1").kernel.numpy()[frozen], start[frozen])


def test_keras_freeze_fit_keeps_slots_paused():
    x = np.concatenate([d[0] for d in DATA])
    y = np.concatenate([d[1] for d in DATA])
    model = mlp(SIZES)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)  # moments built up
    rules, frozen = _rules("rows")
    reference = masked_mlp(SIZES, {"hidden1": (keep_of(frozen), None)})
    reference.set_weights(model.get_weights())
    reference.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    reference.optimizer.build(reference.trainable_variables)
    for a, b in zip(model.optimizer.variables, reference.optimizer.variables):
        b.assign(a)  # the same moments and iteration count
    # Under the seed-002 mask Adam keeps moving frozen entries with the moments they built
    # up, which changes the reference's forward pass; with their moments at zero its update
    # there is exactly 0, so only the trainable entries' moments carry over, as in a pause.
    ref_slots = _slots(reference.optimizer)
    assert len(ref_slots) == 2
    for b in ref_slots:
        b.assign(np.where(frozen, 0, b.numpy()))
    slots = _slots(model.optimizer)
    before = {v.path: v.numpy().copy() for v in slots}
    gf.keras.freeze(model, *rules)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for v in slots:
        assert np.array_equal(v.numpy()[frozen], before[v.path][frozen]), f"{v.path} moved"
        assert not np.array_equal(v.numpy()[~frozen], before[v.path][~frozen])
    _assert_trainable_match(model, reference, frozen)


class _SplitKernel(tf.Module):
    """The hand-split program for hidden1/kernel along `axis`: the entries scaled by 0.1 as
    one variable (its own optimizer, learning rate times 0.1), the ordinary ones as another,
    the frozen ones a constant, put back in their order with a gather."""

    def __init__(self, model, axis, slow, frozen):
        super().__init__()
        w = [v.numpy() for v in model.trainable_variables]
        n = w[0].shape[axis]
        fast = [i for i in range(n) if i not in slow and i not in frozen]
        self.axis, self.order = axis, np.argsort(list(slow) + fast + list(frozen))
        self.slow = keras.Variable(np.take(w[0], slow, axis), name="slow")
        self.fast = keras.Variable(np.take(w[0], fast, axis), name="fast")
        self.frozen = tf.constant(np.take(w[0], frozen, axis))
        self.rest = [keras.Variable(v, name=f"w{i}") for i, v in enumerate(w[1:])]

    def __call__(self, x, training=None):
        k = tf.gather(tf.concat([self.slow, self.fast, self.frozen], self.axis), self.order,
                      axis=self.axis)
        b1, w2, b2, w3, b3 = self.rest
        return tf.tanh(tf.tanh(x @ k + b1) @ w2 + b2) @ w3 + b3


@pytest.mark.parametrize("axis", [0, 1])
def test_scale_and_freeze_on_one_variable_slice_together(axis):
    """gf.Scale on some rows (columns) and a freeze on others: the sliced update equals the
    hand-split program with one optimizer per group; no full-size scaled update is left."""
    line = (gf.Rows, gf.Columns)[axis]
    slow, frozen = ([1, 3], [0, 5]) if axis == 0 else ([2, 7], [0, 4, 9])
    model = mlp(SIZES)
    reference = _SplitKernel(model, axis, slow, frozen)
    rules = [gf.Scale(line("hidden1/kernel", slow), 0.1), line("hidden1/kernel", frozen)]
    optimizer = keras.optimizers.Adam(1e-2)
    rw = gf.rewrite(make_step(model, optimizer), rules, *DATA[0])
    groups = {0.1: [reference.slow], 1.0: [reference.fast, *reference.rest]}
    opts = {f: keras.optimizers.Adam(1e-2 * f) for f in groups}

    @tf.function
    def ref_step(x, y):
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y, reference(x))
        grads = tape.gradient(loss, groups[0.1] + groups[1.0])
        opts[0.1].apply_gradients(zip(grads[:1], groups[0.1]))
        opts[1.0].apply_gradients(zip(grads[1:], groups[1.0]))

    kernel = model.get_layer("hidden1").kernel
    start = kernel.numpy().copy()
    for x, y in DATA:
        rw(x, y)
        ref_step(x, y)
    now = kernel.numpy()
    assert np.array_equal(np.take(now, frozen, axis), np.take(start, frozen, axis))  # S1
    fast = [i for i in range(now.shape[axis]) if i not in slow + frozen]
    np.testing.assert_allclose(np.take(now, slow, axis), reference.slow.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.take(now, fast, axis), reference.fast.numpy(), atol=1e-5, rtol=1e-5)
    for v, r in zip(model.trainable_variables[1:], reference.rest):
        np.testing.assert_allclose(v.numpy(), r.numpy(), atol=1e-5, rtol=1e-5)
    for slot in _slots(optimizer):  # S4: frozen entries' moments never written
        assert not np.take(slot.numpy(), frozen, axis).any()
    notes = rw.plan.notes
    assert notes.scaled_writes and len(notes.sliced_writes) == 3 and not notes.unsliced
    full = [n for n, d in rw.graph.nodes(data=True) if d.get("inserted") == "scale_writes"
            and d["shapes"] and d["shapes"][0] == (6, 12)]
    assert not full, full


def _components(variable):
    value = getattr(variable, "_value", variable)
    return list(value.values) if isinstance(value, tf.distribute.DistributedValues) else [value]


@pytest.mark.parametrize("kind", ["rows", "mask", "mask_flat"])
def test_sliced_updates_on_every_replica(kind, monkeypatch):
    """MirroredStrategy: each replica's variable and slots are written at the trainable
    entries only; the result equals the seed-002 reference under the same strategy."""
    _mode(kind, monkeypatch)
    strategy = mirrored()
    rules, frozen = _rules(kind)
    with strategy.scope():
        model = mlp(SIZES)
        reference = masked_mlp(SIZES, {"hidden1": (keep_of(frozen), None)})
        optimizer, ref_optimizer = keras.optimizers.Adam(1e-2), keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)
        ref_optimizer.build(reference.trainable_variables)

    def distributed(step):
        return tf.function(lambda x, y: strategy.reduce(
            "SUM", strategy.run(step, args=(x, y)), axis=None))

    plain = distributed(make_step(model, optimizer))
    for x, y in DATA[:2]:  # moments built up before freezing
        plain(x, y)
    reference.set_weights(model.get_weights())
    for a, b in zip(optimizer.variables, ref_optimizer.variables):
        b.assign(a)
    for b in _slots(ref_optimizer):  # seed-002 Adam would move frozen entries with them
        b.assign(np.where(frozen, 0, b.numpy()))
    slots = _slots(optimizer)
    before = {v.path: [c.numpy().copy() for c in _components(v)] for v in slots}
    rw = gf.rewrite(distributed(make_step(model, optimizer)), rules, *DATA[0])
    ref_step = distributed(make_step(reference, ref_optimizer))
    for x, y in DATA[2:]:
        rw(x, y)
        ref_step(x, y)
    _assert_written(rw.plan.notes, kind, 3 * strategy.num_replicas_in_sync)
    for v in slots:
        for c, b in zip(_components(v), before[v.path]):  # S4 on every replica
            assert np.array_equal(c.numpy()[frozen], b[frozen]), f"{c.device}: {v.path} moved"
            assert not np.array_equal(c.numpy()[~frozen], b[~frozen])
    _assert_trainable_match(model, reference, frozen)


@pytest.mark.parametrize("wrap", ["accumulation", "loss_scale"])
def test_updates_in_cond_branches_keep_slots_paused(wrap):
    """Gradient accumulation and a LossScaleOptimizer update inside `cond` branches, which
    are not sliced: their slot writes are guarded with the mask, so S4 still holds there."""
    model = mlp(SIZES)
    optimizer = keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2) if wrap == "accumulation" \
        else keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-2))
    step = make_step(model, optimizer)
    plain = tf.function(step)
    for x, y in DATA[:4]:
        plain(x, y)
    rules, frozen = _rules("columns")
    slots = [v for v in _slots(optimizer) if v.shape == (6, 12)]
    assert slots
    before = {v.path: v.numpy().copy() for v in slots}
    rw = gf.rewrite(step, rules, *DATA[0])
    for x, y in DATA[4:]:
        rw(x, y)
    for v in slots:
        assert np.array_equal(v.numpy()[frozen], before[v.path][frozen]), f"{v.path} moved"
        if "accumulat" not in v.path:  # the accumulator is back to zero after an even step
            assert not np.array_equal(v.numpy()[~frozen], before[v.path][~frozen])
    assert rw.plan.notes.unsliced and not rw.plan.notes.sliced_writes


@pytest.mark.parametrize("kind", ["rows", "columns"])
def test_partly_frozen_middle_layer_equals_seed002_reference(kind):
    """hidden2/kernel [12, 10] partly frozen with trainable layers on both sides: hidden1
    below (its gradient flows through the frozen entries) and out above. The weight-gradient
    product of hidden2 is sliced; every trainable value equals the seed-002 mask by hand."""
    frozen = np.zeros((12, 10), bool)
    if kind == "rows":
        frozen[[0, 3, 7, 8]] = True
        rules = [gf.Rows("hidden2/kernel", [0, 3, 7, 8])]
    else:
        frozen[:, 2:6] = True
        rules = [gf.Columns("hidden2/kernel", slice(2, 6))]
    model = mlp(SIZES)
    reference = masked_mlp(SIZES, {"hidden2": (keep_of(frozen), None)})
    reference.set_weights(model.get_weights())
    step = make_step(model, keras.optimizers.Adam(1e-2))
    plain = tf.function(step).get_concrete_function(*DATA[0]).graph
    assert (12, 10) in {tuple(op.outputs[0].shape) for op in plain.get_operations()
                        if op.type == "MatMul"}
    rw = gf.rewrite(step, rules, *DATA[0])
    products = [d["shapes"][0] for _, d in rw.graph.nodes(data=True) if d["op"] == "MatMul"]
    assert (12, 10) not in products, products
    ref_step = tf.function(make_step(reference, keras.optimizers.Adam(1e-2)))
    start = model.get_layer("hidden2").kernel.numpy().copy()
    for x, y in DATA:
        rw(x, y)
        ref_step(x, y)
    now = model.get_layer("hidden2").kernel.numpy()
    assert np.array_equal(now[frozen], start[frozen])
    np.testing.assert_allclose(now[~frozen], reference.get_layer("hidden2").kernel.numpy()[~frozen],
                               atol=1e-5, rtol=1e-5)
    for name in ("hidden1", "out"):  # below and above the partly frozen layer
        for va, vb in zip(model.get_layer(name).variables, reference.get_layer(name).variables):
            np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(model.get_layer("hidden2").bias.numpy(),
                               reference.get_layer("hidden2").bias.numpy(), atol=1e-5, rtol=1e-5)
