"""Transfer: common layers matched on the graphs, weights copied bitwise, frozen (issue 7)."""

from __future__ import annotations

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batches, make_step, snapshot

import graphfreeze as gf
from graphfreeze.transfer import LayerPair, TransferError, match_layers, transfer, transfer_report
from graphfreeze.transfer.api import _copy


def dense_stack(names, units=(8, 8, 8, 3), acts=("relu", "tanh", "relu", None), width=5, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((width,))]
    layers += [keras.layers.Dense(u, activation=a, name=n) for u, a, n in zip(units, acts, names)]
    return keras.Sequential(layers)


def residual(names, skip_from="stem", act="relu", head=4, seed=0):
    """stem -> a -> b, add(skip, b) -> relu -> head; `skip_from` picks the skip's source."""
    keras.utils.set_random_seed(seed)
    stem_n, a_n, b_n, add_n, act_n, head_n = names
    inp = keras.Input((6,))
    stem = keras.layers.Dense(8, activation="relu", name=stem_n)(inp)
    a = keras.layers.Dense(8, activation="relu", name=a_n)(stem)
    b = keras.layers.Dense(8, name=b_n)(a)
    x = keras.layers.Add(name=add_n)([{"stem": stem, "a": a}[skip_from], b])
    x = keras.layers.Activation(act, name=act_n)(x)
    return keras.Model(inp, keras.layers.Dense(head, name=head_n)(x))


def names_of(pairs):
    return [(s.name, t.name) for s, t in pairs]


SRC = ("h1", "h2", "h3", "out")
TGT = ("a1", "a2", "a3", "a4")


def test_renamed_identical_prefix_matches():
    source, target = dense_stack(SRC), dense_stack(TGT, units=(8, 8, 8, 2), seed=1)
    assert names_of(match_layers(source, target)) == [("h1", "a1"), ("h2", "a2"), ("h3", "a3")]
    report = transfer_report(source, target)
    assert "config differs: units = 2 here, 3 in the source 'out'" in str(report)


def conv_net(side, names):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((side, side, 1)),
                             keras.layers.Conv2D(4, 3, activation="relu", name=names[0]),
                             keras.layers.Flatten(name=names[1]),
                             keras.layers.Dense(5, activation="relu", name=names[2]),
                             keras.layers.Dense(2, name=names[3])])


def test_shape_change_stops_the_match_there():
    # Same layers, but the target reads 4 features: the first kernel is [4, 8] vs [5, 8],
    # and what follows, although identical, is not in the common prefix.
    source, target = dense_stack(SRC), dense_stack(TGT, width=4)
    assert match_layers(source, target) == []
    text = str(transfer_report(source, target))
    assert "shape differs: kernel [4, 8] here, [5, 8] in the source 'h1'" in text
    assert "after 'a1', which did not match" in text

    # Larger images: the conv kernel fits both and transfers; the Dense after Flatten does not.
    source, target = conv_net(8, ("conv", "flat", "fc", "out")), conv_net(10, "cfdo")
    assert names_of(match_layers(source, target)) == [("conv", "c")]
    why = {u.target: u.reason for u in transfer_report(source, target).unmatched}
    assert why == {"d": "shape differs: kernel [256, 5] here, [144, 5] in the source 'fc'",
                   "o": "after 'd', which did not match"}


def test_activation_change_stops_the_match_there():
    source = dense_stack(SRC)
    target = dense_stack(TGT, acts=("relu", "sigmoid", "relu", None))
    assert names_of(match_layers(source, target)) == [("h1", "a1")]
    report = transfer_report(source, target)
    why = {u.target: u.reason for u in report.unmatched}
    assert why["a2"] == "config differs: activation = \"sigmoid\" here, \"tanh\" in the source 'h2'"
    assert why["a3"] == why["a4"] == "after 'a2', which did not match"


def test_permuted_layer_order_does_not_match_past_the_permutation():
    # h2 (tanh) and h3 (relu) swapped: same shapes, so names or shapes alone would pair them.
    source = dense_stack(SRC)
    target = dense_stack(TGT, acts=("relu", "relu", "tanh", None))
    assert names_of(match_layers(source, target)) == [("h1", "a1")]
    fully_permuted = dense_stack(TGT, acts=("tanh", "relu", "relu", None))
    assert match_layers(source, fully_permuted) == []


def test_residual_branches_match_only_where_both_graphs_agree():
    src_names = ("stem", "a", "b", "add", "act", "head")
    source = residual(src_names)
    same = residual(("s0", "s1", "s2", "s3", "s4", "s5"), seed=1)
    assert names_of(match_layers(source, same)) == [
        ("stem", "s0"), ("a", "s1"), ("b", "s2"), ("head", "s5")]

    # The skip comes from `a`, not `stem`: both branches' layers match, the Add does not.
    moved_skip = residual(("s0", "s1", "s2", "s3", "s4", "s5"), skip_from="a")
    assert names_of(match_layers(source, moved_skip)) == [("stem", "s0"), ("a", "s1"), ("b", "s2")]
    why = {u.target: u.reason for u in transfer_report(source, moved_skip).unmatched}
    assert why["s3"].startswith("inbound layers differ: no source call reads ('a', 'b')")
    assert why["s5"] == "after 's3', which did not match"

    # A weightless layer that differs (the activation after the join) stops the match too.
    tanh = residual(("s0", "s1", "s2", "s3", "s4", "s5"), act="tanh")
    assert names_of(match_layers(source, tanh)) == [("stem", "s0"), ("a", "s1"), ("b", "s2")]


def test_input_positions_matter():
    # concat([wide, narrow]) vs concat([narrow, wide]): the head's kernel has the same shape
    # in both, but its rows would meet the other features, so it must not match.
    def two_towers(swap: bool, names):
        keras.utils.set_random_seed(0)
        inp = keras.Input((5,))
        wide = keras.layers.Dense(6, name=names[0])(inp)
        narrow = keras.layers.Dense(4, name=names[1])(inp)
        joined = keras.layers.Concatenate(name=names[2])([narrow, wide] if swap else [wide, narrow])
        return keras.Model(inp, keras.layers.Dense(3, name=names[3])(joined))

    source = two_towers(False, ("w", "n", "cat", "head"))
    assert len(match_layers(source, two_towers(False, "abcd"))) == 3
    assert sorted(names_of(match_layers(source, two_towers(True, "abcd")))) == [("n", "b"), ("w", "a")]


def test_traced_graphs_agree_with_keras_layer_graphs():
    source = residual(("stem", "a", "b", "add", "act", "head"))
    for target in (residual(tuple("uvwxyz"), skip_from="a"), residual(tuple("uvwxyz"), head=3)):
        assert names_of(match_layers(source, target, graph="traced")) == \
            names_of(match_layers(source, target, graph="keras"))


def test_nested_functional_model_is_matched_layer_by_layer():
    source = dense_stack(SRC)
    keras.utils.set_random_seed(3)
    body = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu", name="n1"),
                             keras.layers.Dense(8, activation="tanh", name="n2")], name="body")
    target = keras.Sequential([body, keras.layers.Dense(8, activation="relu", name="n3"),
                               keras.layers.Dense(3, name="n4")])
    # Recent Keras builds this Sequential from its first layer's input; Keras 3.3 leaves it unbuilt.
    built_by = np.zeros((1, 5), "float32")
    assert names_of(match_layers(source, target, example_inputs=built_by)) == [
        ("h1", "n1"), ("h2", "n2"), ("h3", "n3"), ("out", "n4")]


def test_shared_layer_pairs_only_when_every_call_matches():
    def siamese(shared: bool, prefix: str):
        a, b = keras.Input((4,)), keras.Input((4,))
        first = keras.layers.Dense(6, name=f"{prefix}enc")
        second = first if shared else keras.layers.Dense(6, name=f"{prefix}enc2")
        joined = keras.layers.Concatenate(name=f"{prefix}cat")([first(a), second(b)])
        return keras.Model([a, b], keras.layers.Dense(1, name=f"{prefix}head")(joined))

    source = siamese(True, "s_")
    assert names_of(match_layers(source, siamese(True, "t_"))) == [("s_enc", "t_enc"), ("s_head", "t_head")]
    # Untied in the target: both encoders take the one shared source encoder's weights.
    assert names_of(match_layers(source, siamese(False, "t_"))) == [
        ("s_enc", "t_enc"), ("s_enc", "t_enc2"), ("s_head", "t_head")]
    # Tied in the target but not in the source: one target layer, two source layers.
    report = transfer_report(siamese(False, "s_"), siamese(True, "t_"))
    assert names_of((p.source, p.target) for p in report.pairs) == [("s_head", "t_head")]
    assert "match different source layers" in str(report)


class Net(keras.Model):
    """Subclassed: layers under attribute names, a residual join and a raw op in call()."""

    def __init__(self, glue=tf.nn.relu, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.glue = glue
        self.first = keras.layers.Dense(8, activation="relu")
        self.second = keras.layers.Dense(8)
        self.head = keras.layers.Dense(classes)

    def call(self, x):
        h = self.first(x)
        return self.head(self.glue(self.second(h) + h))


def built(model, width=5):
    model(np.zeros((2, width), "float32"))
    return model


def test_subclassed_models_are_matched_on_their_traced_graphs():
    source = built(Net())
    target = built(Net(classes=2))
    assert [(s, t) for s, t in match_layers(source, target)] == [
        (source.first, target.first), (source.second, target.second)]
    # A different raw op between the layers stops the match there, as a layer would.
    other_glue = built(Net(glue=tf.nn.tanh))
    assert [(s, t) for s, t in match_layers(source, other_glue)] == [
        (source.first, other_glue.first), (source.second, other_glue.second)]
    assert "layer kind differs: Relu in the source" in str(transfer_report(source, other_glue))
    # A Sequential has no `+ h` join: the first two layers match, the head does not.
    seq = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu"),
                            keras.layers.Dense(8), keras.layers.Dense(3)])
    assert [t for _, t in match_layers(seq, source)] == [source.first, source.second]


class Normed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d1, self.bn = keras.layers.Dense(8), keras.layers.BatchNormalization()
        self.drop, self.d2 = keras.layers.Dropout(0.5), keras.layers.Dense(4)

    def call(self, x, training=False):
        return self.d2(self.drop(self.bn(self.d1(x), training=training), training=training))


def test_sequential_and_subclassed_agree_on_batchnorm_and_dropout():
    # The Functional call passes training= to each layer, the subclassed call its own way:
    # that is not structure. Dropout's rate is not either, and it has no weights to report.
    seq = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
                            keras.layers.Dropout(0.1), keras.layers.Dense(4)])
    sub = built(Normed())
    pairs = match_layers(seq, sub)
    assert [t for _, t in pairs] == [sub.d1, sub.bn, sub.d2]
    assert [s for s, _ in pairs] == [seq.layers[0], seq.layers[1], seq.layers[3]]


def test_subclassed_model_needs_example_inputs_when_unbuilt():
    with pytest.raises(TransferError, match="example_inputs="):
        match_layers(built(Net()), Net())
    pairs = match_layers(built(Net()), Net(), example_inputs=np.zeros((1, 5), "float32"))
    assert len(pairs) == 3


def weights_of(layer):
    return [np.array(v.numpy(), copy=True) for v in layer.variables]


def test_weights_copied_bitwise_and_nothing_else_touched():
    source = dense_stack(SRC)
    target = dense_stack(TGT, acts=("relu", "tanh", "sigmoid", None), seed=1)
    before = snapshot(target.variables)
    rules = transfer(source, target)
    assert [layer.name for layer in rules] == ["a1", "a2"]
    assert isinstance(rules, list) and all(isinstance(r, keras.layers.Layer) for r in rules)
    for pair in rules.pairs:
        for vs, vt in zip(weights_of(pair.source), weights_of(pair.target)):
            assert vs.dtype == vt.dtype and vs.tobytes() == vt.tobytes()
    for v in target.get_layer("a3").variables + target.get_layer("a4").variables:
        np.testing.assert_array_equal(v.numpy(), before[v.path])
    assert transfer(source, dense_stack(TGT), freeze=False) == []


def test_freezing_the_returned_rules_keeps_transferred_layers_bitwise():
    source = dense_stack(SRC)
    target = dense_stack(TGT, units=(8, 8, 8, 2), seed=1)
    rules = transfer(source, target)
    transferred = snapshot([v for layer in rules for v in layer.variables])

    # Reference: the same model after the transfer, the same layers trainable=False in Keras.
    reference = dense_stack(TGT, units=(8, 8, 8, 2), seed=2)
    reference.set_weights(target.get_weights())
    for layer in rules:
        reference.get_layer(layer.name).trainable = False
    data = batches(3, (16, 5), (16, 2))
    step = gf.rewrite(make_step(target, keras.optimizers.Adam(1e-2)), rules, *data[0])
    ref_step = tf.function(make_step(reference, keras.optimizers.Adam(1e-2)))
    head_before = snapshot(target.get_layer("a4").variables)
    for x, y in data:
        step(x, y)
        ref_step(x, y)

    for path, value in snapshot([v for layer in rules for v in layer.variables]).items():
        assert value.tobytes() == transferred[path].tobytes(), path
    for v in target.get_layer("a4").variables:
        assert not np.array_equal(v.numpy(), head_before[v.path])
    for v, r in zip(target.variables, reference.variables):
        np.testing.assert_allclose(v.numpy(), r.numpy(), atol=1e-5, rtol=1e-5)
    assert {row.path for row in step.report()} == set(transferred)


def test_transfer_between_subclassed_models_then_freeze():
    source, target = built(Net()), built(Net(classes=2))
    rules = transfer(source, target)
    assert list(rules) == [target.first, target.second]
    frozen = snapshot(target.first.variables + target.second.variables)
    head = snapshot(target.head.variables)
    x, y = batches(1, (8, 5), (8, 2))[0]
    step = gf.freeze(*rules)(make_step(target, keras.optimizers.SGD(0.1)))
    for _ in range(2):
        step(x, y)
    for v in target.first.variables + target.second.variables:
        assert v.numpy().tobytes() == frozen[v.path].tobytes()
    for layer in ("first", "second"):
        for vs, vt in zip(weights_of(getattr(source, layer)), weights_of(getattr(target, layer))):
            assert vs.tobytes() == vt.tobytes()
    assert all(not np.array_equal(v.numpy(), head[v.path]) for v in target.head.variables)


def test_exclude_keeps_a_matching_head_out():
    source, target = dense_stack(SRC), dense_stack(TGT)
    rules = transfer(source, target, exclude=["a4"])
    assert [layer.name for layer in rules] == ["a1", "a2", "a3"]
    assert re.search(r"\na4 +Dense +excluded by the caller", str(rules))
    with pytest.raises(TransferError, match="no layer named 'nope'"):
        transfer(source, target, exclude=["nope"])


# --------------------------------------------------------------------------- sources


def assert_transferred_from(source, target, names):
    for sname, tname in names:
        for vs, vt in zip(weights_of(source.get_layer(sname)), weights_of(target.get_layer(tname))):
            assert vs.tobytes() == vt.tobytes(), (sname, tname)


def test_source_from_keras_file(tmp_path):
    source = dense_stack(SRC)
    path = tmp_path / "source.keras"
    source.save(path)
    target = dense_stack(TGT, units=(8, 8, 8, 2), seed=1)
    rules = transfer(str(path), target)
    assert [layer.name for layer in rules] == ["a1", "a2", "a3"]
    assert_transferred_from(source, target, zip(SRC[:3], TGT[:3]))
    assert f"file {path}" in str(rules)


def test_source_from_weights_h5_needs_the_architecture(tmp_path):
    source = dense_stack(SRC)
    path = str(tmp_path / "source.weights.h5")
    source.save_weights(path)
    target = dense_stack(TGT, units=(8, 8, 8, 2), seed=1)
    before = snapshot(target.variables)
    with pytest.raises(TransferError, match="architecture="):
        transfer(path, target)
    assert all(np.array_equal(v.numpy(), before[v.path]) for v in target.variables)
    rules = transfer(path, target, architecture=lambda: dense_stack(SRC, seed=5))
    assert [layer.name for layer in rules] == ["a1", "a2", "a3"]
    assert_transferred_from(source, target, zip(SRC[:3], TGT[:3]))


@pytest.mark.parametrize("key", ["model", "net"])
def test_source_from_checkpoint_directory(tmp_path, key):
    source = dense_stack(SRC)
    tf.train.Checkpoint(**{key: source}).save(os.path.join(tmp_path, "ckpt"))
    target = dense_stack(TGT, units=(8, 8, 8, 2), seed=1)
    rules = transfer(str(tmp_path), target, architecture=dense_stack(SRC, seed=5))
    assert [layer.name for layer in rules] == ["a1", "a2", "a3"]
    assert_transferred_from(source, target, zip(SRC[:3], TGT[:3]))


def test_checkpoint_missing_variables_is_refused_by_name(tmp_path):
    small = dense_stack(SRC[:2], units=(8, 8), acts=("relu", "tanh"))
    tf.train.Checkpoint(model=small).save(os.path.join(tmp_path, "ckpt"))
    target = dense_stack(TGT, seed=1)
    before = snapshot(target.variables)
    architecture = dense_stack(SRC, seed=5)
    with pytest.raises(TransferError, match=r"missing variables .* 4 of 8 .*: \S*h3/kernel, ") as err:
        transfer(str(tmp_path), target, architecture=architecture)
    assert isinstance(err.value, gf.FreezeError)
    assert all(np.array_equal(v.numpy(), before[v.path]) for v in target.variables)


def test_no_common_layer():
    source = dense_stack(SRC)
    target = dense_stack(TGT, units=(4, 8, 8, 3))
    before = snapshot(target.variables)
    empty = transfer(source, target, freeze=False)
    assert empty == [] and empty.pairs == [] and not empty.report
    assert "no common layer" in str(empty) and "units = 4 here, 8 in the source 'h1'" in str(empty)
    with pytest.raises(TransferError, match="nothing to transfer"):
        transfer(source, target)
    assert all(np.array_equal(v.numpy(), before[v.path]) for v in target.variables)


def test_bad_sources_raise_freeze_errors(tmp_path):
    target = dense_stack(TGT)
    garbage = tmp_path / "broken.keras"
    garbage.write_bytes(b"not a zip file")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    h5 = str(tmp_path / "other.weights.h5")
    dense_stack(SRC, units=(7, 8, 8, 3)).save_weights(h5)
    cases = [
        (str(tmp_path / "missing.keras"), {}, "does not exist"),
        (str(garbage), {}, "cannot load the model file"),
        (str(text), {}, "not a file type transfer reads"),
        (42, {}, "source must be a Keras model"),
        (h5, {"architecture": lambda: dense_stack(SRC)}, "cannot load the weights file"),
        (str(tmp_path), {"architecture": dense_stack(SRC)}, "directory without a checkpoint"),
        (dense_stack(SRC), {"graph": "names"}, "graph='names'"),
    ]
    for source, kwargs, message in cases:
        with pytest.raises(TransferError, match=message):
            transfer(source, target, **kwargs)
    with pytest.raises(TransferError, match="no Keras layer graph"):
        match_layers(built(Net()), target, graph="keras")


def test_copy_validates_every_pair_before_assigning():
    source, target = dense_stack(SRC), dense_stack(TGT, units=(8, 8, 7, 3), seed=1)
    before = snapshot(target.variables)
    good = LayerPair(source.get_layer("h1"), target.get_layer("a1"), ())
    bad = LayerPair(source.get_layer("h3"), target.get_layer("a3"), ())
    with pytest.raises(TransferError, match=r"cannot copy .*h3/kernel \[8, 8\].*a3/kernel \[8, 7\]"):
        _copy([good, bad])
    assert all(np.array_equal(v.numpy(), before[v.path]) for v in target.variables)
