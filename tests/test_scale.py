"""gf.Scale (issue 15 item 1): learning-rate multipliers against the classic reference, one
optimizer per group with the scaled learning rate, written by hand in one custom step."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batches, make_step, mlp, snapshot, twin
from keras_versions import has_optimizer, optimizer_param

import graphfreeze as gf

SIZES = (6, 12, 10, 3)
DATA = batches(5, (16, 6), (16, 3))
LR = {"SGD": 0.05, "SGD_nesterov": 0.05, "Adam": 1e-2, "AdamW": 1e-2, "RMSprop": 1e-2,
      "Adagrad": 0.1, "Adadelta": 1.0, "Adamax": 1e-2, "Nadam": 1e-2, "Lion": 1e-3,
      "Lamb": 1e-2, "Adafactor": 1e-2, "Ftrl": 0.1, "Muon": 1e-2, "ScheduleFreeAdamW": 1e-2}
MAKE = {
    "SGD": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
    "SGD_nesterov": lambda lr: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
    "Adam": lambda lr: keras.optimizers.Adam(lr),
    "AdamW": lambda lr: keras.optimizers.AdamW(lr, weight_decay=0.05),
    "RMSprop": lambda lr: keras.optimizers.RMSprop(lr, momentum=0.5, centered=True),
    "Adagrad": lambda lr: keras.optimizers.Adagrad(lr),
    "Adadelta": lambda lr: keras.optimizers.Adadelta(lr),
    "Adamax": lambda lr: keras.optimizers.Adamax(lr),
    "Nadam": lambda lr: keras.optimizers.Nadam(lr),
    "Lion": lambda lr: keras.optimizers.Lion(lr),
    "Lamb": lambda lr: keras.optimizers.Lamb(lr),
    "Adafactor": lambda lr: keras.optimizers.Adafactor(lr),
    "Ftrl": lambda lr: keras.optimizers.Ftrl(lr, l1_regularization_strength=0.01),
    "Muon": lambda lr: keras.optimizers.Muon(lr),
    "ScheduleFreeAdamW": lambda lr: keras.optimizers.ScheduleFreeAdamW(lr),
}
# The update is linear in the learning rate: scaling it equals scaling the learning rate.
LINEAR = ["SGD", "SGD_nesterov", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax",
          "Nadam", "Lion", "Lamb", "Adafactor"]
# ... and each entry's update depends on that entry only (Lamb's trust ratio and
# Adafactor's RMS scaling are per variable, so a partly scaled variable is not a group).
ELEMENTWISE = ["SGD", "SGD_nesterov", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta",
               "Adamax", "Nadam", "Lion"]


def _model():
    return mlp(SIZES)


def _per_group_step(model, groups, name):
    """The reference: one optimizer per group (factor -> variables), learning rate scaled."""
    opts = {f: MAKE[name](LR[name] * f) for f in groups}
    loss_fn = keras.losses.MeanSquaredError()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        variables = [v for vs in groups.values() for v in vs]
        grads = tape.gradient(loss, variables)
        at = 0
        for f, vs in groups.items():
            opts[f].apply_gradients(zip(grads[at:at + len(vs)], vs))
            at += len(vs)
        return loss

    return step


def _assert_close(a, b, what):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"{what} differs from the "
                               "per-group reference")


@pytest.mark.parametrize("name", [optimizer_param(n) for n in LINEAR])
@pytest.mark.parametrize("factor", [0.25, 3.0])
def test_whole_layer_equals_one_optimizer_per_group(name, factor):
    model = _model()
    reference = twin(model, _model)
    step = gf.freeze(gf.Scale("hidden2/*", factor))(make_step(model, MAKE[name](LR[name])))
    h2 = {v.path for v in reference.get_layer("hidden2").trainable_variables}
    ref_step = _per_group_step(reference, {
        1.0: [v for v in reference.trainable_variables if v.path not in h2],
        factor: reference.get_layer("hidden2").trainable_variables}, name)
    for x, y in DATA:
        step(x, y)
        ref_step(x, y)
    for v, r in zip(model.trainable_variables, reference.trainable_variables):
        _assert_close(v.numpy(), r.numpy(), v.path)
    report = step.rewritten(*DATA[0]).report()
    assert {r.path: r.factor for r in report} == {
        "sequential/hidden2/kernel": f"{factor:g}", "sequential/hidden2/bias": f"{factor:g}"}
    assert "factor" in str(report)


class _SplitMLP(tf.Module):
    """The hand-split program: hidden2's kernel as three variables, rows [0, 4) trained by a
    slow optimizer, rows [4, 10) by the ordinary one, rows [10, 12) a constant."""

    def __init__(self, model):
        super().__init__()
        w = [v.numpy() for v in model.trainable_variables]
        self.w1, self.b1 = keras.Variable(w[0], name="w1"), keras.Variable(w[1], name="b1")
        self.k_slow, self.k_fast = keras.Variable(w[2][:4], name="ks"), keras.Variable(w[2][4:10], name="kf")
        self.k_frozen = tf.constant(w[2][10:])
        self.b2 = keras.Variable(w[3], name="b2")
        self.w3, self.b3 = keras.Variable(w[4], name="w3"), keras.Variable(w[5], name="b3")

    def __call__(self, x, training=None):
        h = tf.tanh(x @ self.w1 + self.b1)
        k = tf.concat([self.k_slow, self.k_fast, self.k_frozen], axis=0)
        return tf.tanh(h @ k + self.b2) @ self.w3 + self.b3


@pytest.mark.parametrize("name", [optimizer_param(n) for n in ELEMENTWISE])
def test_scaled_rows_equal_a_hand_split_program(name):
    model = _model()
    reference = _SplitMLP(model)
    rules = [gf.Scale(gf.Rows("hidden2/kernel", range(0, 4)), 0.1),
             gf.Rows("hidden2/kernel", [10, 11])]
    step = gf.freeze(*rules)(make_step(model, MAKE[name](LR[name])))
    ref_step = _per_group_step(reference, {
        1.0: [reference.w1, reference.b1, reference.k_fast, reference.b2, reference.w3, reference.b3],
        0.1: [reference.k_slow]}, name)
    before = model.get_layer("hidden2").kernel.numpy().copy()
    for x, y in DATA:
        step(x, y)
        ref_step(x, y)
    kernel = model.get_layer("hidden2").kernel.numpy()
    assert np.array_equal(kernel[10:], before[10:])  # S1: frozen rows bitwise unchanged
    _assert_close(kernel[:4], reference.k_slow.numpy(), "scaled rows")
    _assert_close(kernel[4:10], reference.k_fast.numpy(), "ordinary rows")
    for v, r in zip(model.trainable_variables[:2] + model.trainable_variables[3:],
                    [reference.w1, reference.b1, reference.b2, reference.w3, reference.b3]):
        _assert_close(v.numpy(), r.numpy(), v.path)
    row = {r.path: r for r in step.rewritten(*DATA[0]).report()}["sequential/hidden2/kernel"]
    assert (row.frozen, row.factor) == (20, "0.1..1")


@pytest.mark.parametrize("name", [optimizer_param(n) for n in ["Ftrl", "Muon", "ScheduleFreeAdamW",
                                                               "Lamb", "Adafactor"]])
def test_not_linear_optimizers_still_scale_each_write(name):
    """Where the per-group reference is not exact (Ftrl recomputes weights from its
    accumulators; Lamb/Adafactor scale by a per-variable norm), what holds: each write
    moves a scaled entry by factor times what the same step moves it unscaled."""
    model = _model()
    plain = twin(model, _model)
    rules = [gf.Scale(gf.Columns("hidden2/kernel", [0, 1, 2]), 0.3), gf.Scale("out/bias", 2.0)]
    step = gf.freeze(*rules)(make_step(model, MAKE[name](LR[name])))
    plain_step = tf.function(make_step(plain, MAKE[name](LR[name])))
    before = snapshot(model.trainable_variables)
    step(*DATA[0])
    plain_step(*DATA[0])
    moved = {v.path: v.numpy() - before[v.path] for v in model.trainable_variables}
    plain_moved = {v.path: w.numpy() - before[v.path]
                   for v, w in zip(model.trainable_variables, plain.trainable_variables)}
    k = "sequential/hidden2/kernel"
    _assert_close(moved[k][:, :3], 0.3 * plain_moved[k][:, :3], k)
    _assert_close(moved[k][:, 3:], plain_moved[k][:, 3:], k)
    _assert_close(moved["sequential/out/bias"], 2.0 * plain_moved["sequential/out/bias"], "out/bias")
    _assert_close(moved["sequential/hidden1/kernel"], plain_moved["sequential/hidden1/kernel"], "hidden1")


def _embedding_model():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(20, 4, name="emb"),
                             keras.layers.Flatten(), keras.layers.Dense(2, name="head")])


def test_sparse_rows_scale_equals_split_table():
    """Sparse (IndexedSlices) updates are scatters; plain SGD sums duplicates either way, so the
    hand-split table (slow rows, ordinary rows) is the exact reference."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 20, (8, 5)).astype("int32") for _ in range(4)]
    targets = [rng.normal(size=(8, 2)).astype("float32") for _ in range(4)]
    model = _embedding_model()
    table, kernel, bias = (v.numpy() for v in model.trainable_variables)
    slow, fast = keras.Variable(table[:6]), keras.Variable(table[6:])
    k, b = keras.Variable(kernel), keras.Variable(bias)

    class Split(tf.Module):
        def __call__(self, x, training=None):
            rows = tf.gather(tf.concat([slow, fast], 0), x)
            return tf.reshape(rows, (-1, 20)) @ k + b

    step = gf.freeze(gf.Scale(gf.Rows("emb/embeddings", range(6)), 0.2))(
        make_step(model, keras.optimizers.SGD(0.5)))
    opt, opt_slow = keras.optimizers.SGD(0.5), keras.optimizers.SGD(0.1)

    @tf.function
    def reference(x, y):
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y, Split()(x))
        g = tape.gradient(loss, [fast, k, b, slow])
        opt.apply_gradients(zip(g[:3], [fast, k, b]))
        opt_slow.apply_gradients([(g[3], slow)])

    for x, y in zip(ids, targets):
        step(x, y)
        reference(x, y)
    rw = step.rewritten(ids[0], targets[0])
    assert any("Scatter" in n for n in rw.plan.notes.scaled_writes), rw.plan.notes.scaled_writes
    after = model.get_layer("emb").embeddings.numpy()
    _assert_close(after[:6], slow.numpy(), "scaled rows")
    _assert_close(after[6:], fast.numpy(), "ordinary rows")
    _assert_close(model.get_layer("head").kernel.numpy(), k.numpy(), "head")


def test_under_jit_compile():
    model = _model()
    reference = twin(model, _model)
    step = gf.freeze(gf.Scale("hidden1/*", 0.5), gf.Scale("out/*", 2.0))(
        tf.function(make_step(model, keras.optimizers.Adam(1e-2)), jit_compile=True))
    assert step.rewritten(*DATA[0]).function._jit_compile is True
    ref_step = _per_group_step(reference, {
        1.0: reference.get_layer("hidden2").trainable_variables,
        0.5: reference.get_layer("hidden1").trainable_variables,
        2.0: reference.get_layer("out").trainable_variables}, "Adam")
    for x, y in DATA:
        step(x, y)
        ref_step(x, y)
    for v, r in zip(model.trainable_variables, reference.trainable_variables):
        _assert_close(v.numpy(), r.numpy(), v.path)


def test_fit_with_gf_keras_freeze():
    x = np.concatenate([d[0] for d in DATA])
    y = np.concatenate([d[1] for d in DATA])
    model = _model()
    reference = twin(model, _model)
    model.compile(optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.05), loss="mse")
    gf.keras.freeze(model, "hidden1/*", gf.Scale("hidden1/bias", 0.5), gf.Scale("out/*", 2.0))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    h1, out = reference.get_layer("hidden1"), reference.get_layer("out")
    ref_step = _per_group_step(reference, {
        1.0: reference.get_layer("hidden2").trainable_variables, 0.5: [h1.bias],
        2.0: out.trainable_variables}, "AdamW")
    for i in range(0, len(x), 16):
        ref_step(x[i:i + 16], y[i:i + 16])
    assert np.array_equal(model.get_layer("hidden1").kernel.numpy(), h1.kernel.numpy())  # frozen
    for v, r in zip(model.trainable_variables, reference.trainable_variables):
        _assert_close(v.numpy(), r.numpy(), v.path)


def test_rules_apply_in_order_entry_by_entry():
    model = _model()
    variables = gf.dryrun.variable_infos(model)
    from graphfreeze.rules import resolve
    from graphfreeze.scale import resolve_scales
    rules = ["*", gf.Scale("hidden2/*", 0.5), gf.Unfreeze(gf.Rows("hidden2/kernel", [0])),
             gf.Scale(gf.Columns("hidden2/kernel", [9]), 0)]
    freezes = resolve(rules, variables)
    scales = {vs.variable.path: vs for vs in resolve_scales(rules, variables, freezes)}
    frozen = {vf.variable.path: vf.frozen for vf in freezes}
    k = "sequential/hidden2/kernel"
    assert not frozen[k][:, :9].any() and frozen[k][:, 9].all()
    expected = np.full((12, 10), 0.5)
    expected[0] = 1.0
    expected[:, 9] = 0.0
    np.testing.assert_array_equal(scales[k].factor, expected)
    assert frozen["sequential/hidden1/kernel"].all() and "sequential/hidden1/kernel" not in scales
    # Scale(..., 1) after a freeze trains at the ordinary rate: nothing to scale
    assert resolve_scales(["*", gf.Scale("*", 1.0)], variables, resolve(["*", gf.Scale("*", 1.0)],
                                                                         variables)) == []


def test_factor_zero_is_freeze_bitwise():
    model = _model()
    other = twin(model, _model)
    reference = twin(model, _model)
    a = gf.freeze(gf.Scale("hidden2/*", 0))(make_step(model, keras.optimizers.AdamW(1e-2, weight_decay=0.1)))
    b = gf.freeze("hidden2/*")(make_step(other, keras.optimizers.AdamW(1e-2, weight_decay=0.1)))
    for x, y in DATA:
        a(x, y)
        b(x, y)
    for v, w in zip(model.variables, other.variables):
        assert np.array_equal(v.numpy(), w.numpy()), v.path
    # and both equal Keras's own answer: hidden2 trainable=False (between trainable layers)
    reference.get_layer("hidden2").trainable = False
    ref_step = tf.function(make_step(reference, keras.optimizers.AdamW(1e-2, weight_decay=0.1)))
    for x, y in DATA:
        ref_step(x, y)
    for v, r in zip(model.variables, reference.variables):
        if "/hidden2/" in v.path:
            assert np.array_equal(v.numpy(), r.numpy()), v.path  # S1: never moved
        else:
            np.testing.assert_allclose(v.numpy(), r.numpy(), rtol=1e-5, atol=1e-5, err_msg=v.path)


@pytest.mark.parametrize("factor", [-0.1, float("nan"), float("inf"), "0.1", None, True, [0.5]])
def test_bad_factor_is_a_rule_error_naming_the_rule(factor):
    with pytest.raises(gf.RuleError, match=r"Scale\('hidden2/\*'"):
        gf.Scale("hidden2/*", factor)


def test_scale_of_scale_or_unfreeze_is_refused():
    with pytest.raises(gf.RuleError, match="not another Scale or Unfreeze"):
        gf.Scale(gf.Unfreeze("hidden2/*"), 0.5)
    with pytest.raises(gf.RuleError, match="no variable"):
        gf.rewrite(make_step(_model(), keras.optimizers.SGD(0.1)), [gf.Scale("nothing/*", 0.5)], *DATA[0])


@pytest.mark.skipif(not has_optimizer("Lamb"), reason="keras.optimizers.Lamb is missing")
def test_report_lists_scaled_variables_with_their_factor():
    model = _model()
    rw = gf.rewrite(make_step(model, keras.optimizers.Adam(1e-2)),
                    ["hidden1/*", gf.Scale(gf.Rows("hidden2/kernel", [1, 2]), 0.1)], *DATA[0])
    rows = {r.path: r for r in rw.report()}
    assert rows["sequential/hidden1/kernel"].factor == "-"
    assert rows["sequential/hidden2/kernel"].frozen == 0
    assert rows["sequential/hidden2/kernel"].factor == "0.1..1"
    assert rw.report().to_dict()["variables"][-1]["factor"] == "0.1..1"


def test_save_trainable_counts_scaled_entries_as_trainable(tmp_path):
    model = _model()
    path = tmp_path / "head.npz"
    gf.save_trainable(path, model, "*", gf.Scale("out/*", 0.1), gf.Scale("hidden2/bias", 0))
    saved = snapshot(model.weights)
    for v in model.get_layer("out").weights:
        v.assign(v + 1.0)
    gf.load_trainable(path, model)  # the file holds exactly the layer that trains
    assert all(np.array_equal(v.numpy(), saved[v.path]) for v in model.weights)


def test_gradual_unfreezing_tells_rule_sets_apart_by_their_factors():
    x = np.concatenate([d[0] for d in DATA])
    y = np.concatenate([d[1] for d in DATA])
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    schedule = gf.keras.GradualUnfreezing({0: [gf.Scale("hidden1/*", 0.5)],
                                           1: [gf.Scale("hidden1/*", 0.0625)],
                                           2: [gf.Scale(model.get_layer("hidden1"), 0.5)]})
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=[schedule])
    assert len(schedule.steps) == 2  # 0.5 twice (spelled two ways) is one rule set
    factors = [{r.path: r.factor for r in step.latest.report()} for step in schedule.steps]
    assert [f["sequential/hidden1/kernel"] for f in factors] == ["0.5", "0.0625"]


def test_frozen_inf_entry_of_a_scaled_variable_stays_bitwise():
    """S7: frozen entries are selected, never multiplied: an inf row (never looked up) of a
    table whose other rows train at half rate under AdamW's weight decay stays inf."""
    model = _embedding_model()
    table = model.get_layer("emb").embeddings
    table.assign(tf.tensor_scatter_nd_update(table, [[19]], [[np.inf] * 4]))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 19, (8, 5)).astype("int32")
    step = gf.freeze(gf.Scale("emb/embeddings", 0.5), gf.Rows("emb/embeddings", [19]))(
        make_step(model, keras.optimizers.AdamW(1e-2, weight_decay=0.1)))
    before = table.numpy().copy()
    for _ in range(3):
        step(ids, rng.normal(size=(8, 2)).astype("float32"))
    after = table.numpy()
    assert np.array_equal(after[19], before[19]) and np.isinf(after[19]).all()
    assert np.isfinite(after[:19]).all() and not np.array_equal(after[:19], before[:19])


def test_fused_apply_kernel_without_an_elementwise_form_is_refused_by_name():
    """Fused kernels graphfreeze writes out elementwise are scaled (tests/test_fused_partial.py);
    Ftrl is not written out."""
    v = tf.Variable(np.ones(3, np.float32), name="w")
    accum, linear = tf.Variable(np.ones(3, np.float32)), tf.Variable(np.zeros(3, np.float32))

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(v * x)
        tf.raw_ops.ResourceApplyFtrl(var=v.handle, accum=accum.handle, linear=linear.handle,
                                     grad=tape.gradient(loss, v), lr=0.1, l1=0.0, l2=0.0,
                                     lr_power=-0.5)
        return loss

    with pytest.raises(gf.UnsupportedGraphError, match="ResourceApplyFtrl.*'w'.*gf.Scale"):
        gf.rewrite(step, [gf.Scale("w", 0.5)], tf.ones(3))


def test_mirrored_strategy_scales_every_replica():
    from conftest import mirrored

    strategy = mirrored()
    with strategy.scope():
        model, reference = _model(), _model()
        reference.set_weights(model.get_weights())
        optimizer = keras.optimizers.AdamW(1e-2, weight_decay=0.05)
        optimizer.build(model.trainable_variables)
        h2 = reference.get_layer("hidden2").trainable_variables
        rest = [v for v in reference.trainable_variables if all(v is not w for w in h2)]
        slow, plain = keras.optimizers.AdamW(0.25e-2, weight_decay=0.05), \
            keras.optimizers.AdamW(1e-2, weight_decay=0.05)
        slow.build(h2)
        plain.build(rest)
    step = make_step(model, optimizer)

    def ref_replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y, reference(x, training=True))
        grads = tape.gradient(loss, rest + h2)
        plain.apply_gradients(zip(grads[:len(rest)], rest))
        slow.apply_gradients(zip(grads[len(rest):], h2))
        return loss

    @tf.function
    def dist_step(x, y):
        return strategy.reduce("SUM", strategy.run(step, args=(x, y)), axis=None)

    @tf.function
    def ref_step(x, y):
        return strategy.reduce("SUM", strategy.run(ref_replica_step, args=(x, y)), axis=None)

    rw = gf.rewrite(dist_step, [gf.Scale("hidden2/*", 0.25)], *DATA[0])
    for x, y in DATA:
        rw(x, y)
        ref_step(x, y)
    for v, r in zip(model.trainable_variables, reference.trainable_variables):
        parts = list(getattr(v, "_value", v).values)
        assert len(parts) == 2
        for p in parts:
            _assert_close(p.numpy(), r.numpy(), v.path)
    assert len(rw.report().rows) == 2  # one row per variable, not per replica
