"""Partial freezing: rows, columns and single entries (issue 3)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_models, batches, make_step, mlp
from references import MaskedEmbedding, keep_of, masked_mlp

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
    # masks are stored as bool and select; the zeros they select have the gradient's dtype
    consts = {n: tf.as_dtype(d["dtypes"][0]).name for n, d in rw.graph.nodes(data=True)
              if d.get("inserted") and d["op"] == "Const"}
    assert sorted(t for n, t in consts.items() if "graphfreeze/frozen/" in n) == ["bool", "bool"]
    zeros = [t for n, t in consts.items() if n.endswith("/zero")]
    assert zeros and set(zeros) == {dtype}
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
