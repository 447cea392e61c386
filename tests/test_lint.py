"""The IR verifier (graphfreeze.passes.verify) that the suite runs after every pass: each
check fires on a program broken the way a buggy pass would break it, naming the pass."""

from __future__ import annotations

import contextlib
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batches, make_step, mlp

import graphfreeze as gf
from graphfreeze import passes
from graphfreeze.ir import LintError

DATA = batches(1, (8, 6), (8, 3))


@contextlib.contextmanager
def raises_lint(pattern):
    """A LintError matching `pattern`, raised as such or (past the rewrite's outermost
    stage, which turns unexpected errors into UnsupportedGraphError) as its original."""
    with pytest.raises((LintError, gf.UnsupportedGraphError)) as info:
        yield
    error = info.value if isinstance(info.value, LintError) else getattr(info.value, "original", None)
    assert isinstance(error, LintError), info.value
    assert re.search(pattern, str(error)), str(error)


def _rewrite_with(monkeypatch, bad_pass, rules=("hidden1/*",), before="eliminate_dead_code",
                  sizes=(6, 12, 10, 3)):
    """Rewrite an MLP step with `bad_pass` inserted before the pass named `before`."""
    pipeline = list(passes.TRAINING_PIPELINE)
    at = [p.__name__ for p in pipeline].index(before)
    monkeypatch.setattr(passes, "TRAINING_PIPELINE", tuple(pipeline[:at] + [bad_pass] + pipeline[at:]))
    model = mlp(sizes)
    x, y = DATA[0]
    return gf.rewrite(make_step(model, keras.optimizers.Adam(1e-2)), list(rules), x,
                      np.resize(y, (len(x), sizes[-1])))


def test_clean_rewrite_passes_lint():
    model = mlp((6, 12, 10, 3))
    rw = gf.rewrite(make_step(model, keras.optimizers.Adam(1e-2)),
                    ["hidden1/*", gf.Mask("hidden2/kernel", np.eye(12, 10, dtype=bool))],
                    *DATA[0])
    passes.lint(rw.program, rw.plan, after="test", markers_stripped=True)


def _cut_first_matmul_input(ir):
    """Remove the edge into input 0 of the first MatMul; returns the MatMul's name."""
    node = next(n for n, op in ir.graph.nodes(data="op") if op == "MatMul")
    src, _, key, _ = next(e for e in ir.graph.in_edges(node, keys=True, data=True)
                          if not e[3]["control"] and e[3]["dst_input"] == 0)
    ir.graph.remove_edge(src, node, key)
    return node


def test_dangling_input_names_the_pass(monkeypatch):
    def dangling(program, plan):
        node = _cut_first_matmul_input(program.main)
        program.main.graph.add_edge("nowhere", node, 0, src_output=0, dst_input=0, control=False)
        return passes.PassResult(program, changed=True)
    with raises_lint(r"after pass 'dangling': dangling input.*'nowhere'"):
        _rewrite_with(monkeypatch, dangling)


def test_renamed_nodedef(monkeypatch):
    def renamed(program, plan):
        node = next(n for n, op in program.main.graph.nodes(data="op") if op == "MatMul")
        with program.main.edit(node) as nd:
            nd.name = "other"
        return passes.PassResult(program, changed=True)
    with raises_lint(r"after pass 'renamed'.*carries the NodeDef of 'other'"):
        _rewrite_with(monkeypatch, renamed)


def test_gap_in_inputs(monkeypatch):
    def gap(program, plan):
        _cut_first_matmul_input(program.main)
        return passes.PassResult(program, changed=True)
    with raises_lint(r"after pass 'gap'.*numbered \[1\]"):
        _rewrite_with(monkeypatch, gap)


def test_marker_left_after_strip(monkeypatch):
    def keep_markers(program, plan):
        return passes.PassResult(program, changed=False)
    monkeypatch.setattr(passes, "strip_markers", keep_markers)
    pipeline = [keep_markers if p.__name__ == "strip_markers" else p for p in passes.TRAINING_PIPELINE]
    monkeypatch.setattr(passes, "TRAINING_PIPELINE", tuple(pipeline))
    model = mlp((6, 12, 10, 3))
    with raises_lint("after pass 'keep_markers'.*marker"):
        gf.rewrite(make_step(model, keras.optimizers.Adam(1e-2)), ["hidden1/*"], *DATA[0])


def test_pass_reporting_no_change_must_not_edit(monkeypatch):
    """The runner lints only after passes that changed something, so it holds a pass that
    says it did nothing to that (an unused constant is otherwise a valid edit)."""
    def sneaky(program, plan):
        program.main.add_const("graphfreeze/unused", np.zeros(()), tf.float32, inserted_by="x")
        return passes.PassResult(program, changed=False)
    with raises_lint(r"after pass 'sneaky': it reported no change but edited"):
        _rewrite_with(monkeypatch, sneaky)


def test_mask_of_wrong_shape(monkeypatch):
    def wrong_mask(program, plan):
        ir = program.main
        t = ir.add_const("graphfreeze/frozen/bad", np.zeros((5,), bool), tf.bool, inserted_by="x")
        ir.const_cache[("frozen", plan.freezes[0].variable.path)] = t
        return passes.PassResult(program, changed=True)
    with raises_lint(r"after pass 'wrong_mask'.*\(5,\) does not broadcast"):
        _rewrite_with(monkeypatch, wrong_mask, rules=[gf.Rows("hidden1/kernel", [0])],
                      before="mask_gradients")


def test_stale_dependence_names_the_pass(monkeypatch):
    """A pass that feeds a frozen variable's gradient into a live optimizer slot's update
    would make the analysis prune_optimizer_state relies on wrong."""
    def leak(program, plan):
        ir = program.main
        frozen = {vf.variable.placeholder for vf in plan.freezes}
        marker = next(m for g, m, v in plan.sites if v.placeholder in frozen and not m.sparse)
        live = next(m for g, m, v in plan.sites if v.placeholder not in frozen and not m.sparse
                    and ir.shape((m.values, 0)) == ir.shape((marker.values, 0)))
        for dst, k in ir.consumers((live.values, 0)):
            if ir.op(dst) != "IdentityN":
                ir.set_input(dst, k, (marker.values, 0))
        return passes.PassResult(program, changed=True)
    with raises_lint(r"after pass 'leak': the dependence analysis went stale"):
        _rewrite_with(monkeypatch, leak, rules=["hidden2/kernel"], before="guard_writes",
                      sizes=(6, 10, 10, 10))
