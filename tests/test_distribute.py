"""tf.distribute and XLA (issue 9): S1 on every replica, S2 against Keras trainable=False
under the same strategy, Keras fit, a strategy mismatch, XLA compilation, devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_models, batches, make_step, mirrored, mlp
from keras_versions import ALL_REDUCE, ALL_REDUCE_IN_KERAS

import graphfreeze as gf
from graphfreeze.passes.build import INSERTED_OPS

DATA = batches(4, (8, 6), (8, 3))


def _strategies():
    return {"mirrored": mirrored, "one_device": lambda: tf.distribute.OneDeviceStrategy("/cpu:1")}


def _build(strategy, frozen_by_keras=False):
    with strategy.scope():
        model = mlp()
        if frozen_by_keras:
            model.get_layer("hidden1").trainable = False
            model.get_layer("hidden2").trainable = False
        optimizer = keras.optimizers.AdamW(1e-2, weight_decay=0.05)
        optimizer.build(model.trainable_variables)
    return model, optimizer


def _distributed_step(strategy, model, optimizer):
    step = make_step(model, optimizer)

    @tf.function
    def dist_step(x, y):
        return strategy.reduce("SUM", strategy.run(step, args=(x, y)), axis=None)

    return dist_step


def _components(variable):
    value = getattr(variable, "_value", variable)
    return list(value.values) if isinstance(value, tf.distribute.DistributedValues) else [value]


@pytest.mark.parametrize("name", ["mirrored", "one_device"])
def test_custom_loop_under_strategy(name):
    strategy = _strategies()[name]()
    model, optimizer = _build(strategy)
    reference, ref_optimizer = _build(strategy, frozen_by_keras=True)
    rw = gf.rewrite(_distributed_step(strategy, model, optimizer), ["hidden1/*", "hidden2/*"], *DATA[0])
    ref_step = _distributed_step(strategy, reference, ref_optimizer)
    frozen = model.get_layer("hidden1").variables + model.get_layer("hidden2").variables
    before = [[c.numpy().copy() for c in _components(v)] for v in frozen]
    for x, y in DATA:
        np.testing.assert_allclose(rw(x, y).numpy(), ref_step(x, y).numpy(), rtol=1e-5)
    for v, b in zip(frozen, before):  # S1 on every replica
        assert all(np.array_equal(c.numpy(), old) for c, old in zip(_components(v), b))
    for v in model.variables:  # replicas stay in sync
        parts = _components(v)
        assert all(np.array_equal(parts[0].numpy(), p.numpy()) for p in parts[1:])
    assert_close_models(model, reference)  # S2 against the same strategy
    rep = rw.report()
    assert len(rep.rows) == 4  # one row per variable, not per replica
    assert len(rep.pruned_state) == 8  # AdamW's moments of the 4 frozen variables, all replicas


def _fit_under_mirrored(rules):
    strategy = mirrored()
    x, y = np.concatenate([d[0] for d in DATA]), np.concatenate([d[1] for d in DATA])
    with strategy.scope():
        model = mlp()
        reference = mlp()
        reference.set_weights(model.get_weights())
        reference.get_layer("hidden1").trainable = False
        # steps_per_execution stays 1: with more, Keras 3.15 / TF 2.21 fail under
        # MirroredStrategy even without graphfreeze (keras-team/keras#19246).
        for m in (model, reference):
            m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    gf.keras.freeze(model, *rules)
    return model, reference, (x, y)


def test_keras_fit_under_mirrored_strategy():
    model, reference, (x, y) = _fit_under_mirrored(["hidden1/*"])
    kernel = model.get_layer("hidden1").kernel
    before = [c.numpy().copy() for c in _components(kernel)]
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    reference.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert all(np.array_equal(c.numpy(), b) for c, b in zip(_components(kernel), before))  # S1
    assert_close_models(model, reference)  # S2 against the same strategy


def test_keras_fit_under_mirrored_strategy_partial():
    model, _, (x, y) = _fit_under_mirrored([gf.Columns("out/kernel", [0])])
    out = model.get_layer("out").kernel
    before = [c.numpy().copy() for c in _components(out)]
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for c, b in zip(_components(out), before):  # S1 on every replica; the rest trains
        assert np.array_equal(c.numpy()[:, 0], b[:, 0]) and not np.array_equal(c.numpy(), b)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_mirrored_strategy(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    script = os.path.join(os.path.dirname(__file__), "mwms_worker.py")
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker",
                                                                                 "index": index}}),
                   TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, script, str(tmp_path / f"w{index}.json")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out.decode()[-3000:]
    results = [json.load(open(tmp_path / f"w{i}.json")) for i in range(2)]
    for r in results:
        assert r["frozen_unchanged"]  # S1 on both workers
        for a, b in zip(r["weights"], r["reference"]):  # S2 against the same strategy
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)
        assert len(r["pruned"]) == 4
    if ALL_REDUCE_IN_KERAS:  # the workers agree (older Keras trains each on its own shard)
        for a, b in zip(results[0]["weights"], results[1]["weights"]):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6)


def test_step_rewritten_under_one_strategy_called_under_another():
    strategy = mirrored()
    model, optimizer = _build(strategy)
    rw = gf.rewrite(_distributed_step(strategy, model, optimizer), ["hidden1/*"], *DATA[0])
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        with pytest.raises(gf.FreezeError, match="rewritten under MirroredStrategy but is called "
                                                 "under OneDeviceStrategy"):
            rw(*DATA[0])
    rw(*DATA[0])  # outside any scope it runs


def test_devices_preserved_and_inserted_nodes_colocated():
    strategy = mirrored()
    model, optimizer = _build(strategy)
    rw = gf.rewrite(_distributed_step(strategy, model, optimizer),
                    ["hidden1/*", gf.Rows("out/kernel", [0, 2])], *DATA[0])
    original, new = rw.original_graph, rw.graph
    kept = [n for n in new if n in original]
    assert sum(1 for n in kept if new.nodes[n]["nodedef"].device.endswith("CPU:1")) > 20
    for n in kept:
        assert new.nodes[n]["nodedef"].device == original.nodes[n]["nodedef"].device, n
    inserted = {n for n, d in new.nodes(data=True) if d.get("inserted")}
    assert inserted
    for n in inserted:  # on the device of the traced ops it connects to (through other inserted ops)
        neighbours, pending, seen = set(), [n], {n}
        while pending:
            for m in (*new.predecessors(pending[-1]), *new.successors(pending.pop())):
                if m in inserted and m not in seen:
                    seen.add(m)
                    pending.append(m)
                elif m not in inserted:
                    neighbours.add(new.nodes[m]["nodedef"].device)
        assert new.nodes[n]["nodedef"].device in neighbours, n
    imported = {nd.name: nd.device for nd in rw.graph_def.node}
    assert all(imported[n] == new.nodes[n]["nodedef"].device for n in kept if n in imported)


def _jit_step(model, optimizer):
    return tf.function(make_step(model, optimizer), jit_compile=True)


@pytest.mark.parametrize("rules", ["whole", "partial", "sparse"])
def test_xla_compiles_rewritten_steps(rules):
    if rules == "sparse":
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(20, 4, name="emb"),
                                  keras.layers.Flatten(), keras.layers.Dense(3, name="out")])
        args = (np.random.default_rng(0).integers(0, 20, (8, 5)).astype("int32"), DATA[0][1])
        rule_list = [gf.Rows("emb/embeddings", [1, 4])]
    else:
        model, args = mlp(), DATA[0]
        rule_list = ["hidden1/*"] if rules == "whole" else \
            [gf.Columns("hidden1/kernel", [0, 3]), gf.Mask("out/bias", np.array([True, False, True]))]
    rw = gf.rewrite(_jit_step(model, keras.optimizers.AdamW(1e-2, weight_decay=0.1)), rule_list, *args)
    assert rw.function._jit_compile is True
    flat, _ = rw._capture.canonical_args(args, {})
    hlo = rw.function.experimental_get_compiler_ir(*flat)(stage="hlo")
    assert "HloModule" in hlo
    rw(*args)
    inserted = {d["op"] for _, d in rw.graph.nodes(data=True)
                if d.get("inserted") and not d.get("cloned")}  # clones: slice_updates
    assert inserted <= INSERTED_OPS, inserted - INSERTED_OPS
    assert inserted or rules == "whole"  # whole variables leave no inserted op behind


def test_xla_forward_mode():
    model = mlp()
    x = DATA[0][0]
    fn = tf.function(lambda inputs: model(inputs), jit_compile=True)
    rw = gf.rewrite(fn, ["hidden1/*", gf.Columns("out/kernel", [1])], x)
    flat, _ = rw._capture.canonical_args((x,), {})
    assert "HloModule" in rw.function.experimental_get_compiler_ir(*flat)(stage="hlo")
    np.testing.assert_allclose(rw(x).numpy(), fn(x).numpy(), rtol=1e-6)


@ALL_REDUCE
def test_frozen_gradients_leave_the_packed_all_reduce():
    """tf.distribute all-reduces the concatenation of all gradients; the frozen variables'
    zeros are taken out of it, so replicas exchange only trainable gradients."""
    strategy = mirrored()
    model, optimizer = _build(strategy)
    rw = gf.rewrite(_distributed_step(strategy, model, optimizer), ["hidden1/*", "hidden2/*"], *DATA[0])
    trainable = sum(int(np.prod(v.shape)) for name in ("hidden3", "out")
                    for v in model.get_layer(name).trainable_variables)
    graph = rw.graph
    reduces = [n for n, op in graph.nodes(data="op") if op == "CollectiveReduceV2"]
    assert reduces
    for n in reduces:
        packed = next(src for src, _, d in graph.in_edges(n, data=True) if d["dst_input"] == 0)
        assert graph.nodes[packed]["shapes"][0] == (trainable,)
