"""Gradual unfreezing in fit (issue 15, item 3): gf.keras.GradualUnfreezing.

The reference is Keras itself, done the way a careful user does it without graphfreeze:
one `fit` call per epoch, with the frozen layers set `trainable=False` and the model
recompiled before each call, all with ONE optimizer object. Keras 3 optimizers refuse
variables they were not built with ("Unknown variable"), so the reference optimizer is
built once over every weight before the first compile; each phase then applies gradients
to the trainable subset only, which leaves the other variables' slots untouched and
advances the shared iteration count once per step. That is exactly what freezing as a
pause promises (DESIGN S4), so the reference keeps optimizer state across phases the same
way and the two must agree epoch by epoch.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import mlp, snapshot, twin

import graphfreeze as gf
from graphfreeze import api

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 6)).astype("float32")
Y = RNG.normal(size=(64, 3)).astype("float32")
LAYERS = ["hidden1", "hidden2", "hidden3", "out"]
# hidden1 (below) and out (above) always train; the middle is frozen, thawed, frozen again.
# Epoch 3 spells epoch 0's rule set differently; it freezes the same entries, so it reuses
# epoch 0's rewrite.
SCHEDULE = {0: ["hidden2/*", "hidden3/*"], 1: ["hidden3/*"], 2: [],
            3: ["*", gf.Unfreeze("hidden1/*"), gf.Unfreeze("out/*")]}
FROZEN_AT = [{"hidden2", "hidden3"}, {"hidden3"}, set(), {"hidden2", "hidden3"}]
# (compile options, fit options) of the graphfreeze run; the reference runs without XLA
# and validation (neither changes the training arithmetic beyond rounding), which keeps its
# four recompiles cheap.
CONFIGS = {
    "plain": ({}, {}),
    "validation_spe2_xla": ({"steps_per_execution": 2, "jit_compile": True},
                            # two batches: Keras 3.3's evaluate returns no logs when it has
                            # fewer batches than steps_per_execution (upstream, README)
                            {"validation_data": (X[:32], Y[:32])}),
}


def _optimizer():
    return keras.optimizers.AdamW(1e-2, weight_decay=0.1)


def _weights_by_layer(model):
    return {name: [np.array(w) for w in model.get_layer(name).get_weights()] for name in LAYERS}


@pytest.fixture
def rewrites(monkeypatch):
    """Counts the rewrites graphfreeze performs (each trace + pass pipeline)."""
    calls = []
    original = api.rewrite

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(api, "rewrite", counting)
    return calls


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_schedule_equals_recompiled_trainable_false_epoch_by_epoch(config, rewrites):
    compile_kw, fit_kw = CONFIGS[config]
    ref_fit_kw = {"batch_size": 16, "shuffle": False, "verbose": 0}
    fit_kw = {**ref_fit_kw, **fit_kw}
    model = mlp()
    reference = twin(model, mlp)

    model.compile(optimizer=_optimizer(), loss="mse", metrics=["mae"], **compile_kw)
    schedule = gf.keras.GradualUnfreezing(SCHEDULE)
    epochs = [_weights_by_layer(model)]
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: epochs.append(_weights_by_layer(model)))
    history = model.fit(X, Y, epochs=4, callbacks=[schedule, record], **fit_kw)

    optimizer = _optimizer()
    optimizer.build(reference.trainable_variables)  # every weight, before any phase
    ref_epochs, ref_loss = [], []
    for epoch, frozen in enumerate(FROZEN_AT):
        for layer in reference.layers:
            layer.trainable = layer.name not in frozen
        reference.compile(optimizer=optimizer, loss="mse", metrics=["mae"],
                          steps_per_execution=compile_kw.get("steps_per_execution", 1))
        h = reference.fit(X, Y, initial_epoch=epoch, epochs=epoch + 1, **ref_fit_kw)
        ref_epochs.append(_weights_by_layer(reference))
        ref_loss += h.history["loss"]

    for epoch, frozen in enumerate(FROZEN_AT):
        before, after = epochs[epoch], epochs[epoch + 1]
        for name in LAYERS:
            unchanged = all(np.array_equal(a, b) for a, b in zip(before[name], after[name]))
            assert unchanged == (name in frozen), (epoch, name)  # S1, and the rest trains
            for got, want in zip(after[name], ref_epochs[epoch][name]):  # S2
                np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"epoch {epoch} {name}")
    np.testing.assert_allclose(history.history["loss"], ref_loss, rtol=1e-5)
    if "validation_data" in fit_kw:
        assert len(history.history["val_loss"]) == 4
    assert model.optimizer.iterations.numpy() == optimizer.iterations.numpy()
    # Two distinct rule sets froze something; each was rewritten once (epoch 3 reused
    # epoch 0's), and the unfrozen epoch ran Keras's own step.
    assert len(rewrites) == 2
    assert [step.cache_size for step in schedule.steps] == [1, 1]


def test_callback_reused_across_fits_and_recompile(rewrites):
    model = mlp()
    model.compile(optimizer=_optimizer(), loss="mse")
    schedule = gf.keras.GradualUnfreezing({0: ["hidden2/*"], 1: [], 2: ["hidden2/*"]})
    fit = {"batch_size": 16, "shuffle": False, "verbose": 0, "callbacks": [schedule]}
    model.fit(X, Y, epochs=2, **fit)
    model.fit(X, Y, initial_epoch=2, epochs=3, **fit)  # same model, same compile: reused
    assert len(rewrites) == 1
    model.compile(optimizer=_optimizer(), loss="mse")  # new optimizer: new train functions
    hidden2 = snapshot(model.get_layer("hidden2").variables)
    model.fit(X, Y, epochs=1, **fit)
    assert len(rewrites) == 2
    assert all(np.array_equal(v, hidden2[p])
               for p, v in snapshot(model.get_layer("hidden2").variables).items())


def test_fit_after_schedule_trains_with_the_models_own_rules():
    model = mlp()
    model.compile(optimizer=_optimizer(), loss="mse")
    gf.keras.freeze(model, "hidden1/*")
    fit = {"batch_size": 16, "verbose": 0}
    before = snapshot(model.get_layer("hidden1").variables)
    model.fit(X, Y, epochs=1, callbacks=[gf.keras.GradualUnfreezing({0: []})], **fit)
    during = snapshot(model.get_layer("hidden1").variables)
    assert all(not np.array_equal(during[p], before[p]) for p in before)  # the schedule ruled
    model.fit(X, Y, epochs=1, **fit)
    after = snapshot(model.get_layer("hidden1").variables)
    assert all(np.array_equal(after[p], during[p]) for p in during)  # the model's rules again


def test_top_down_from_a_number_of_groups():
    model = mlp()
    schedule = gf.keras.GradualUnfreezing.top_down(model, 3, every=2)
    layers = [model.get_layer(n) for n in LAYERS]
    # 4 layers with weights in 3 groups: [hidden1, hidden2], [hidden3], [out].
    assert [r.target for r in schedule.rules_at(0)] == layers[:3]
    assert [r.target for r in schedule.rules_at(1)] == layers[:3]
    assert [r.target for r in schedule.rules_at(2)] == layers[:2]
    assert schedule.rules_at(4) == [] and schedule.rules_at(9) == []

    model.compile(optimizer=_optimizer(), loss="mse")
    epochs = [_weights_by_layer(model)]
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: epochs.append(_weights_by_layer(model)))
    model.fit(X, Y, epochs=5, batch_size=32, verbose=0, callbacks=[schedule, record])
    for epoch, trains_from in enumerate([3, 3, 2, 2, 0]):
        for i, name in enumerate(LAYERS):
            changed = any(not np.array_equal(a, b)
                          for a, b in zip(epochs[epoch][name], epochs[epoch + 1][name]))
            assert changed == (i >= trains_from), (epoch, name)


def test_top_down_from_listed_groups_and_nested_models():
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="b1"),
                                 keras.layers.Dense(8, name="b2")], name="backbone")
    model = keras.Sequential([keras.Input((6,)), backbone, keras.layers.Dense(3, name="head")])
    assert gf.keras.GradualUnfreezing.top_down(model, 3).rules_at(0)[0].target is \
        backbone.get_layer("b1")
    listed = gf.keras.GradualUnfreezing.top_down(model, ["b1/*", ["b2/*", "head/*"]])
    assert [r.target for r in listed.rules_at(0)] == ["b1/*"]
    assert listed.rules_at(1) == []


@pytest.mark.parametrize("schedule, message", [
    ({}, "non-empty mapping"),
    ({1: ["hidden1/*"]}, "starts at epoch 1"),
    ({0: [], -1: []}, "schedule key -1"),
    ({0: [], "2": []}, "schedule key '2'"),
    ({0: [3.5]}, "schedule[0]"),
])
def test_bad_schedules(schedule, message):
    with pytest.raises(gf.RuleError, match=message.replace("[", r"\[")):
        gf.keras.GradualUnfreezing(schedule)


def test_rule_matching_nothing_fails_before_the_first_batch():
    model = mlp()
    model.compile(optimizer=_optimizer(), loss="mse")
    before = snapshot(model.variables)
    schedule = gf.keras.GradualUnfreezing({0: ["hidden1/*"], 2: ["hiden2/*"]})
    with pytest.raises(gf.RuleError, match="epoch 2.*'hiden2/\\*'.*hidden2"):
        model.fit(X, Y, epochs=3, verbose=0, callbacks=[schedule])
    assert all(np.array_equal(v, before[p]) for p, v in snapshot(model.variables).items())


@pytest.mark.parametrize("groups, every, message", [
    (5, 1, "between 1 and 4 groups"),
    (0, 1, "between 1 and 4 groups"),
    ([], 1, "non-empty list"),
    (["hidden1/*", []], 1, r"groups\[1\] is empty"),
    (2, 0, "every=0"),
])
def test_bad_top_down(groups, every, message):
    with pytest.raises(gf.RuleError, match=message):
        gf.keras.GradualUnfreezing.top_down(mlp(), groups, every=every)
