"""Sliced optimizer updates for partly frozen variables (issue 14): S4 for rows, columns
and entries, and the trainable entries still equal the seed-002 reference."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batches, make_step, mlp
from references import keep_of, masked_mlp

import graphfreeze as gf

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
    frozen = np.random.default_rng(3).random((6, 12)) < 0.5
    return [gf.Mask("hidden1/kernel", frozen)], frozen


def _slots(optimizer, name="hidden1_kernel"):
    return [v for v in optimizer.variables if name in v.path]


@pytest.mark.parametrize("kind", ["rows", "columns", "mask", "unfreeze_rows"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_slots_of_frozen_entries_are_a_pause(opt_name, kind):
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
    assert notes.sliced_writes and not notes.unsliced
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
@pytest.mark.parametrize("kind", ["rows", "columns", "mask"])
@pytest.mark.parametrize("opt_name", sorted(set(OPTIMIZERS) - {"adamw"}))
def test_trainable_entries_equal_seed002_reference(opt_name, kind):
    model, reference, rw, ref_step, frozen = _reference_pair(kind, OPTIMIZERS[opt_name])
    start = model.get_layer("hidden1").kernel.numpy().copy()
    for x, y in DATA:
        rw(x, y)
        ref_step(x, y)
    _assert_trainable_match(model, reference, frozen)
    assert np.array_equal(model.get_layer("hidden1").kernel.numpy()[frozen], start[frozen])


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
