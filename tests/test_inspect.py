"""Inspection (issue 5): report, diff, pictures, HTML, TensorBoard, dry run, CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import batches, make_step, mlp

import graphfreeze as gf
from graphfreeze import cli
from graphfreeze.flops import op_flops
from graphfreeze.ir import IR
from graphfreeze.protos import graph_meta

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "inspect_target.py")
DATA = batches(2, (16, 6), (16, 3))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


RULES = ["hidden1/*", gf.Columns("out/kernel", [0, 2]), gf.Rows("hidden2/bias", [1])]


def expected_frozen(model) -> dict[str, int]:
    """Frozen entries per variable, from what RULES mean and the variables' shapes."""
    out = {}
    for v in model.trainable_variables:
        mask = np.zeros(v.shape, bool)
        if "/hidden1/" in v.path:
            mask[...] = True
        if v.path.endswith("/out/kernel"):
            mask[:, [0, 2]] = True
        if v.path.endswith("/hidden2/bias"):
            mask[[1]] = True
        if mask.any():
            out[v.path] = int(mask.sum())
    return out


@pytest.fixture
def rewritten():
    model = mlp()
    optimizer = keras.optimizers.Adam(1e-2)
    optimizer.build(model.trainable_variables)  # hidden1's slots exist, to be pruned
    step = make_step(model, optimizer)
    return model, gf.rewrite(step, RULES, *DATA[0]), step


def test_report_table_and_totals(rewritten):
    model, rw, _ = rewritten
    rep = rw.report()
    expected = expected_frozen(model)
    assert len(expected) == 4 and rep.frozen == expected
    rows = {r["path"]: r for r in rep.records()}
    assert rows["sequential/out/kernel"]["total"] == 24 and rows["sequential/out/kernel"]["shape"] == [8, 3]
    assert rows["sequential/hidden1/kernel"]["state_pruned"]
    assert not rows["sequential/out/kernel"]["state_pruned"]
    assert rows["sequential/out/kernel"]["rules"] == ["Columns('out/kernel', [0, 2])"]
    text = str(rep).splitlines()
    header = next(i for i, line in enumerate(text) if line.startswith("variable"))
    columns = [text[header].index(h) for h in ("shape", "frozen/total", "state", "rule(s)")]
    for line in text[header + 2: header + 2 + len(expected)]:  # aligned: values start under headers
        assert all(line[c - 1] == " " for c in columns)
    totals = json.loads(rep.to_json())["totals"]
    assert totals["parameters_frozen"] == sum(expected.values())
    assert totals["ops_removed"] == rw.original_graph.number_of_nodes() - rw.graph.number_of_nodes()
    all_params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert totals["parameters_frozen"] + totals["trainable_parameters"] == all_params
    # The frozen layer's kernel gradient (x^T dz, 2*6*12*16 FLOPs) is part of what was removed.
    assert totals["flops_removed_backward"] >= 2 * 6 * 12 * 16
    assert totals["flops_removed_optimizer"] > 0 and totals["flops_added"] > 0


def test_flop_estimates_for_matmul_and_conv():
    @tf.function
    def f(x, k):
        y = tf.nn.conv2d(x, k, 1, "SAME")
        return tf.matmul(tf.reshape(y, [2, -1]), tf.ones([8 * 8 * 4, 5]))

    cf = f.get_concrete_function(tf.TensorSpec([2, 8, 8, 3]), tf.TensorSpec([3, 3, 3, 4]))
    ir = IR.from_graph_def(cf.graph.as_graph_def(), graph_meta(cf.graph))
    by_op = {ir.op(n): op_flops(ir.graph, n) for n in ir.graph}
    assert by_op["Conv2D"] == 2 * (2 * 8 * 8 * 4) * (3 * 3 * 3)
    assert by_op["MatMul"] == 2 * (2 * 5) * 256


def test_diff_counts_match_the_graphs(rewritten):
    """The diff against the step traced again by TensorFlow alone (no markers, no passes)
    and the GraphDef graphfreeze emits, counted here op type by op type."""
    _, rw, step = rewritten
    d = rw.diff()
    traced = tf.function(step).get_concrete_function(*DATA[0]).graph.as_graph_def()
    assert not traced.library.function  # a tape step traces flat: no bodies to count
    before = Counter(n.op for n in traced.node)
    after = Counter(n.op for n in rw.graph_def.node)
    assert d.n_removed - d.n_added == sum(before.values()) - sum(after.values()) > 0
    net = Counter(d.removed)
    net.subtract(d.added)
    before.subtract(after)
    assert {k: v for k, v in net.items() if v} == {k: v for k, v in before.items() if v}
    # The frozen layer's kernel gradient is a matrix product the rewrite removes.
    kernel_grads = [n.name for n in traced.node if n.op == "MatMul"  # TF scopes: hidden1_1/
                    and re.match(r"gradient_tape/.*/hidden1(_\d+)?/", n.name)]
    emitted = {n.name for n in rw.graph_def.node}
    assert kernel_grads and not set(kernel_grads) & emitted
    assert d.removed["MatMul"] >= len(kernel_grads)
    # Every node the traced step lacks was inserted by a pass, and says which.
    assert {n for n, _, _ in d.inserted} == emitted - {n.name for n in traced.node}
    # the partly frozen variables' updates run on their trainable entries (slice_updates),
    # which leaves the masks and guards of the earlier passes without a use; the reads
    # of the variables they scatter to alias their buffers (read_without_copy)
    assert {p for _, _, p in d.inserted} == {"slice_updates", "read_without_copy"}
    text = str(d)
    assert f"ops removed: {d.n_removed:,}" in text and "slice_updates" in text


def test_dot_parses_and_styles(rewritten):
    import pydot
    _, rw, _ = rewritten
    dot = rw.to_dot()
    (graph,) = pydot.graph_from_dot_data(dot)
    nodes = {n.get_name().strip('"'): n for n in graph.get_nodes() if n.get_name() not in ("node", "graph")}
    pic = rw.picture()
    assert set(nodes) == set(pic.boxes)
    fills = Counter(n.get("fillcolor").strip('"') for n in nodes.values())
    assert fills["#9ecae1"] >= 1 and fills["#eeeeee"] >= 1 and fills["#fdae6b"] >= 1


def test_render_with_and_without_graphviz(rewritten, tmp_path, monkeypatch):
    _, rw, _ = rewritten
    if shutil.which("dot"):
        png = rw.render(str(tmp_path / "step.png"))
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in open(rw.render(str(tmp_path / "step.svg"))).read()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(gf.RenderError, match=r"`dot`.*apt-get install graphviz"):
        rw.render(str(tmp_path / "x.svg"))
    html_path = rw.to_html(str(tmp_path / "fallback.html"))  # no Graphviz: built-in SVG
    assert 'class="graphfreeze-graph"' in open(html_path).read()


def test_html_is_self_contained(rewritten, tmp_path):
    _, rw, _ = rewritten
    text = open(rw.to_html(str(tmp_path / "r.html"))).read()
    for path in rw.report().frozen:
        assert path in text
    assert "<svg" in text and "http://" not in text.replace("http://www.w3.org", "")
    assert "<script" not in text and "<link" not in text


def _chromium(url: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={out}.profile", "--window-size=1400,1600"]
    return subprocess.run([CHROMIUM, *flags, *extra, url], capture_output=True, timeout=120)


def _screenshot_has_table_and_picture(html_path: str, tmp_path) -> None:
    from PIL import Image
    shot = str(tmp_path / "shot.png")
    _chromium(f"file://{html_path}", shot, f"--screenshot={shot}")
    dom = _chromium(f"file://{html_path}", str(tmp_path / "dom"), "--dump-dom").stdout.decode()
    assert 'id="variables"' in dom and "graphfreeze-graph" in dom
    colors = Counter(Image.open(shot).convert("RGB").getdata())
    assert len(colors) > 20, "the screenshot is blank"
    assert colors[(0xf0, 0xf0, 0xf0)] > 100, "table header not visible"
    assert colors[(0x9e, 0xca, 0xe1)] > 100, "frozen (blue) boxes of the picture not visible"


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (.ci/run installs it with apt-get)")
def test_html_opens_in_headless_chromium(rewritten, tmp_path):
    _, rw, _ = rewritten
    _screenshot_has_table_and_picture(rw.to_html(str(tmp_path / "r.html")), tmp_path)


def test_tensorboard_event_files_load(rewritten, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, rw, _ = rewritten
    runs = rw.to_tensorboard(str(tmp_path), include_original=True)
    assert [os.path.basename(r) for r in runs] == ["rewritten", "original"]
    for run, expected in zip(runs, (rw.graph_def, None)):
        acc = EventAccumulator(run)
        acc.Reload()
        graph = acc.Graph()
        if expected is not None:
            assert {n.name for n in graph.node} == {n.name for n in expected.node}
        else:
            assert len(graph.node) == rw.original_graph.number_of_nodes()


def test_plan_matches_the_rewrite_report(rewritten):
    model, rw, _ = rewritten
    planned = gf.plan(model, *RULES)
    expected = expected_frozen(model)
    assert planned.frozen == expected and rw.report().frozen == expected
    by_path = {r.path: r for r in planned.rows}
    for v in model.trainable_variables:
        if v.path in expected:
            assert by_path[v.path].total == int(np.prod(v.shape))
    assert by_path["sequential/out/kernel"].rules == ("Columns('out/kernel', [0, 2])",)
    assert [r.rules for r in planned.rows] == [r.rules for r in rw.report().rows]
    assert planned.ops_before is None and "plan" in str(planned)
    with pytest.raises(gf.RuleError, match="hiden1"):
        gf.plan(model, "hiden1/*")


# ----------------------------------------------------------------------------- CLI


def test_cli_inspect_writes_every_output(tmp_path, capsys):
    outs = {k: str(tmp_path / f"r.{k}") for k in ("html", "dot", "json")}
    code = cli.main(["inspect", EXAMPLE, "--rule", "embedding/*", "--rule",
                     "Columns(encoder/kernel, 0:8)", "--rule", "Unfreeze(Rows(embedding/embeddings, 0,1))",
                     "--html", outs["html"], "--dot", outs["dot"], "--json", outs["json"],
                     "--tensorboard", str(tmp_path / "tb")])
    out = capsys.readouterr().out
    assert code == 0
    assert "sequential/embedding/embeddings  200x32   6336/6400" in out.replace("  ", "  ")
    assert "ops removed:" in out
    data = json.load(open(outs["json"]))
    assert data["report"]["totals"]["parameters_frozen"] == 6336 + 3 * 32 * 8
    assert open(outs["dot"]).read().startswith("digraph")
    assert os.path.isdir(tmp_path / "tb" / "rewritten")


def test_cli_uses_the_steps_own_rules(tmp_path, capsys):
    script = tmp_path / "frozen_step.py"
    script.write_text(
        "import keras, numpy as np, tensorflow as tf\nimport graphfreeze as gf\n"
        "model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name='d')])\n"
        "opt = keras.optimizers.SGD(0.1)\n"
        "@gf.freeze('d/kernel')\ndef step(x):\n"
        "    with tf.GradientTape() as t:\n        loss = tf.reduce_sum(model(x))\n"
        "    g = t.gradient(loss, model.trainable_variables)\n"
        "    opt.apply_gradients(zip(g, model.trainable_variables))\n    return loss\n"
        "example_args = (np.ones((4, 3), 'float32'),)\n")
    assert cli.main(["inspect", str(script), "--fn", "step"]) == 0
    assert "'d/kernel'" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["inspect", "no/such/script.py", "--rule", "x"], "no such script"),
    (["inspect", EXAMPLE, "--fn", "nope", "--rule", "x"], "defines no function 'nope'"),
    (["inspect", EXAMPLE, "--rule", "Rows(embedding/embeddings)"], "cannot parse rule"),
    (["inspect", EXAMPLE, "--rule", "Columns(encoder/kernel, a:b)"], "cannot read indices"),
    (["inspect", EXAMPLE, "--rule", "encodr/*"], "matches no variable"),
    (["inspect", EXAMPLE], "no rules"),
    (["demo", "nope"], "unknown scenario"),
])
def test_cli_bad_input_is_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_help_everywhere():
    for argv in (["--help"], ["demo", "--help"], ["inspect", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
    script = os.path.join(os.path.dirname(sys.executable), "graphfreeze")  # the console script
    out = subprocess.run([script, "inspect", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "example_args" in out.stdout


def test_cli_demo_runs_a_scenario(capsys):
    assert cli.main(["demo", "seed004_keep_output_constant"]) == 0
    assert "hold their claims" in capsys.readouterr().out


# ----------------------------------------------------------------------------- large graphs


@pytest.mark.slow
def test_resnet50_picture_is_collapsed_and_legible(tmp_path):
    import pydot
    model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=5)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32")
    y = np.array([1, 3], "int32")
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)  # the whole traced step, frozen updates included
    rw = gf.rewrite(make_step(model, optimizer, keras.losses.SparseCategoricalCrossentropy()),
                    ["*", gf.Unfreeze(model.layers[-1])], x, y)
    assert rw.original_graph.number_of_nodes() > 14000
    pic = rw.picture()
    assert pic.collapsed and len(pic.boxes) <= 40
    blocks = [k for k in pic.boxes if "conv4_block" in k and not k.startswith("gradient_tape")]
    assert len(blocks) == 6, blocks  # one box per residual block of stage 4
    (graph,) = pydot.graph_from_dot_data(rw.to_dot())
    assert len(graph.get_nodes()) > 10
    html_path = rw.to_html(str(tmp_path / "resnet.html"))
    if CHROMIUM:
        _screenshot_has_table_and_picture(html_path, tmp_path)
