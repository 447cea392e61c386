"""S1-S4 for whole-variable freezing of training steps (issue 2)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import OPTIMIZERS, assert_close_models, batches, make_step, mlp, snapshot, twin

import graphfreeze as gf

FROZEN = ("hidden1", "hidden2")
DATA = batches(12, (16, 6), (16, 3))


def _frozen_vars(model):
    return [v for v in model.variables if v.path.split("/")[1] in FROZEN]


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_s1_frozen_variables_bitwise_unchanged(opt_name):
    model = mlp()
    optimizer = OPTIMIZERS[opt_name]()
    step = make_step(model, optimizer)
    # Train everything first, so momentum and moments are non-zero when freezing starts.
    plain = tf.function(step)
    for x, y in DATA[:3]:
        plain(x, y)
    before = snapshot(_frozen_vars(model))
    slots_before = snapshot(optimizer.variables)
    rw = gf.rewrite(step, ["hidden1/*", "hidden2/*"], *DATA[0])
    trained_before = snapshot(model.get_layer("out").variables)
    for x, y in DATA:
        rw(x, y)
    for path, value in snapshot(_frozen_vars(model)).items():
        assert np.array_equal(value, before[path]), f"{path} moved under {opt_name}"
    # S4: the frozen variables' optimizer state is paused, not decayed.
    for path, value in snapshot(optimizer.variables).items():
        if any(f"_{name}_" in path for name in FROZEN):
            assert np.array_equal(value, slots_before[path]), f"slot {path} was touched"
    moved = [not np.array_equal(v, trained_before[p])
             for p, v in snapshot(model.get_layer("out").variables).items()]
    assert all(moved), "the trainable head did not train"


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_s2_equals_keras_trainable_false(opt_name):
    model = mlp()
    reference = twin(model, mlp)
    for name in FROZEN:
        reference.get_layer(name).trainable = False
    rw = gf.rewrite(make_step(model, OPTIMIZERS[opt_name]()), list(f"{n}/*" for n in FROZEN),
                    *DATA[0])
    ref_step = tf.function(make_step(reference, OPTIMIZERS[opt_name]()))
    for x, y in DATA:
        loss = rw(x, y)
        ref_loss = ref_step(x, y)
        np.testing.assert_allclose(loss.numpy(), ref_loss.numpy(), rtol=1e-5, atol=1e-6)
    assert_close_models(model, reference)


def _writes(graph):
    from graphfreeze import opkinds
    return [n for n, op in graph.nodes(data="op") if opkinds.is_write(op)]


def _write_target(graph, node):
    for src, _, data in graph.in_edges(node, data=True):
        if not data["control"] and data["dst_input"] == 0:
            return src
    return None


def test_s3_s4_frozen_work_is_gone():
    model = mlp()
    optimizer = keras.optimizers.AdamW(1e-2, weight_decay=0.05)
    # Built before freezing, so the frozen variables have slots whose writes must go (an
    # unbuilt optimizer gets none for them: tests/test_optimizer_memory.py).
    optimizer.build(model.trainable_variables)
    rw = gf.rewrite(make_step(model, optimizer), ["hidden1/*", "hidden2/*"], *DATA[0])

    reference = twin(model, mlp)
    for name in FROZEN:
        reference.get_layer(name).trainable = False
    ref_graph = tf.function(make_step(reference, keras.optimizers.AdamW(1e-2, weight_decay=0.05))) \
        .get_concrete_function(*DATA[0]).graph

    assert rw.graph.number_of_nodes() < rw.original_graph.number_of_nodes()
    # Whole-variable freezing does no more work than Keras trainable=False.
    assert rw.graph.number_of_nodes() <= len(ref_graph.get_operations())

    # No write to a frozen variable or to one of its optimizer slots survives.
    frozen_ph = {vf.variable.placeholder for vf in rw.plan.freezes}
    by_ph = rw.plan.capture.variable_by_placeholder
    slot_ph = {p for p, v in by_ph.items() if v.path in rw.report().pruned_state}
    assert len(slot_ph) == 8  # m and v of 4 frozen variables
    for node in _writes(rw.graph):
        assert _write_target(rw.graph, node) not in frozen_ph | slot_ph, node

    # No op whose only use is a frozen gradient: the zero gradients inserted for frozen
    # variables had no other use than their slots, so nothing of them is left, and no
    # backward op of a frozen layer survives.
    assert not [n for n, d in rw.graph.nodes(data=True) if d.get("inserted")]
    backward = [n for n in rw.graph if n.startswith("gradient_tape/") and
                any(f"/{name}" in n for name in FROZEN)]
    assert backward == []
    # Every surviving op feeds an output or a side effect.
    from graphfreeze import opkinds
    roots = {n for n, op in rw.graph.nodes(data="op")
             if opkinds.has_side_effect(op) or op == "Placeholder"}
    roots |= {t.rpartition(":")[0] for t in rw.plan.capture.output_tensors}
    live = set(roots)
    for r in roots:
        live |= {a for a in _data_ancestors(rw.graph, r)}
    assert set(rw.graph.nodes) == live


def _data_ancestors(graph, node):
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for src, _, data in graph.in_edges(n, data=True):
            if not data["control"] and src not in seen:
                seen.add(src)
                stack.append(src)
    return seen


def test_layer_and_variable_rules_and_unfreeze():
    model = mlp()
    step = make_step(model, keras.optimizers.SGD(0.1))
    h1, h2 = model.get_layer("hidden1"), model.get_layer("hidden2")
    rw = gf.rewrite(step, [h1, h2.kernel, "out/*", gf.Unfreeze("out/bias")], *DATA[0])
    frozen = rw.report().frozen
    assert set(frozen) == {h1.kernel.path, h1.bias.path, h2.kernel.path, model.get_layer("out").kernel.path}
    assert frozen[h1.kernel.path] == 6 * 12
    before = snapshot(model.variables)
    for x, y in DATA[:3]:
        rw(x, y)
    after = snapshot(model.variables)
    for path in frozen:
        assert np.array_equal(after[path], before[path])
    for path in (h2.bias.path, model.get_layer("out").bias.path):
        assert not np.array_equal(after[path], before[path])


def test_report_lists_frozen_variables_and_rules():
    model = mlp()
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)  # slots for hidden1 exist, to be pruned
    rw = gf.rewrite(make_step(model, optimizer), ["hidden1/*"], *DATA[0])
    rep = rw.report()
    assert rep.frozen == {"sequential/hidden1/kernel": 72, "sequential/hidden1/bias": 12}
    text = str(rep)
    for row in rep.rows:
        assert row.path in text and f"{row.frozen}/{row.total}" in text
        assert row.rules == ("'hidden1/*'",)
    assert "pruned" in text


def test_glob_freezes_batchnorm_statistics_as_model_state():
    """Moving statistics are model state: '*' matches them (they are not optimizer state,
    even though their updates depend on activations of trainable layers)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="d1"),
                              keras.layers.BatchNormalization(name="bn"),
                              keras.layers.Dense(3, name="out")])
    step = make_step(model, keras.optimizers.Adam(1e-2))
    rw = gf.rewrite(step, ["*", gf.Unfreeze("out/*")], *DATA[0])
    bn = model.get_layer("bn")
    assert {bn.moving_mean.path, bn.moving_variance.path} <= set(rw.report().frozen)
    before = snapshot(bn.variables)
    for x, y in DATA[:3]:
        rw(x, y)
    assert all(np.array_equal(v, before[p]) for p, v in snapshot(bn.variables).items())


def test_rules_leave_dropout_rng_state_alone():
    """A layer rule or '*' must not freeze a SeedGenerator: dropout would replay one mask."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="d1"),
                              keras.layers.Dropout(0.5, name="drop"), keras.layers.Dense(3, name="out")])
    step = make_step(model, keras.optimizers.SGD(0.1))
    with pytest.raises(gf.RuleError, match="names no weights or statistics"):
        gf.rewrite(step, [model.get_layer("drop")], *DATA[0])
    rw = gf.rewrite(step, ["*", gf.Unfreeze("out/*")], *DATA[0])
    assert not any("seed_generator" in p for p in rw.report().frozen)
    seed = next(v for v in model.variables if "seed_generator_state" in v.path)
    before = seed.numpy().copy()
    rw(*DATA[0])
    assert not np.array_equal(seed.numpy(), before), "the dropout seed must keep advancing"
