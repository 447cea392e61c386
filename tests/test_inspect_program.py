"""Inspection covers the whole program the rewrite edited (issue 18).

A `model.fit` step is a thin wrapper (placeholders and one StatefulPartitionedCall) around
Keras's one_step_on_data body; optimizer options put work into If branches below it. The
report, the diff and the pictures must describe all of it. Expectations are computed here
from TensorFlow's own function libraries (the concrete functions' GraphDefs), independently
of graphfreeze's IR, and FLOPs of matrix products and convolutions from the layers' shapes.
"""

from __future__ import annotations

import os
import re
from collections import Counter

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_step
from keras_versions import needs_keras

import graphfreeze as gf
from graphfreeze.capture import MARKER_NAME

BATCH = 16
CONVOLUTIONS = ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "DepthwiseConv2dNative",
                "DepthwiseConv2dNativeBackpropInput", "DepthwiseConv2dNativeBackpropFilter")


# ----------------------------------------------------------------------------- independent counts


def reachable_functions(graph_def) -> dict:
    """Name -> FunctionDef of every library function the top graph calls, at any depth
    (through any function-valued attr, or an op that is a library function)."""
    library = {f.signature.name: f for f in graph_def.library.function}
    found: dict = {}
    pending = [list(graph_def.node)]
    while pending:
        for node in pending.pop():
            names = [node.op] if node.op in library else []
            for value in node.attr.values():
                if value.HasField("func"):
                    names.append(value.func.name)
                names += [f.name for f in value.list.func]
            for name in names:
                if name in library and name not in found:
                    found[name] = library[name]
                    pending.append(list(library[name].node_def))
    return found


def program_nodes(graph_def, skip_markers: bool = False) -> list:
    """Every NodeDef of the top graph and of every reachable function body. graphfreeze's
    gradient markers (Identity ops its tracer adds) are not part of the user's program."""
    nodes = list(graph_def.node) + [n for f in reachable_functions(graph_def).values() for n in f.node_def]
    if skip_markers:
        nodes = [n for n in nodes if not n.name.rsplit("/", 1)[-1].startswith(MARKER_NAME)]
    return nodes


def layer_of(node_name: str, layers: dict):
    """The Keras layer whose name scope holds a node (TF uniquifies scopes as name_1)."""
    for segment in node_name.split("/"):
        for candidate in (segment, re.sub(r"_\d+$", "", segment)):
            if candidate in layers:
                return layers[candidate]
    return None


def product_flops(layer, batch: int) -> int:
    """FLOPs of one matrix product or convolution of a layer: forward, input gradient and
    kernel gradient all do one multiply-add per (output element, kernel window entry)."""
    kernel = tuple(layer.kernel.shape)
    if isinstance(layer, keras.layers.Dense):
        return 2 * batch * kernel[0] * kernel[1]
    h, w = layer.output.shape[1:3]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return 2 * batch * h * w * kernel[2] * kernel[3] * kernel[0] * kernel[1]
    return 2 * batch * h * w * kernel[3] * kernel[0] * kernel[1] * kernel[2]


def expected_product_flops(nodes, model, op_types, batch: int = BATCH) -> int:
    layers = {layer.name: layer for layer in model.layers}
    total = 0
    for node in nodes:
        if node.op in op_types:
            layer = layer_of(node.name, layers)
            assert layer is not None, f"{node.name} ({node.op}) belongs to no layer"
            total += product_flops(layer, batch)
    return total


def original_step_graph_def(model, data):
    """The Keras per-step function traced again by TensorFlow alone."""
    step = gf.keras.frozen_step(model).python_function
    return tf.function(step).get_concrete_function(data).graph.as_graph_def()


def rewritten_graph_defs(rw):
    """The GraphDef graphfreeze imports, and the library its concrete function runs."""
    return rw.graph_def, rw.concrete_function.graph.as_graph_def()


# ----------------------------------------------------------------------------- fixtures


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="relu", name="a"),
                             keras.layers.Dense(16, activation="relu", name="b"),
                             keras.layers.Dense(3, name="c")])


DATA = (np.random.default_rng(1).normal(size=(2 * BATCH, 10)).astype("float32"),
        np.random.default_rng(2).normal(size=(2 * BATCH, 3)).astype("float32"))


def fitted(optimizer=None):
    model = mlp()
    model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-2), loss="mse")
    # Built for every layer before freezing (a model trained before), so the frozen layers'
    # Adam updates exist in the traced step and the report must count them as removed; an
    # optimizer built under the rules never has them (tests/test_optimizer_memory.py).
    model.optimizer.build(model.trainable_variables)
    gf.keras.freeze(model, "a/*", "b/*")
    model.fit(*DATA, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    return model, gf.keras.rewritten(model)


@pytest.fixture(scope="module")
def fit_mlp():
    return fitted()


def check_totals(model, rw, data, op_types=("MatMul",), batch=BATCH) -> None:
    """Report and diff totals against the libraries of the traced and rewritten steps:
    op counts, op types, and the FLOPs of `op_types` (matrix products, convolutions)."""
    before = program_nodes(original_step_graph_def(model, data), skip_markers=True)
    rewritten_def, runtime_def = rewritten_graph_defs(rw)
    assert set(reachable_functions(rewritten_def)) == set(reachable_functions(runtime_def))
    after = program_nodes(rewritten_def)
    report, diff = rw.report(), rw.diff()
    assert (report.ops_before, report.ops_after) == (len(before), len(after))
    assert report.ops_before == sum(b.ops_before for b in report.bodies)
    assert report.ops_after == sum(b.ops_after for b in report.bodies)
    assert report.flops["before"] == sum(b.flops_before for b in report.bodies)
    assert report.flops["removed_backward"] + report.flops["removed_optimizer"] == \
        sum(diff.flops_removed.values()) == sum(sum(b.flops_removed.values()) for b in report.bodies)
    change = Counter(n.op for n in before)  # op types: what left minus what came, type by type
    change.subtract(Counter(n.op for n in after))
    net = Counter(diff.removed)
    net.subtract(Counter(diff.added))
    assert {k: v for k, v in change.items() if v} == {k: v for k, v in net.items() if v}
    expected = expected_product_flops(before, model, op_types, batch) - \
        expected_product_flops(after, model, op_types, batch)
    got = sum(diff.flops_removed.get(t, 0) - diff.flops_added.get(t, 0) for t in op_types)
    assert got == expected > 0


def first_batch():
    return tuple(tf.constant(d[:BATCH]) for d in DATA)


# ----------------------------------------------------------------------------- the fit path


def test_fit_report_counts_every_body(fit_mlp):
    model, rw = fit_mlp
    check_totals(model, rw, first_batch())
    report = rw.report()
    assert len(report.bodies) >= 2 and report.bodies[0].is_step
    step, body = report.bodies[0], report.bodies[1]
    assert body.name.startswith("__inference_one_step_on_data") and body.parent == step.name
    # The frozen layers' backward: their kernel gradients and the input gradients only they
    # need, as matrix products of the layers' own shapes.
    layers = {layer.name: layer for layer in model.layers}
    removed = product_flops(layers["a"], BATCH) + 2 * product_flops(layers["b"], BATCH) + \
        product_flops(layers["c"], BATCH)
    assert rw.diff().flops_removed["MatMul"] == removed
    assert report.flops["removed_backward"] >= removed and report.flops["removed_optimizer"] > 0
    assert report.ops_removed > 10 * step.ops_removed  # the work is in the body, not the wrapper


def test_report_detail_bodies(fit_mlp):
    _, rw = fit_mlp
    report = rw.report()
    text = str(rw.report(detail="bodies"))
    assert text.startswith(str(report))  # the same report, one more section
    for b in report.bodies:
        row = next(line for line in text.splitlines() if line.startswith(b.name))
        assert f"{b.ops_before:,}" in row and f"{b.ops_after:,}" in row
    assert str(rw.report(detail=["summary", "bodies"])) == text
    data = report.to_dict()
    assert [b["name"] for b in data["bodies"]] == [b.name for b in report.bodies]
    with pytest.raises(gf.FreezeError, match="unknown detail 'layer'.*'bodies'"):
        rw.report(detail="layer")


def test_bodies_by_name_before_and_after(fit_mlp):
    _, rw = fit_mlp
    original_def = rw.original_program.main.to_graph_def()
    functions = reachable_functions(original_def)
    assert set(rw.original_bodies) == set(functions) == set(rw.bodies)
    markers = {n for n, f in functions.items() for nd in f.node_def if nd.name.startswith(MARKER_NAME)}
    for name, graph in rw.original_bodies.items():
        fdef = functions[name]
        args = len(fdef.signature.input_arg) + len(fdef.signature.output_arg)  # placeholders, _Retval
        kept = [nd for nd in fdef.node_def if not nd.name.startswith(MARKER_NAME)]
        assert graph.number_of_nodes() == len(kept) + args, name
    assert markers, "the traced body holds gradient markers; original_bodies must not"
    emitted = {f.signature.name: f for f in rw.graph_def.library.function}
    for name, graph in rw.bodies.items():
        new_name = rw.diff().functions.get(name, name)
        fdef = emitted[new_name]
        assert graph.number_of_nodes() == len(fdef.node_def) + len(fdef.signature.input_arg) + \
            len(fdef.signature.output_arg)
    # The top level stays the wrapper, as before.
    assert {op for _, op in rw.graph.nodes(data="op")} <= {"Placeholder", "Identity",
                                                            "StatefulPartitionedCall"}


@needs_keras("3.7.0", "Keras 3.3's CompileLoss multiplies the loss by a weight of 1.0, whose "
                     "unused gradient Mul the fit rewrite removes and the custom step never had "
                     "(seen on 3.3.3; 3.4-3.6 not checked)")
def test_fit_and_custom_step_agree(fit_mlp):
    """The same model, rules and optimizer through gf.freeze on a custom step: the removed
    work is the same; only the ops of Keras's wrapper (metrics, placeholders) differ."""
    _, rw = fit_mlp
    model, optimizer = mlp(), keras.optimizers.Adam(1e-2)
    optimizer.build(model.trainable_variables)  # as in fitted(): state for every layer
    train_step = gf.freeze("a/*", "b/*")(make_step(model, optimizer))
    x, y = DATA[0][:BATCH], DATA[1][:BATCH]
    train_step(x, y)
    custom = train_step.rewritten(x, y)
    fit_report, custom_report = rw.report(), custom.report()
    assert len(custom_report.bodies) == 1  # a custom step with a tape traces flat
    custom_before = program_nodes(tf.function(train_step.python_function)
                                  .get_concrete_function(x, y).graph.as_graph_def())
    assert custom_report.ops_before == len(custom_before)
    wrapper = fit_report.ops_before - custom_report.ops_before
    assert wrapper > 0
    assert abs(fit_report.ops_removed - custom_report.ops_removed) <= wrapper
    assert rw.diff().flops_removed == custom.diff().flops_removed
    for key in ("removed_backward", "removed_optimizer", "added"):
        assert fit_report.flops[key] == custom_report.flops[key], key
    bookkeeping = {"Const", "NoOp", "Identity"}
    fit_removed, custom_removed = rw.diff().removed, custom.diff().removed
    for op in set(fit_removed) | set(custom_removed):
        if op not in bookkeeping:
            assert fit_removed.get(op, 0) == custom_removed.get(op, 0), op


def test_nested_if_bodies_are_counted_and_drawn():
    """Gradient accumulation puts the optimizer update into If branches below Keras's step."""
    model, rw = fitted(keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2))
    check_totals(model, rw, first_batch())
    report = rw.report()
    names = {b.name for b in report.bodies}
    branches = [b for b in report.bodies if b.parent not in (None, report.bodies[0].name)]
    assert branches, names
    assert all(b.parent in names for b in branches)
    assert sum(sum(b.flops_removed.values()) for b in branches) > 0  # frozen Adam work in branches
    import pydot
    (graph,) = pydot.graph_from_dot_data(rw.to_dot())
    clusters = _dot_clusters(graph)
    paths = {}  # a body's cluster is named after the chain of calls that reach it
    for b in report.bodies[1:]:
        paths[b.name] = b.name if b.parent == report.bodies[0].name else f"{paths[b.parent]}/{b.name}"
    for b in branches:  # each branch a cluster inside the cluster of the body that calls it
        parent, nodes, _ = clusters[f"cluster_{paths[b.name]}"]
        assert parent == f"cluster_{paths[b.parent]}" and nodes


# ----------------------------------------------------------------------------- pictures


def _dot_clusters(graph, parent=""):
    """cluster name -> (parent cluster, node names directly in it), walking pydot subgraphs."""
    out = {}
    for sub in graph.get_subgraphs():
        name = sub.get_name().strip('"')
        nodes = {n.get_name().strip('"') for n in sub.get_nodes() if n.get_name() not in ("node", "graph")}
        out[name] = (parent, nodes, sub)
        out.update(_dot_clusters(sub, name))
    return out


def test_fit_picture_shows_the_body_and_its_removed_backward(fit_mlp, tmp_path):
    import pydot
    _, rw = fit_mlp
    body = rw.report().bodies[1].name
    (graph,) = pydot.graph_from_dot_data(rw.to_dot())
    clusters = _dot_clusters(graph)
    assert f"cluster_{body}" in clusters
    parent, nodes, cluster = clusters[f"cluster_{body}"]
    assert parent == "" and nodes and all(n.startswith(body + "/") for n in nodes)
    fills = {n.get_name().strip('"'): n.get("fillcolor").strip('"') for n in cluster.get_nodes()
             if n.get_name() not in ("node", "graph")}
    for layer in ("a", "b"):  # the frozen layers' backward, drawn as removed
        frozen_grads = [n for n in fills if re.search(rf"gradient_tape/.*/{layer}(_\d+)?$", n)]
        assert frozen_grads and all(fills[n] == "#eeeeee" for n in frozen_grads), (layer, sorted(fills))
    trainable = [n for n in fills if re.search(r"gradient_tape/.*/c(_\d+)?", n)]
    assert trainable and any(fills[n] != "#eeeeee" for n in trainable)
    calls = [e for e in graph.get_edges() if e.get("lhead")]
    assert [e.get("lhead").strip('"') for e in calls] == [f"cluster_{body}"]
    # The built-in SVG (no Graphviz) frames the body too; the HTML lists it per function.
    html_text = open(rw.to_html(str(tmp_path / "fit.html"))).read()
    assert body in html_text and 'id="functions"' in html_text
    from graphfreeze.render import to_svg
    svg = to_svg(rw.picture(), "fit")
    assert svg.count('class="cluster') == 1 and 'class="call"' in svg


def test_fit_tensorboard_inlines_bodies(fit_mlp, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, rw = fit_mlp
    runs = rw.to_tensorboard(str(tmp_path), include_original=True)
    graphs = {}
    for run in runs:
        acc = EventAccumulator(run)
        acc.Reload()
        graphs[os.path.basename(run)] = acc.Graph()
    for kind, top, bodies in (("rewritten", rw.graph, rw.bodies),
                              ("original", rw.original_graph, rw.original_bodies)):
        names = {n.name for n in graphs[kind].node}
        assert names == set(top) | {f"{b}/{n}" for b, g in bodies.items() for n in g}, kind
    body = next(iter(rw.bodies))
    args = [n for n in graphs["rewritten"].node if n.name.startswith(body + "/") and n.op == "Placeholder"]
    assert args and all(n.input for n in args)  # fed from the call op's inputs


# ----------------------------------------------------------------------------- a real application


@pytest.mark.slow
def test_mobilenet_fit_report_totals():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=5)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    trainable_head = [layer for layer in model.layers
                      if layer.weights and layer.name.startswith(("block_16", "Conv_1"))]
    gf.keras.freeze(model, "*", *[gf.Unfreeze(layer) for layer in trainable_head + [model.layers[-1]]])
    x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype("float32")
    y = np.arange(8) % 5
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    rw = gf.keras.rewritten(model)
    check_totals(model, rw, (tf.constant(x), tf.constant(y)), CONVOLUTIONS + ("MatMul",), batch=8)
    assert rw.diff().flops_removed["Conv2DBackpropFilter"] > 0
