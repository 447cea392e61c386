"""Report.summary() and the by-layer table (issue 15 item 5), counted independently from
the model's trainable weights and their shapes."""

from __future__ import annotations

import keras
import numpy as np
from conftest import batches, make_step, mlp

import graphfreeze as gf

DATA = batches(1, (16, 6), (16, 3))


def _line(trainable, total):
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: " \
           f"{100 * trainable / total:.4f}"


def test_summary_counts_trainable_entries_of_partial_rules():
    model = mlp()
    rw = gf.rewrite(make_step(model, keras.optimizers.Adam()),
                    ["hidden1/*", gf.Rows("hidden2/kernel", [0, 1]), gf.Scale("out/*", 0.5)], *DATA[0])
    total = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    h1 = model.get_layer("hidden1")
    frozen = sum(int(np.prod(v.shape)) for v in h1.trainable_weights) + 2 * model.get_layer("hidden2").units
    assert rw.report().summary() == _line(total - frozen, total)


def test_summary_leaves_batchnorm_statistics_out_and_plan_agrees():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="d1"),
                              keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(3, name="d2")])
    rules = ["*", gf.Unfreeze("d2/*")]
    rw = gf.rewrite(make_step(model, keras.optimizers.SGD(0.1)), rules, *DATA[0])
    total = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    trainable = sum(int(np.prod(v.shape)) for v in model.get_layer("d2").trainable_weights)
    assert rw.report().summary() == _line(trainable, total)
    assert gf.plan(model, *rules).summary() == _line(trainable, total)


def test_small_reports_keep_one_row_per_variable_and_layers_on_request():
    model = mlp()
    rw = gf.rewrite(make_step(model, keras.optimizers.Adam()), ["hidden1/*", "out/bias"], *DATA[0])
    text = str(rw.report())
    assert "sequential/hidden1/kernel" in text and "sequential/out/bias" in text
    by_layer = str(rw.report(detail="layers")).splitlines()
    row = next(line for line in by_layer if line.startswith("sequential/hidden1 "))
    assert row.split()[1:3] == ["2", "84/84"]
    assert not any("hidden1/kernel" in line for line in by_layer)
    assert "report(detail='variables')" in by_layer[-4] or any(
        "report(detail='variables')" in line for line in by_layer)


def test_large_model_collapses_by_layer_by_default():
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=4)
    report = gf.plan(model, "*", gf.Unfreeze("predictions/*"))
    frozen_layers = [layer for layer in model.layers if layer.weights and layer.name != "predictions"]
    names = {layer.name for layer in frozen_layers}
    lines = str(report).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    table = lines[header + 2:]
    assert [line.split()[0] for line in table[:len(frozen_layers)]] == [
        layer.name for layer in frozen_layers]
    assert len(lines) < len(frozen_layers) + 12
    rows = [line for line in table if line.split()[0] in names]
    assert [int(line.split()[1]) for line in rows] == [len(layer.weights) for layer in frozen_layers]
    per_variable = str(report.with_detail("variables")).splitlines()
    assert len(report.rows) == sum(len(layer.weights) for layer in frozen_layers)
    assert sum(line.split()[0].split("/")[0] in names for line in per_variable if line) == len(report.rows)
    total = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    head = sum(int(np.prod(v.shape)) for v in model.get_layer("predictions").trainable_weights)
    assert report.summary() == _line(head, total)
