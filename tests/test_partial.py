"""Partial freezing: rows, columns and single entries (issue 3)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_models, batches, make_step, mlp
from references import MaskedEmbedding, entry_stop_gradients, keep_of, masked_mlp

import graphfreeze as gf

SIZES = (6, 12, 10, 3)
DATA = batches(10, (16, 6), (16, 3))

S1_OPTIMIZERS = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw_decay": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1),
    "lion_decay": lambda: keras.optimizers.Lion(1e-3, weight_decay=0.1),
    "rmsprop_momentum": lambda: keras.optimizers.RMSprop(1e-2, momentum=0.9),
    "adagrad": lambda: keras.optimizers.Adagrad(0.1),
}
# S2 compares with the seed-002 forward mask, under which decoupled decay would move
# frozen entries; the reference optimizers therefore have no weight decay.
S2_OPTIMIZERS = {k: v for k, v in S1_OPTIMIZERS.items() if "decay" not in k}
S2_OPTIMIZERS["lion"] = lambda: keras.optimizers.Lion(1e-3)


def frozen_at(shape, index, value=True):
    """A boolean array of `shape`, `value` at `index` and the opposite elsewhere."""
    mask = np.full(shape, not value)
    mask[index] = value
    return mask


def _masks(kind: str, rng: np.random.Generator):
    """Frozen masks for hidden1/kernel [6,12], hidden2/kernel [12,10], out/bias [3]."""
    if kind == "rows":
        k1, k2 = frozen_at((6, 12), [0, 2, 5]), frozen_at((12, 10), slice(0, 7))
        rules = [gf.Rows("hidden1/kernel", [0, 2, 5]), gf.Rows("hidden2/kernel", range(7))]
    elif kind == "columns":
        k1, k2 = frozen_at((6, 12), (slice(None), slice(3, 9))), frozen_at((12, 10), (slice(None), [1, 4]))
        rules = [gf.Columns("hidden1/kernel", slice(3, 9)),
                 gf.Columns("hidden2/kernel", np.array([1, 4]))]
    else:
        k1 = rng.random((6, 12)) < 0.4
        k2 = rng.random((12, 10)) < 0.6
        rules = [gf.Mask("hidden1/kernel", k1), gf.Mask("hidden2/kernel", k2)]
    b = np.array([True, False, False])
    return {"hidden1/kernel": k1, "hidden2/kernel": k2, "out/bias": b}, rules + [gf.Rows("out/bias", [0])]


def _entries(model, masks):
    return {path: model.get_layer(path.split("/")[0]).__getattribute__(path.split("/")[1]).numpy()
            for path in masks}


@pytest.mark.parametrize("kind", ["rows", "columns", "random"])
@pytest.mark.parametrize("opt_name", sorted(S1_OPTIMIZERS))
def test_s1_frozen_entries_bitwise_unchanged(opt_name, kind):
    model = mlp(SIZES)
    optimizer = S1_OPTIMIZERS[opt_name]()
    step = make_step(model, optimizer)
    plain = tf.function(step)
    for x, y in DATA[:3]:  # momentum and moments built up before freezing
        plain(x, y)
    masks, rules = _masks(kind, np.random.default_rng(7))
    before = _entries(model, masks)
    rw = gf.rewrite(step, rules, *DATA[0])
    for x, y in DATA:
        rw(x, y)
    after = _entries(model, masks)
    for path, frozen in masks.items():
        assert np.array_equal(after[path][frozen], before[path][frozen]), f"{path} frozen entries moved"
        assert not np.array_equal(after[path][~frozen], before[path][~frozen]), f"{path} did not train"


@pytest.mark.parametrize("kind", ["rows", "columns", "random"])
@pytest.mark.parametrize("opt_name", sorted(S2_OPTIMIZERS))
def test_s2_equals_seed002_mask_reference(opt_name, kind):
    masks, rules = _masks(kind, np.random.default_rng(11))
    model = mlp(SIZES)
    keeps = {"hidden1": (keep_of(masks["hidden1/kernel"]), None),
             "hidden2": (keep_of(masks["hidden2/kernel"]), None),
             "out": (None, keep_of(masks["out/bias"]))}
    reference = masked_mlp(SIZES, keeps)
    reference.set_weights(model.get_weights())
    rw = gf.rewrite(make_step(model, S2_OPTIMIZERS[opt_name]()), rules, *DATA[0])
    ref_step = tf.function(make_step(reference, S2_OPTIMIZERS[opt_name]()))
    for x, y in DATA:
        rw(x, y)
        ref_step(x, y)
    assert_close_models(model, reference)


def _embedding_model(vocab=20, dim=4, seed=0, layer=keras.layers.Embedding, **kw):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,), dtype="int32"), layer(vocab, dim, name="emb", **kw),
                             keras.layers.Flatten(), keras.layers.Dense(2, name="out")])


EMB_DATA = [(np.random.default_rng(i).integers(0, 20, (8, 5)).astype("int32"),
             np.random.default_rng(100 + i).normal(size=(8, 2)).astype("float32")) for i in range(8)]
DOMAIN_WORDS = [0, 3, 4, 11, 19]


@pytest.mark.parametrize("opt_name", ["sgd", "sgd_momentum", "adam", "adagrad"])
def test_embedding_rows_sparse(opt_name):
    make_opt = {"sgd": lambda: keras.optimizers.SGD(0.1), **S2_OPTIMIZERS}[opt_name]
    model = _embedding_model()
    frozen = frozen_at((20, 4), DOMAIN_WORDS)
    reference = _embedding_model(layer=MaskedEmbedding, keep=keep_of(frozen))
    reference.set_weights(model.get_weights())
    rw = gf.rewrite(make_step(model, make_opt()), [gf.Rows("emb/embeddings", DOMAIN_WORDS)],
                    *EMB_DATA[0])
    ref_step = tf.function(make_step(reference, make_opt()))
    before = model.get_layer("emb").embeddings.numpy().copy()
    for x, y in EMB_DATA:
        rw(x, y)
        ref_step(x, y)
    after = model.get_layer("emb").embeddings.numpy()
    assert np.array_equal(after[DOMAIN_WORDS], before[DOMAIN_WORDS])
    assert_close_models(model, reference)
    # never densified: the sparse values are masked by the row mask gathered with the
    # slice indices; no inserted op has the embedding table's shape.
    inserted = {n: d for n, d in rw.graph.nodes(data=True) if d.get("inserted") == "mask_gradients"}
    assert any(d["op"] == "GatherV2" for d in inserted.values())
    assert not any(d["shapes"] and d["shapes"][0] == (20, 4) for d in inserted.values())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_masks_are_dtype_correct(dtype):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,), dtype=dtype),
                              keras.layers.Dense(8, name="d1", dtype=dtype),
                              keras.layers.Dense(3, name="out", dtype=dtype)])
    assert model.get_layer("d1").kernel.dtype == dtype
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    step = make_step(model, optimizer, loss_fn=lambda y, p: tf.reduce_mean(tf.square(
        tf.cast(p, "float32") - y)))
    rw = gf.rewrite(step, [gf.Columns("d1/kernel", [0, 1, 2]), gf.Rows("out/kernel", [7])],
                    *[(x.astype(dtype), y) for x, y in DATA[:1]][0])
    # the updates of both variables and their momenta run on the trainable entries
    # (slice_updates): scatters or strided-slice assignments of the variables' dtype at
    # int32 indices, so no mask constant is left, and no inserted constant has a float
    # type other than `dtype`
    nodes = dict(rw.graph.nodes(data=True))
    sliced = rw.plan.notes.sliced_writes
    assert len(sliced) == 4 and not rw.plan.notes.unsliced
    for n in sliced:
        attr = "dtype" if nodes[n]["op"] in ("ResourceScatterUpdate", "ResourceScatterAdd",
                                              "ResourceScatterSub") else "T"
        assert tf.as_dtype(rw.ir.nodedef(n).attr[attr].type).name == dtype
    consts = {n: tf.as_dtype(d["dtypes"][0]) for n, d in nodes.items()
              if d.get("inserted") and d["op"] == "Const"}
    assert not any("graphfreeze/frozen/" in n for n in consts)
    assert all(t.name == dtype or t.is_integer or t == tf.bool for t in consts.values()), consts
    before = model.get_layer("d1").kernel.numpy().copy(), model.get_layer("out").kernel.numpy().copy()
    for x, y in DATA[:5]:
        rw(x.astype(dtype), y)
    k1, k2 = model.get_layer("d1").kernel.numpy(), model.get_layer("out").kernel.numpy()
    assert np.array_equal(k1[:, :3], before[0][:, :3]) and not np.array_equal(k1[:, 3:], before[0][:, 3:])
    assert np.array_equal(k2[7], before[1][7]) and not np.array_equal(k2[:7], before[1][:7])


def test_rules_combine_in_order_entry_by_entry():
    model = mlp(SIZES)
    rw = gf.rewrite(make_step(model, keras.optimizers.SGD(0.1)),
                    ["hidden1/*", gf.Unfreeze(gf.Columns("hidden1/kernel", [0, 1])),
                     gf.Rows("hidden1/kernel", [5]), gf.Unfreeze("hidden1/bias")], *DATA[0])
    expected = frozen_at((6, 12), (slice(None), slice(0, 2)), value=False)
    expected[5] = True
    vf = next(vf for vf in rw.plan.freezes if vf.variable.path.endswith("hidden1/kernel"))
    np.testing.assert_array_equal(vf.frozen, expected)
    rep = rw.report()
    assert rep.frozen == {"sequential/hidden1/kernel": int(expected.sum())}
    assert rep.rows[0].rules == ("'hidden1/*'", "Unfreeze(Columns('hidden1/kernel', [0, 1]))",
                                 "Rows('hidden1/kernel', [5])")


# ------------------------------------------------------------------ forward mode


def test_forward_mode_gradients():
    model = mlp(SIZES)
    x = DATA[0][0]
    frozen_cols = [2, 5, 7]

    def forward(inputs):
        return model(inputs)

    rw = gf.rewrite(forward, ["hidden2/*", gf.Columns("hidden1/kernel", frozen_cols)], x)
    assert not rw.training
    # outputs unchanged: the masked read keep*x + stop_gradient(frozen*x) is x bitwise
    np.testing.assert_array_equal(rw(x).numpy(), tf.function(forward)(x).numpy())
    h1k, h2k = model.get_layer("hidden1").kernel, model.get_layer("hidden2").kernel
    h1b = model.get_layer("hidden1").bias
    with tf.GradientTape(persistent=True) as tape:
        ours = tf.reduce_sum(rw(x) ** 2)
        plain = tf.reduce_sum(forward(x) ** 2)
    g_ours = tape.gradient(ours, [h1k, h1b, h2k])
    g_plain = tape.gradient(plain, [h1k, h1b, h2k])
    keep = frozen_at((6, 12), (slice(None), frozen_cols), value=False)
    np.testing.assert_array_equal(g_ours[0].numpy()[~keep], 0.0)
    np.testing.assert_allclose(g_ours[0].numpy()[keep], g_plain[0].numpy()[keep], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_ours[1].numpy(), g_plain[1].numpy(), rtol=1e-5, atol=1e-6)
    assert g_ours[2] is None or not np.any(g_ours[2].numpy())
    assert any(d["op"] == "StopGradient" for _, d in rw.graph.nodes(data=True))


def test_forward_mode_embedding_stays_sparse():
    model = _embedding_model()
    x = EMB_DATA[0][0]
    rw = gf.rewrite(lambda ids: model(ids), [gf.Rows("emb/embeddings", DOMAIN_WORDS)], x)
    emb = model.get_layer("emb").embeddings
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(rw(x) ** 2)
    grad = tape.gradient(loss, emb)
    assert isinstance(grad, tf.IndexedSlices)
    dense = tf.convert_to_tensor(grad).numpy()
    assert not dense[DOMAIN_WORDS].any()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x) ** 2)
    plain = tf.convert_to_tensor(tape.gradient(loss, emb)).numpy()
    rest = [i for i in range(20) if i not in DOMAIN_WORDS]
    np.testing.assert_allclose(dense[rest], plain[rest], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("rule, fragments", [
    (lambda: gf.Mask("hidden1/kernel", np.zeros((6, 11), bool)), ["hidden1/kernel", "[6, 12]", "[6, 11]"]),
    (lambda: gf.Rows("hidden1/kernel", [2, 6]), ["hidden1/kernel", "[6, 12]", "index 6", "out of range"]),
    (lambda: gf.Columns("hidden1/kernel", [-1]), ["hidden1/kernel", "[6, 12]", "negative index -1"]),
    (lambda: gf.Rows("hidden1/kernel", [1, 3, 1]), ["hidden1/kernel", "[6, 12]", "duplicate index 1"]),
    (lambda: gf.Mask("hidden1/kernel", np.zeros((6, 12))), ["hidden1/kernel", "[6, 12]", "float64"]),
])
def test_bad_partial_rules(rule, fragments):
    model = mlp(SIZES)
    step = make_step(model, keras.optimizers.SGD(0.1))
    with pytest.raises(gf.FreezeError) as e:
        gf.rewrite(step, [rule()], *DATA[0])
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))


def test_partial_rule_on_scalar():
    scale = tf.Variable(2.0, name="scale")
    w = tf.Variable(tf.ones([3]), name="w")
    opt = keras.optimizers.SGD(0.1)

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(scale * w * x)
        grads = tape.gradient(loss, [scale, w])
        opt.apply_gradients(zip(grads, [scale, w]))
        return loss

    with pytest.raises(gf.FreezeError, match=r"'scale' \(shape \[\]\).*scalar"):
        gf.rewrite(step, [gf.Rows("scale", [0])], tf.ones([3]))


# ------------------------------------------------------------------ masks select (S7)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_inf_gradient_at_frozen_entry_dense(opt_name):
    """sqrt(v - 1) at v = 1 has an infinite gradient; multiplied by a 0/1 mask it is NaN.
    Selected, the frozen entry keeps its value bitwise and the rest trains as under the
    seed-002 mask (whose own frozen entry goes NaN: it stops gradients by multiplying)."""
    make = {"sgd": lambda: keras.optimizers.SGD(0.1), "adam": lambda: keras.optimizers.Adam(0.1)}[opt_name]
    v = tf.Variable([1.0, 2.0, 3.0], name="v")
    ref = tf.Variable(v.numpy(), name="v_ref")
    frozen = np.array([True, False, False])

    def step_for(var, opt, keep=None):
        def step(x):
            with tf.GradientTape() as tape:
                w = var if keep is None else entry_stop_gradients(var, tf.constant(keep))
                loss = tf.reduce_sum(tf.sqrt(w - 1.0) * x)
            opt.apply_gradients([(tape.gradient(loss, var), var)])
            return loss
        return step

    x = tf.constant([1.0, 1.0, 2.0])
    rw = gf.rewrite(step_for(v, make()), [gf.Mask("v", frozen)], x)
    ref_step = tf.function(step_for(ref, make(), keep_of(frozen)))
    for _ in range(3):
        rw(x)
        ref_step(x)
    assert v.numpy()[0] == 1.0 and np.isnan(ref.numpy()[0])
    np.testing.assert_allclose(v.numpy()[1:], ref.numpy()[1:], rtol=1e-6)
    assert not np.array_equal(v.numpy()[1:], [2.0, 3.0])


def test_inf_gradient_at_frozen_row_sparse():
    """The same through an IndexedSlices gradient (an embedding lookup): the frozen row's
    infinite slice values are selected away; the other rows get exactly the unfrozen
    step's update."""
    table = tf.Variable(np.array([[2.0, 3.0], [1.0, 1.0], [4.0, 2.0], [3.0, 5.0]], "float32"),
                        name="table")
    plain = tf.Variable(table.numpy(), name="table_plain")
    ids = tf.constant([0, 1, 2, 1, 0])
    opt, plain_opt = keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.1)

    def step_for(var, optimizer):
        def step(i):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.sqrt(tf.gather(var, i) - 1.0))
            grad = tape.gradient(loss, var)
            assert isinstance(grad, tf.IndexedSlices)
            optimizer.apply_gradients([(grad, var)])
            return loss
        return step

    rw = gf.rewrite(step_for(table, opt), [gf.Rows("table", [1])], ids)
    plain_step = tf.function(step_for(plain, plain_opt))
    rw(ids)
    plain_step(ids)
    after = table.numpy()
    assert np.array_equal(after[1], [1.0, 1.0])
    assert not np.isfinite(plain.numpy()[1]).any()  # what an unguarded step does to that row
    np.testing.assert_allclose(after[[0, 2, 3]], plain.numpy()[[0, 2, 3]], rtol=1e-6)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_inf_nan_written_to_frozen_entries(bad):
    """assign_add / assign_sub / assign of deltas with inf or NaN at frozen entries: the
    frozen entries stay bitwise, the others get exactly the written value."""
    v = tf.Variable(np.arange(6, dtype="float32").reshape(2, 3), name="acc")
    frozen = np.array([[True, False, False], [False, True, False]])

    def write(d):
        v.assign_add(d)
        v.assign_sub(d * 0.5)
        v.assign(v * 2.0 + d)
        return v.read_value()

    delta = np.where(frozen, bad, 0.25).astype("float32")
    rw = gf.rewrite(write, [gf.Mask("acc", frozen)], delta)
    before = v.numpy().copy()
    out = rw(delta).numpy()
    expected = (before + 0.25 - 0.125) * 2.0 + 0.25
    np.testing.assert_array_equal(v.numpy()[frozen], before[frozen])
    np.testing.assert_allclose(v.numpy()[~frozen], expected[~frozen], rtol=1e-6)
    np.testing.assert_array_equal(out, v.numpy())


def test_forward_mode_select_keeps_inf_and_zero_gradient():
    """Forward mode: where(frozen, stop_gradient(x), x) is x bitwise, inf included (the
    seed-002 form keep * x + stop_gradient(frozen * x) makes 0 * inf = NaN), and the
    frozen entry's gradient is exactly zero even where the upstream gradient is inf."""
    v = tf.Variable([np.inf, 5.0, 1.0], name="fwd")
    table = tf.Variable(np.array([[np.inf, 1.0], [2.0, 3.0], [1.0, 4.0]], "float32"), name="fwd_table")

    def forward(ids):
        return tf.sqrt(v - 1.0), tf.sqrt(tf.gather(table, ids) - 1.0)

    ids = tf.constant([0, 2, 1])
    rw = gf.rewrite(forward, [gf.Mask("fwd", [True, False, True]), gf.Rows("fwd_table", [0, 2])], ids)
    assert not rw.training
    ours, plain = rw(ids), tf.function(forward)(ids)
    for a, b in zip(ours, plain):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with tf.GradientTape(persistent=True) as tape:
        a, b = rw(ids)
        loss = tf.reduce_sum(a) + tf.reduce_sum(b)
        p, q = forward(ids)
        plain_loss = tf.reduce_sum(p) + tf.reduce_sum(q)
    gv, gt = tape.gradient(loss, [v, table])
    pv, pt = tape.gradient(plain_loss, [v, table])
    np.testing.assert_array_equal(gv.numpy(), [0.0, pv.numpy()[1], 0.0])
    assert isinstance(gt, tf.IndexedSlices)
    dense, plain_dense = tf.convert_to_tensor(gt).numpy(), tf.convert_to_tensor(pt).numpy()
    np.testing.assert_array_equal(dense[[0, 2]], 0.0)
    np.testing.assert_allclose(dense[1], plain_dense[1], rtol=1e-6)
    assert not np.isfinite(plain_dense[[0, 2]]).all()


# ------------------------------------------------------------------ stored once, as bits


@pytest.fixture
def pack_small_masks(monkeypatch):
    """Store every mask of 8+ entries as bits, so the packed path runs on small models."""
    from graphfreeze.passes import masks
    monkeypatch.setattr(masks, "PACK_AT", 8)


def test_packed_mask_dense_equals_seed002(pack_small_masks):
    rng = np.random.default_rng(3)
    sizes = (6, 16, 10, 3)
    k1 = rng.random((6, 16)) < 0.5
    model = mlp(sizes)
    reference = masked_mlp(sizes, {"hidden1": (keep_of(k1), None)})
    reference.set_weights(model.get_weights())
    rw = gf.rewrite(make_step(model, keras.optimizers.Adam(1e-2)),
                    [gf.Mask("hidden1/kernel", k1)], *DATA[0])
    ref_step = tf.function(make_step(reference, keras.optimizers.Adam(1e-2)))
    consts = [d for n, d in rw.graph.nodes(data=True) if n.startswith("graphfreeze/frozen/")]
    assert len(consts) == 1 and consts[0]["shapes"][0] == (6, 2)  # 16 columns in 2 bytes
    for x, y in DATA:
        rw(x, y)
        ref_step(x, y)
    assert_close_models(model, reference)


def test_packed_mask_sparse_rows_and_forward(pack_small_masks):
    rng = np.random.default_rng(4)
    frozen = rng.random((20, 8)) < 0.5
    model = _embedding_model(dim=8)
    reference = _embedding_model(dim=8, layer=MaskedEmbedding, keep=keep_of(frozen))
    reference.set_weights(model.get_weights())
    emb = model.get_layer("emb").embeddings
    before = emb.numpy().copy()
    rw = gf.rewrite(make_step(model, keras.optimizers.SGD(0.1)), [gf.Mask("emb/embeddings", frozen)],
                    *EMB_DATA[0])
    ref_step = tf.function(make_step(reference, keras.optimizers.SGD(0.1)))
    for x, y in EMB_DATA:
        rw(x, y)
        ref_step(x, y)
    assert np.array_equal(emb.numpy()[frozen], before[frozen])
    assert_close_models(model, reference)
    # forward mode over the same packed mask: gathered rows, unpacked after the gather
    fwd = gf.rewrite(lambda ids: model(ids), [gf.Mask("emb/embeddings", frozen)], EMB_DATA[0][0])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(fwd(EMB_DATA[0][0]) ** 2)
    grad = tf.convert_to_tensor(tape.gradient(loss, emb)).numpy()
    assert not grad[frozen].any() and grad[~frozen].any()


def test_packed_mask_scatter_nd(pack_small_masks):
    grid = tf.Variable(np.arange(32, dtype="float32").reshape(4, 8), name="packed_grid")
    frozen = np.random.default_rng(5).random((4, 8)) < 0.5
    indices = tf.constant([[r, c] for r in range(4) for c in range(8)])
    updates = tf.constant(np.full(32, 100.0, "float32"))

    def write(u):
        tf.raw_ops.ResourceScatterNdAdd(ref=grid.handle, indices=indices, updates=u)
        return grid.read_value()

    before = grid.numpy().copy()
    rw = gf.rewrite(write, [gf.Mask("packed_grid", frozen)], updates)
    np.testing.assert_array_equal(rw(updates).numpy(), np.where(frozen, before, before + 100.0))


@pytest.mark.slow
def test_large_random_mask_rewrites_and_runs():
    """A random Mask over a 1,050,000 x 256 table (268.8M entries; the two float32 copies
    earlier versions stored would be 2.15 GB, past protobuf's 2 GB GraphDef limit): one
    packed constant of 33.6 MB, and a step that keeps every frozen entry."""
    rows, dim = 1_050_000, 256
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,), dtype="int32"),
                              keras.layers.Embedding(rows, dim, name="emb",
                                                     embeddings_initializer="zeros"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1, name="head")])
    bits = np.random.default_rng(0).integers(0, 256, size=rows * dim // 8, dtype=np.uint8)
    frozen = np.unpackbits(bits).view(bool).reshape(rows, dim)
    rng = np.random.default_rng(1)
    x = rng.integers(0, rows, size=(32, 16)).astype("int32")
    y = rng.normal(size=(32, 1)).astype("float32")
    rw = gf.rewrite(make_step(model, keras.optimizers.SGD(0.5)), [gf.Mask("emb/embeddings", frozen)],
                    x, y)
    consts = [n for n in rw.graph_def.node if n.name.startswith("graphfreeze/frozen/")]
    assert len(consts) == 1 and consts[0].ByteSize() < rows * dim // 8 + 2**16
    assert rw.graph_def.ByteSize() < 2**31
    table = model.get_layer("emb").embeddings
    touched = np.unique(x)
    before = table.numpy()[touched]
    rw(x, y)
    after = table.numpy()[touched]
    mask = frozen[touched]
    assert np.array_equal(after[mask], before[mask])
    assert (after[~mask] != before[~mask]).mean() > 0.99


def test_packed_masks_compile_with_xla(pack_small_masks):
    """The unpacking ops are in INSERTED_OPS (GPU and XLA kernels) and compile to HLO."""
    from graphfreeze.passes.build import INSERTED_OPS
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(20, 8, name="emb"),
                              keras.layers.Flatten(), keras.layers.Dense(16, name="out")])
    rng = np.random.default_rng(6)
    args = (rng.integers(0, 20, (8, 5)).astype("int32"), rng.normal(size=(8, 16)).astype("float32"))
    rules = [gf.Mask("emb/embeddings", rng.random((20, 8)) < 0.5),
             gf.Mask("out/kernel", rng.random((40, 16)) < 0.5)]
    step = tf.function(make_step(model, keras.optimizers.AdamW(1e-2, weight_decay=0.1)), jit_compile=True)
    rw = gf.rewrite(step, rules, *args)
    flat, _ = rw._capture.canonical_args(args, {})
    assert "HloModule" in rw.function.experimental_get_compiler_ir(*flat)(stage="hlo")
    before = [model.get_layer("emb").embeddings.numpy(), model.get_layer("out").kernel.numpy()]
    rw(*args)
    after = [model.get_layer("emb").embeddings.numpy(), model.get_layer("out").kernel.numpy()]
    for rule, b, a in zip(rules, before, after):
        assert np.array_equal(a[rule.mask], b[rule.mask]) and not np.array_equal(a, b)
    inserted = {d["op"] for _, d in rw.graph.nodes(data=True)
                if d.get("inserted") and not d.get("cloned")}  # clones: slice_updates
    assert {"BitwiseAnd", "NotEqual"} <= inserted <= INSERTED_OPS, inserted - INSERTED_OPS


def test_packed_columns_mask_on_sparse_rows(pack_small_masks):
    """A Columns mask is the same for every row (compact [1, 8], packed into one byte): the
    mask rows of a sparse update must still be unpacked to bools, not used as bytes."""
    frozen = np.zeros((20, 8), bool)
    frozen[:, [0, 2, 5]] = True
    model = _embedding_model(dim=8)
    reference = _embedding_model(dim=8, layer=MaskedEmbedding, keep=keep_of(frozen))
    reference.set_weights(model.get_weights())
    emb = model.get_layer("emb").embeddings
    before = emb.numpy().copy()
    rw = gf.rewrite(make_step(model, keras.optimizers.SGD(0.1)),
                    [gf.Columns("emb/embeddings", [0, 2, 5])], *EMB_DATA[0])
    consts = [d for n, d in rw.graph.nodes(data=True) if n.startswith("graphfreeze/frozen/")]
    assert consts and consts[0]["shapes"][0] == (1, 1)  # 8 columns in one byte
    ref_step = tf.function(make_step(reference, keras.optimizers.SGD(0.1)))
    for x, y in EMB_DATA:
        rw(x, y)
        ref_step(x, y)
    assert np.array_equal(emb.numpy()[frozen], before[frozen])
    assert not np.array_equal(emb.numpy()[~frozen], before[~frozen])
    assert_close_models(model, reference)
