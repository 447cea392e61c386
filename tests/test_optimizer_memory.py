"""Frozen parameters cost no optimizer memory (issue 20).

Every test trains a model with graphfreeze rules next to a twin with identical initial
weights frozen by Keras `trainable=False`, and compares the bytes of the optimizer
variables that exist after training (slots plus counters), the frozen values (bitwise)
and the trainable ones (1e-5).
"""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batches, make_step, mirrored, mlp, snapshot, twin

import graphfreeze as gf

SIZES = (6, 12, 10, 8, 3)
DATA = batches(4, (16, 6), (16, 3))
X = np.concatenate([x for x, _ in DATA])
Y = np.concatenate([y for _, y in DATA])
FIT = {"batch_size": 16, "epochs": 2, "shuffle": False, "verbose": 0}
OPTIONS = {
    "plain": {},
    "weight_decay": {"weight_decay": 0.05},
    "global_clipnorm": {"global_clipnorm": 0.1},
    "ema": {"use_ema": True, "ema_overwrite_frequency": 3},
    "accumulation": {"gradient_accumulation_steps": 2},
}


def state_bytes(optimizer):
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in optimizer.variables)


def _pair(frozen=("hidden2",), **kwargs):
    """(model, reference with `frozen` layers trainable=False, two fresh AdamWs)."""
    model = mlp(SIZES)
    reference = twin(model, lambda: mlp(SIZES))
    for name in frozen:
        reference.get_layer(name).trainable = False
    return model, reference, keras.optimizers.AdamW(1e-2, **kwargs), keras.optimizers.AdamW(1e-2, **kwargs)


def _check(model, reference, optimizer, ref_optimizer, before, frozen=("hidden2",)):
    assert ref_optimizer.built and optimizer.built
    assert state_bytes(optimizer) <= 1.05 * state_bytes(ref_optimizer), (
        [v.path for v in optimizer.variables], [v.path for v in ref_optimizer.variables])
    assert not [v.path for v in optimizer.variables
                if any(f"_{name}_" in v.path for name in frozen)]
    for name in frozen:  # S1
        for v in model.get_layer(name).variables:
            assert np.array_equal(v.numpy(), before[v.path]), f"{v.path} moved"
    for a, b in zip(model.variables, reference.variables):  # S2
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=1e-5, err_msg=a.path)
    assert not np.array_equal(model.get_layer("out").kernel.numpy(), before["sequential/out/kernel"])


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_custom_step_builds_state_for_trainable_only(option):
    model, reference, optimizer, ref_optimizer = _pair(**OPTIONS[option])
    step = gf.freeze("hidden2/*")(make_step(model, optimizer))
    ref_step = tf.function(make_step(reference, ref_optimizer))
    before = snapshot(model.variables)
    for x, y in DATA:
        step(x, y)
        ref_step(x, y)
    _check(model, reference, optimizer, ref_optimizer, before)


def test_rewrite_with_user_clipping_masks_the_frozen_gradient():
    """The user clips by the global norm of every gradient: the frozen ones (absent from
    the optimizer) are still masked to zero in that norm, as trainable=False leaves them out."""
    model, reference, optimizer, ref_optimizer = _pair(frozen=("hidden1", "hidden3"))

    def clipped_step(m, opt):
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = keras.losses.MeanSquaredError()(y, m(x, training=True))
            grads = tape.gradient(loss, m.trainable_variables)
            grads, norm = tf.clip_by_global_norm(grads, 0.05)
            opt.apply_gradients(zip(grads, m.trainable_variables))
            return norm
        return step

    rw = gf.rewrite(clipped_step(model, optimizer), ["hidden1/*", model.get_layer("hidden3")],
                    *DATA[0])
    ref_step = tf.function(clipped_step(reference, ref_optimizer))
    before = snapshot(model.variables)
    for x, y in DATA:
        np.testing.assert_allclose(rw(x, y).numpy(), ref_step(x, y).numpy(), rtol=1e-5)
    _check(model, reference, optimizer, ref_optimizer, before, frozen=("hidden1", "hidden3"))


def _freeze_fit_check(model, reference, optimizer, ref_optimizer):
    gf.keras.freeze(model, "hidden2/*")
    before = snapshot(model.variables)
    model.fit(X, Y, **FIT)
    reference.fit(X, Y, **FIT)
    _check(model, reference, optimizer, ref_optimizer, before)


@pytest.mark.parametrize("option", ["plain", "ema", "accumulation", "global_clipnorm", "lso"])
def test_fit_builds_state_for_trainable_only(option):
    model, reference, optimizer, ref_optimizer = _pair(**OPTIONS.get(option, {}))
    if option == "lso":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        ref_optimizer = keras.optimizers.LossScaleOptimizer(ref_optimizer)
    model.compile(optimizer=optimizer, loss="mse")
    reference.compile(optimizer=ref_optimizer, loss="mse")
    _freeze_fit_check(model, reference, optimizer, ref_optimizer)
    assert not hasattr(type(optimizer), "_graphfreeze") and "apply" not in vars(optimizer)
    assert "finalize_variable_values" not in vars(getattr(optimizer, "inner_optimizer", optimizer))


def test_fit_under_mirrored_strategy_builds_state_for_trainable_only():
    """Under a strategy Keras builds the optimizer before the step is traced."""
    with mirrored().scope():
        model, reference, optimizer, ref_optimizer = _pair()
        model.compile(optimizer=optimizer, loss="mse")
        reference.compile(optimizer=ref_optimizer, loss="mse")
    _freeze_fit_check(model, reference, optimizer, ref_optimizer)


def test_optimizer_built_before_freezing_keeps_its_state_untouched():
    """State that exists already is kept (S4) and its writes pruned, as before."""
    model = mlp(SIZES)
    optimizer = keras.optimizers.Adam(1e-2)
    step = make_step(model, optimizer)
    step(*DATA[0])
    count = len(optimizer.variables)
    state = snapshot(optimizer.variables)
    rw = gf.rewrite(step, ["hidden2/*"], *DATA[0])
    for x, y in DATA:
        rw(x, y)
    assert len(optimizer.variables) == count
    after = snapshot(optimizer.variables)
    assert [p for p in state if "_hidden2_" in p]
    assert all(np.array_equal(after[p], state[p]) for p in state if "_hidden2_" in p)


def test_failed_rewrite_leaves_the_optimizer_unbuilt():
    model = mlp(SIZES)
    optimizer = keras.optimizers.Adam(1e-2)
    with pytest.raises(gf.RuleError, match="out of range|beyond|index"):
        gf.rewrite(make_step(model, optimizer), ["hidden2/*", gf.Rows("hidden1/bias", [99])],
                   *DATA[0])
    assert not optimizer.built and len(optimizer.variables) == 2
    make_step(model, optimizer)(*DATA[0])  # trains plainly afterwards: nothing half-applied
    assert len(optimizer.variables) == 2 + 2 * len(model.trainable_variables)


def _slot_name(v):
    """An optimizer variable's path without the instance numbers Keras puts in the
    optimizer's and the model's names (adam_w_2/sequential_1_out_kernel_momentum)."""
    return re.sub(r"^sequential(_\d+)?_", "", v.path.split("/", 1)[1])


def _slots(optimizer):
    return {_slot_name(v): v for v in optimizer.variables}


def _recompiled_reference(reference, old_optimizer, make):
    """Keras's way to unfreeze: trainable=True and a fresh optimizer built over all
    trainable variables, carrying over the state (and step count) the old one had."""
    fresh = make()
    fresh.build(reference.trainable_variables)
    old = _slots(old_optimizer)
    for path, v in _slots(fresh).items():
        if path in old:
            v.assign(old[path])
    if fresh.use_ema:  # a new average starts at its variable, as on Keras's first step
        for var, average in zip(fresh._trainable_variables, fresh._model_variables_moving_average):
            if _slot_name(average) not in old:
                average.assign(var)
    return fresh


def test_new_rules_create_state_like_a_fresh_recompile():
    """New state is a fresh build's (zeros), except that a new EMA average starts at its
    variable, as Keras's first step sets it."""
    model, reference, optimizer, ref_optimizer = _pair(frozen=("hidden1", "hidden2"), use_ema=True)
    model.compile(optimizer=optimizer, loss="mse")
    reference.compile(optimizer=ref_optimizer, loss="mse")
    gf.keras.freeze(model, "hidden1/*", "hidden2/*")
    model.fit(X, Y, **FIT)
    reference.fit(X, Y, **FIT)
    assert state_bytes(optimizer) == state_bytes(ref_optimizer)

    gf.keras.freeze(model, "hidden2/*")  # hidden1 trains from now on
    reference.get_layer("hidden1").trainable = True
    fresh = _recompiled_reference(reference, ref_optimizer,
                                  lambda: keras.optimizers.AdamW(1e-2, use_ema=True))
    reference.compile(optimizer=fresh, loss="mse")
    before = snapshot(model.variables)
    model.fit(X, Y, **FIT)
    reference.fit(X, Y, **FIT)
    _check(model, reference, optimizer, fresh, before)
    mine = _slots(optimizer)
    for path, v in _slots(fresh).items():
        np.testing.assert_allclose(mine[path].numpy(), v.numpy(), atol=1e-5, err_msg=path)

    gf.keras.unfreeze(model)  # everything trains, through Keras's own train step
    reference.get_layer("hidden2").trainable = True
    fresh = _recompiled_reference(reference, fresh,
                                  lambda: keras.optimizers.AdamW(1e-2, use_ema=True))
    reference.compile(optimizer=fresh, loss="mse")
    assert list(_slots(optimizer)) == list(_slots(fresh))
    model.fit(X, Y, **FIT)
    reference.fit(X, Y, **FIT)
    for a, b in zip(model.variables, reference.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=1e-5, err_msg=a.path)


def test_gradual_unfreezing_creates_state_when_a_stage_starts():
    model, reference, optimizer, ref_optimizer = _pair(frozen=("hidden1", "hidden2"))
    model.compile(optimizer=optimizer, loss="mse")
    schedule = gf.keras.GradualUnfreezing({0: ["hidden1/*", "hidden2/*"], 1: ["hidden1/*"], 2: []})
    model.fit(X, Y, callbacks=[schedule], **{**FIT, "epochs": 3})

    reference.compile(optimizer=ref_optimizer, loss="mse")
    reference.fit(X, Y, **{**FIT, "epochs": 1})
    opt = ref_optimizer
    for layer in ("hidden2", "hidden1"):
        reference.get_layer(layer).trainable = True
        opt = _recompiled_reference(reference, opt, lambda: keras.optimizers.AdamW(1e-2))
        reference.compile(optimizer=opt, loss="mse")
        reference.fit(X, Y, **{**FIT, "epochs": 1})
    assert list(_slots(optimizer)) == list(_slots(opt))
    for a, b in zip(model.variables, reference.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=1e-5, err_msg=a.path)


def test_checkpoints_load_without_graphfreeze(tmp_path):
    model, reference, optimizer, ref_optimizer = _pair()
    model.compile(optimizer=optimizer, loss="mse")
    gf.keras.freeze(model, "hidden2/*")
    model.fit(X, Y, **FIT)

    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(str(tmp_path / "ckpt"))
    plain = mlp(SIZES, seed=3)  # built without graphfreeze, frozen by Keras alone
    plain.get_layer("hidden2").trainable = False
    plain_optimizer = keras.optimizers.AdamW(1e-2)
    plain_optimizer.build(plain.trainable_variables)
    tf.train.Checkpoint(model=plain, optimizer=plain_optimizer).restore(path).assert_consumed()
    for a, b in zip(model.variables, plain.variables):
        assert np.array_equal(a.numpy(), b.numpy()), a.path
    assert list(_slots(optimizer)) == list(_slots(plain_optimizer))
    for a, b in zip(optimizer.variables, plain_optimizer.variables):
        assert np.array_equal(a.numpy(), b.numpy()), a.path

    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    for a, b in zip(model.variables, loaded.variables):
        assert np.array_equal(a.numpy(), b.numpy()), a.path
    loaded.fit(X, Y, **FIT)  # trains everything, plain Keras
