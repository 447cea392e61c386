"""Trainable-only files (issue 15, item 4): gf.save_trainable / gf.load_trainable.

The reference for a round trip is the trained model itself: a fresh base built from the
same initial weights, loaded from the file, must equal it bitwise (the frozen entries
because training never moved them, the trainable ones because the file holds them).
"""

from __future__ import annotations

import json
import os
import zipfile

import keras
import numpy as np
import pytest
from conftest import snapshot

import graphfreeze as gf

VOCAB, WIDTH = 32_000, 64
TOKENS = list(range(100, 116))   # the 16 new tokens that train
TOKEN_RULES = ["*", gf.Unfreeze(gf.Rows("emb/embeddings", TOKENS))]


def lm(vocab=VOCAB, width=WIDTH, seed=0, name="lm", emb="emb"):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,), dtype="int32"),
                             keras.layers.Embedding(vocab, width, name=emb),
                             keras.layers.Flatten(), keras.layers.Dense(4, name="out")], name=name)


def mixed(seed=0):
    """Dense layers: one whole, one with frozen columns, one with a frozen mask, a bfloat16 one."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="low"),
        keras.layers.Dense(8, activation="tanh", name="mid"),
        keras.layers.Dense(8, activation="tanh", name="half", dtype="bfloat16"),
        keras.layers.Dense(3, name="out", dtype="float32")], name="mixed")


MASK = np.random.default_rng(3).random((8, 3)) < 0.5
MIXED_RULES = [gf.Columns("mid/kernel", range(5)), gf.Rows("mid/bias", range(5)),
               gf.Mask("out/kernel", MASK), "out/bias"]


def _fit(model, rules, x, y):
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    gf.keras.freeze(model, *rules)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    return model


def _equal(a, b):
    return all(np.array_equal(np.asarray(v), np.asarray(w)) for v, w in zip(a.get_weights(), b.get_weights()))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A model whose 16 new token rows trained, its file, and the untouched initial weights."""
    rng = np.random.default_rng(0)
    model = lm()
    initial = [np.array(w) for w in model.get_weights()]
    ids = rng.integers(100, 116, (64, 5)).astype("int32")
    _fit(model, TOKEN_RULES, ids, rng.normal(size=(64, 4)).astype("float32"))
    path = tmp_path_factory.mktemp("tokens") / "tokens.npz"
    assert gf.save_trainable(path, model, *TOKEN_RULES) == str(path)
    return model, path, initial


def test_trainable_tokens_round_trip_bitwise(tokens):
    trained, path, initial = tokens
    base = lm()
    assert all(np.array_equal(a, b) for a, b in zip(base.get_weights(), initial))
    assert gf.load_trainable(path, base) == ["lm/emb/embeddings"]
    assert _equal(base, trained)
    table = base.get_layer("emb").embeddings.numpy()
    assert not np.array_equal(table[TOKENS], initial[0][TOKENS])  # the tokens did train


def test_file_size_follows_the_trainable_entries_not_the_model(tokens, tmp_path):
    trained, path, _ = tokens
    table_bytes = VOCAB * WIDTH * 4
    row_bytes = WIDTH * 4
    assert os.path.getsize(path) < 16 * row_bytes + 4096 < table_bytes / 500
    more = gf.save_trainable(tmp_path / "more.npz", trained, "*",
                             gf.Unfreeze(gf.Rows("emb/embeddings", range(100, 132))))
    grown = os.path.getsize(more) - os.path.getsize(path)
    assert 16 * row_bytes <= grown < 16 * row_bytes + 256  # 16 more rows (and their indices)
    bigger = lm(vocab=2 * VOCAB)
    doubled = gf.save_trainable(tmp_path / "bigger.npz", bigger, *TOKEN_RULES)
    assert abs(os.path.getsize(doubled) - os.path.getsize(path)) < 64  # header digits only


def test_mixed_rules_round_trip_and_layout(tmp_path):
    rng = np.random.default_rng(1)
    model = mixed()
    _fit(model, MIXED_RULES, rng.normal(size=(32, 6)).astype("float32"),
         rng.normal(size=(32, 3)).astype("float32"))
    path = gf.save_trainable(tmp_path / "mixed.npz", model, *MIXED_RULES)
    base = mixed()
    assert not _equal(base, model)
    gf.load_trainable(path, base)
    assert _equal(base, model)
    with np.load(path, allow_pickle=False) as archive:
        header = json.loads(archive["graphfreeze.json"].tobytes())
        kinds = {e["path"]: (e["kind"], archive[e["values"]].shape) for e in header["entries"]}
    assert kinds == {"mixed/low/kernel": ("whole", (6, 8)), "mixed/low/bias": ("whole", (8,)),
                     "mixed/mid/kernel": ("columns", (8, 3)), "mixed/mid/bias": ("rows", (3,)),
                     "mixed/half/kernel": ("whole", (8, 8)), "mixed/half/bias": ("whole", (8,)),
                     "mixed/out/kernel": ("entries", (int((~MASK).sum()),))}
    assert [v[0] for v in header["base"]["variables"]] == [v.path for v in model.weights]


def _untouched(model):
    before = snapshot(model.variables)
    return lambda: all(np.array_equal(v, before[p]) for p, v in snapshot(model.variables).items())


@pytest.mark.parametrize("target, message", [
    (lambda: lm(emb="embedding"), r"holds 'lm/emb/embeddings', which 'lm' does not have "
                                  r"\(closest: 'lm/embedding/embeddings'"),
    (lambda: lm(width=32), r"'lm/emb/embeddings' as float32 \[32000, 64\], but in 'lm' it is float32 "
                           r"\[32000, 32\]"),
    (lambda: lm(seed=1), "frozen values differ.*check_base=False"),
    (lambda: lm(name="other"), r"which 'other' does not have \(closest: 'other/emb/embeddings'\)"),
])
def test_load_refuses_and_writes_nothing(tokens, target, message):
    _, path, _ = tokens
    model = target()
    untouched = _untouched(model)
    with pytest.raises(gf.FreezeError, match=message):
        gf.load_trainable(path, model)
    assert untouched()


def test_a_base_with_an_extra_layer_is_a_different_base(tokens):
    _, path, _ = tokens
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,), dtype="int32"),
                              keras.layers.Embedding(VOCAB, WIDTH, name="emb"),
                              keras.layers.Flatten(), keras.layers.Dense(4, name="out"),
                              keras.layers.Dense(2, name="extra")], name="lm")
    untouched = _untouched(model)
    with pytest.raises(gf.FreezeError, match="has variable 'lm/extra/kernel', which the base did not"):
        gf.load_trainable(path, model)
    assert untouched()


def test_check_base_false_loads_into_a_different_base(tokens):
    trained, path, _ = tokens
    other = lm(seed=1)
    before = other.get_layer("emb").embeddings.numpy()
    gf.load_trainable(path, other, check_base=False)
    after = other.get_layer("emb").embeddings.numpy()
    trained_table = trained.get_layer("emb").embeddings.numpy()
    assert np.array_equal(after[TOKENS], trained_table[TOKENS])
    assert np.array_equal(np.delete(after, TOKENS, 0), np.delete(before, TOKENS, 0))


def _rewrite_archive(source, target, change):
    with np.load(source, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    change(arrays)
    with open(target, "wb") as f:
        np.savez(f, **arrays)


def _header_edit(edit):
    def change(arrays):
        header = json.loads(arrays["graphfreeze.json"].tobytes())
        edit(header, arrays)
        arrays["graphfreeze.json"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    return change


CORRUPTIONS = {
    "truncated": lambda src, dst: dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2]),
    "text": lambda src, dst: dst.write_text("not a graphfreeze file\n"),
    "single_npy": lambda src, dst: np.save(open(dst, "wb"), np.zeros(3)),
    "foreign_npz": lambda src, dst: np.savez(open(dst, "wb"), weights=np.zeros(3)),
    "pickled_array": lambda src, dst: np.savez(open(dst, "wb"), a=np.array([{"x": 1}], dtype=object)),
    "wrong_format_tag": lambda src, dst: _rewrite_archive(
        src, dst, _header_edit(lambda h, a: h.update(format="something-else"))),
    "future_version": lambda src, dst: _rewrite_archive(
        src, dst, _header_edit(lambda h, a: h.update(version=99))),
    "index_out_of_range": lambda src, dst: _rewrite_archive(
        src, dst, lambda a: a.update({"e0.indices": a["e0.indices"] + VOCAB})),
    "values_wrong_shape": lambda src, dst: _rewrite_archive(
        src, dst, lambda a: a.update({"e0.values": a["e0.values"][:3]})),
    "missing_array": lambda src, dst: _rewrite_archive(src, dst, lambda a: a.pop("e0.values")),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupted_or_foreign_files_are_refused(tokens, tmp_path, kind):
    _, path, _ = tokens
    bad = tmp_path / f"{kind}.npz"
    CORRUPTIONS[kind](path, bad)
    model = lm()
    untouched = _untouched(model)
    with pytest.raises(gf.FreezeError, match=f"{bad.name}.*nothing was loaded"):
        gf.load_trainable(bad, model)
    assert untouched()


def test_missing_file(tmp_path):
    with pytest.raises(gf.FreezeError, match="no such trainable file"):
        gf.load_trainable(tmp_path / "nope.npz", lm(vocab=10))


def test_save_failures_leave_no_file(tmp_path):
    model = lm(vocab=10)
    existing = tmp_path / "kept.npz"
    existing.write_bytes(b"previous contents")
    with pytest.raises(gf.RuleError, match="'emb/embedings'"):
        gf.save_trainable(existing, model, "emb/embedings")
    assert existing.read_bytes() == b"previous contents"
    with pytest.raises(gf.FreezeError, match="cannot write"):
        gf.save_trainable(tmp_path / "no_such_dir" / "x.npz", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.npz"]  # no temporary left


def test_file_is_a_plain_npz_without_pickle(tokens):
    _, path, _ = tokens
    with zipfile.ZipFile(path) as z:
        names = sorted(z.namelist())
    assert names == ["e0.indices.npy", "e0.values.npy", "graphfreeze.json.npy"]
    with np.load(path, allow_pickle=False) as archive:
        assert archive["e0.indices"].tolist() == TOKENS
        assert archive["e0.values"].shape == (16, WIDTH)
