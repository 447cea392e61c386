"""The pass contract: a pass reports whether it changed the program, and one that has
nothing to do reports no change and leaves every graph as it was."""

from __future__ import annotations

import copy

import keras
import numpy as np
from conftest import batches, make_step, snapshot

import graphfreeze as gf
from graphfreeze import passes


def _dense_bn_dense():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="d1"),
                             keras.layers.BatchNormalization(name="bn"),
                             keras.layers.Dense(3, name="out")])


def _state(program):
    """Everything a pass may edit, copied: per graph its nodes (op, NodeDef, order, dtypes,
    shapes) and its edges with their data."""
    return {ir.name: (sorted((n, copy.deepcopy(d)) for n, d in ir.graph.nodes(data=True)),
                      sorted((u, v, str(k), sorted(d.items()))
                             for u, v, k, d in ir.graph.edges(keys=True, data=True)))
            for ir in program.graphs()}


def test_a_pass_with_nothing_to_do_reports_no_change(monkeypatch):
    """Only a row of d1's kernel frozen: no fully frozen variable (prune_optimizer_state has
    no slot to prune), no gf.Scale, batchnorm_inference off although the model has a
    BatchNorm. Those passes report no change and the IR is the same before and after;
    mask_gradients (the control) reports a change and the IR differs."""
    seen = {}

    def recording(p):
        def run(program, plan):
            before = _state(program)
            result = p(program, plan)
            seen[p.__name__] = (result.changed, before == _state(result.program))
            return result
        run.__name__ = p.__name__
        return run

    monkeypatch.setattr(passes, "TRAINING_PIPELINE",
                        tuple(recording(p) for p in passes.TRAINING_PIPELINE))
    model = _dense_bn_dense()
    data = batches(3, (16, 6), (16, 3))
    kernel = model.get_layer("d1").kernel
    frozen_row, live_rows = kernel.numpy()[0].copy(), kernel.numpy()[1:].copy()
    others = {p: v for p, v in snapshot(model.trainable_variables).items() if p != kernel.path}
    rw = gf.rewrite(make_step(model, keras.optimizers.Adam(1e-2)), [gf.Rows("d1/kernel", [0])],
                    *data[0])
    for name in ("batchnorm_inference", "prune_optimizer_state", "scale_writes"):
        assert seen[name] == (False, True), (name, seen[name])
    assert seen["mask_gradients"] == (True, False)
    assert all(same for changed, same in seen.values() if not changed), seen

    # The rewrite still does its job: the frozen row bitwise unchanged, the rest trains.
    for x, y in data:
        rw(x, y)
    assert np.array_equal(kernel.numpy()[0], frozen_row)
    assert not np.array_equal(kernel.numpy()[1:], live_rows)
    after = snapshot(model.trainable_variables)
    assert all(not np.array_equal(after[p], v) for p, v in others.items())


def test_program_order_is_exact_and_topological():
    """Inserted nodes get exact (position, sequence) keys: sorting every rewritten graph by
    them is already a topological order, and no two nodes share a key."""
    model = _dense_bn_dense()
    data = batches(1, (16, 6), (16, 3))
    rw = gf.rewrite(make_step(model, keras.optimizers.Adam(1e-2)),
                    [gf.Rows("d1/kernel", [0]), "bn/*"], *data[0])
    for ir in rw.program.graphs():
        nodes = ir.graph.nodes
        keys = [nodes[n]["order"] for n in nodes]
        assert all(isinstance(k, tuple) and all(isinstance(i, int) for i in k) for k in keys)
        assert len(set(keys)) == len(keys)
        pos = {n: i for i, n in enumerate(sorted(nodes, key=lambda n: nodes[n]["order"]))}
        backwards = [(u, v) for u, v in ir.graph.edges() if pos[u] >= pos[v]]
        assert not backwards, backwards[:5]
