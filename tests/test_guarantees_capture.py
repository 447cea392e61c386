"""Guarantees that hold on training code as users write it (issue 13, capture side).

* Optimizer, metric and RNG state are recognised wherever the Python objects live.
* Gradients taken without `tape.gradient` (tf.gradients, persistent and nested tapes,
  jacobians, gradients of gradients) get the same guarantees, or a FreezeError.
* What the rewrite cannot see (Python ops, custom gradients in forward mode, gradients it
  cannot mark) is refused by name.
* Two optimizers in one step.

References are Keras `trainable=False` twins trained side by side, and bitwise equality.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_models, batches, mlp, snapshot, twin

import graphfreeze as gf

SIZES = (6, 12, 10, 8, 3)
DATA = batches(4, (16, 6), (16, 3))
FROZEN = "hidden2"   # trainable layers on both sides of it
CLIP = 0.05          # small enough that global-norm clipping is active on every step
MSE = keras.losses.MeanSquaredError()


def _model():
    return mlp(SIZES)


def _frozen_slots(optimizer):
    return {v.path: v for v in optimizer.variables if f"_{FROZEN}_" in v.path}


def _assert_matches_trainable_false(make_step, steps=3, reference_step=None):
    """Rewrite `make_step(model, optimizer)` with the FROZEN layer frozen and compare it
    with the same step (or `reference_step`) on a twin whose FROZEN layer has
    `trainable=False`: every variable, the loss, the frozen layer bitwise, and its
    optimizer slots untouched."""
    model = _model()
    reference = twin(model, _model)
    reference.get_layer(FROZEN).trainable = False
    opt, ref_opt = keras.optimizers.Adam(1e-2), keras.optimizers.Adam(1e-2)
    # Built before freezing, so the frozen layer has slots that must stay untouched (an
    # unbuilt optimizer gets none for it: tests/test_optimizer_memory.py).
    opt.build(model.trainable_variables)
    rw = gf.rewrite(make_step(model, opt), [f"{FROZEN}/*"], *DATA[0])
    ref_step = tf.function((reference_step or make_step)(reference, ref_opt))
    frozen_before = snapshot(model.get_layer(FROZEN).variables)
    slots_before = snapshot(_frozen_slots(opt).values())
    assert slots_before, "the optimizer has slots for the frozen layer"
    for x, y in DATA[:steps]:
        np.testing.assert_allclose(rw(x, y).numpy(), ref_step(x, y).numpy(), rtol=1e-5, atol=1e-6)
    assert_close_models(model, reference)
    for path, value in snapshot(model.get_layer(FROZEN).variables).items():
        assert np.array_equal(value, frozen_before[path]), f"{path} moved"
    for path, value in snapshot(_frozen_slots(opt).values()).items():
        assert np.array_equal(value, slots_before[path]), f"slot {path} was touched"
    return rw


def _clipped(grads):
    return tf.clip_by_global_norm(grads, CLIP)[0]


# --------------------------------------------------------------------------- item 4


def _tf_gradients_step(model, optimizer):
    def train_step(x, y):
        loss = MSE(y, model(x, training=True))
        variables = model.trainable_variables
        grads = tf.gradients(loss, variables)
        optimizer.apply_gradients(zip(_clipped(grads), variables))
        return loss
    return train_step


def _persistent_tape_step(model, optimizer):
    """Two losses, one persistent tape, two gradient calls: a gradient taken twice."""
    def train_step(x, y):
        with tf.GradientTape(persistent=True) as tape:
            out = model(x, training=True)
            loss = MSE(y, out)
            aux = 0.1 * tf.reduce_mean(tf.square(out))
        variables = model.trainable_variables
        main, extra = tape.gradient(loss, variables), tape.gradient(aux, variables)
        del tape
        optimizer.apply_gradients(zip(_clipped([a + b for a, b in zip(main, extra)]), variables))
        return loss
    return train_step


def _two_tapes_step(model, optimizer):
    def train_step(x, y):
        with tf.GradientTape() as tape_a:
            loss = MSE(y, model(x, training=True))
        with tf.GradientTape() as tape_b:
            aux = 0.1 * tf.reduce_mean(tf.square(model(x * 0.5, training=True)))
        variables = model.trainable_variables
        grads = [a + b for a, b in zip(tape_a.gradient(loss, variables),
                                       tape_b.gradient(aux, variables))]
        optimizer.apply_gradients(zip(_clipped(grads), variables))
        return loss
    return train_step


def _gradient_penalty_step(model, optimizer):
    """A gradient of a gradient: the loss penalises the parameters' gradient norm."""
    def train_step(x, y):
        variables = model.trainable_variables
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = MSE(y, model(x, training=True))
            grads = inner.gradient(loss, variables)
            total = loss + 0.1 * tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads])
        optimizer.apply_gradients(zip(_clipped(outer.gradient(total, variables)), variables))
        return loss
    return train_step


def _jacobian_step(use_pfor):
    def make(model, optimizer):
        def train_step(x, y):
            with tf.GradientTape() as tape:
                per_example = tf.reduce_mean(tf.square(model(x, training=True) - y), axis=1)
            variables = model.trainable_variables
            jac = tape.jacobian(per_example, variables, experimental_use_pfor=use_pfor)
            grads = [tf.reduce_mean(j, axis=0) for j in jac]
            optimizer.apply_gradients(zip(_clipped(grads), variables))
            return tf.reduce_mean(per_example)
        return train_step
    return make


@pytest.mark.parametrize("make_step", [
    _tf_gradients_step, _persistent_tape_step, _two_tapes_step, _gradient_penalty_step,
], ids=["tf.gradients", "persistent_tape", "two_tapes", "gradient_of_gradient"])
def test_gradients_taken_any_way_equal_trainable_false(make_step):
    """The frozen gradient is zero everywhere it is used (the clipping norm included), its
    slots are untouched, and the rest trains exactly as with Keras trainable=False."""
    rw = _assert_matches_trainable_false(make_step)
    assert rw.report().mode == "training step"


def test_jacobian_in_a_loop_equals_trainable_false():
    """tape.jacobian(..., experimental_use_pfor=False) takes one marked tape.gradient per
    row inside a while loop; the reference vectorises (the default pfor)."""
    _assert_matches_trainable_false(_jacobian_step(False), steps=2, reference_step=_jacobian_step(True))


def _per_example_step(vectorized):
    """DP-SGD's shape: per-example gradients, each clipped to a global norm, averaged."""
    def make(model, optimizer):
        def train_step(x, y):
            variables = model.trainable_variables

            def per_example(example):
                xi, yi = example
                with tf.GradientTape() as tape:
                    loss = MSE(yi[None], model(xi[None], training=True))
                return _clipped(tape.gradient(loss, variables))

            spec = [tf.TensorSpec(v.shape, v.dtype) for v in variables]
            grads = tf.vectorized_map(per_example, (x, y)) if vectorized else \
                tf.map_fn(per_example, (x, y), fn_output_signature=spec)
            optimizer.apply_gradients(zip([tf.reduce_mean(g, 0) for g in grads], variables))
            return MSE(y, model(x))
        return train_step
    return make


def test_per_example_gradients_in_map_fn_equal_trainable_false():
    """tf.map_fn runs one marked tape.gradient per example in a while loop; the reference
    vectorises the same computation (tf.vectorized_map)."""
    _assert_matches_trainable_false(_per_example_step(False), steps=2,
                                    reference_step=_per_example_step(True))


def test_vectorized_jacobian_is_refused_by_name():
    model = _model()
    step = _jacobian_step(True)(model, keras.optimizers.Adam(1e-2))
    before = snapshot(model.variables)
    with pytest.raises(gf.UnsupportedGraphError,
                       match=r"GradientTape\.jacobian.*experimental_use_pfor=False"):
        gf.rewrite(step, [f"{FROZEN}/*"], *DATA[0])
    assert all(np.array_equal(v, before[p]) for p, v in snapshot(model.variables).items())


def test_vectorized_map_of_gradients_is_refused_by_name():
    step = _per_example_step(True)(_model(), keras.optimizers.SGD(0.1))
    with pytest.raises(gf.UnsupportedGraphError, match=r"tf\.vectorized_map .*tf\.map_fn"):
        gf.rewrite(step, [f"{FROZEN}/*"], *DATA[0])


# --------------------------------------------------------------------------- item 3

MODULE_OPTIMIZER: dict = {}  # a module global the step names


def _bn_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8, name="d1"),
        keras.layers.BatchNormalization(name="bn"), keras.layers.Dropout(0.2, name="drop"),
        keras.layers.Dense(3, name="out")])


def _kept(where, model, make_optimizer):
    """A training step whose optimizer (and loss metric) live in `where`, and a getter."""
    if where == "module_global":
        MODULE_OPTIMIZER["opt"] = make_optimizer()

        def get():
            return MODULE_OPTIMIZER["opt"]
    elif where == "closure":
        optimizer = make_optimizer()

        def get():
            return optimizer
    else:
        holder = {"dict": {"adam": make_optimizer()}, "list": [make_optimizer()]}.get(where)
        if where == "trainer_dict":
            holder = type("Trainer", (), {})()
            holder.optimizers = {"backbone": make_optimizer()}

        def get():
            if where == "dict":
                return holder["adam"]
            if where == "list":
                return holder[0]
            return holder.optimizers["backbone"]
    metrics = {"loss": keras.metrics.Mean(name="loss_tracker")}

    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = MSE(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        get().apply_gradients(zip(grads, model.trainable_variables))
        metrics["loss"].update_state(loss)
        return loss

    return train_step, get, metrics["loss"]


@pytest.mark.parametrize("where", ["dict", "list", "trainer_dict", "module_global", "closure"])
def test_globs_never_match_optimizer_or_metric_state_wherever_kept(where):
    model = _bn_model()
    reference = twin(model, _bn_model)
    for layer in reference.layers[:-1]:
        layer.trainable = False
    step, optimizer, metric = _kept(where, model, lambda: keras.optimizers.Adam(1e-2))
    ref_step, ref_optimizer, _ = _kept("closure", reference, lambda: keras.optimizers.Adam(1e-2))
    # Keras runs a BatchNormalization with trainable=False in inference mode.
    rw = gf.rewrite(step, ["*", gf.Unfreeze("out/*")], *DATA[0], batchnorm_inference=True)
    frozen = set(rw.report().frozen)
    assert frozen == {v.path for v in model.weights if not v.path.startswith("sequential/out")}
    assert {"sequential/bn/moving_mean", "sequential/bn/moving_variance"} <= frozen
    lr = float(optimizer().learning_rate.numpy())
    seed = next(v for v in model.variables if "seed_generator_state" in v.path)
    seed_before = seed.numpy().copy()
    ref_step = tf.function(ref_step)
    for x, y in DATA[:3]:  # both dropouts draw the same masks: equal seeds, same calls
        np.testing.assert_allclose(rw(x, y).numpy(), ref_step(x, y).numpy(), rtol=1e-5)
    assert int(optimizer().iterations.numpy()) == 3
    assert float(optimizer().learning_rate.numpy()) == lr
    assert float(metric.count.numpy()) == 3 and float(metric.total.numpy()) > 0
    assert not np.array_equal(seed.numpy(), seed_before), "dropout must keep drawing new masks"
    assert_close_models(model, reference)


class PlainMomentum:
    """A hand-written optimizer over plain tf.Variables: a learning rate, a step counter,
    one momentum slot per variable, bias-corrected like Adam's first moment."""

    def __init__(self, variables, learning_rate=0.05, beta=0.9):
        self.learning_rate = tf.Variable(learning_rate, trainable=False, name="plain/lr")
        self.step = tf.Variable(0.0, trainable=False, name="plain/step")
        self.beta = beta
        self.slots = {v.path: tf.Variable(tf.zeros(v.shape), trainable=False,
                                          name="plain/" + v.path.replace("/", "_"))
                      for v in variables}

    def apply(self, grads, variables):
        self.step.assign_add(1.0)
        correction = 1.0 - tf.pow(self.beta, self.step)
        for g, v in zip(grads, variables):
            m = self.slots[v.path]
            m.assign(self.beta * m + (1.0 - self.beta) * g)
            v.assign_sub(self.learning_rate * m / correction)


def _plain_step(model, optimizers):
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = MSE(y, model(x, training=True))
        variables = model.trainable_variables
        optimizers["main"].apply(tape.gradient(loss, variables), variables)
        return loss
    return train_step


def test_plain_tf_optimizer_in_a_dict_is_recognised_from_the_graph():
    """No Keras object says what these variables are: the graph does (slots are written
    from gradients, the counter adds a constant, the learning rate scales the update)."""
    model = _model()
    reference = twin(model, _model)
    for layer in reference.layers[:-1]:
        layer.trainable = False
    optimizers = {"main": PlainMomentum(model.trainable_variables)}
    rw = gf.rewrite(_plain_step(model, optimizers), ["*", gf.Unfreeze("out/*")], *DATA[0])
    assert set(rw.report().frozen) == {v.path for v in model.weights
                                       if not v.path.startswith("sequential/out")}
    ref_step = tf.function(_plain_step(reference, {"main": PlainMomentum(reference.trainable_variables)}))
    for x, y in DATA[:3]:
        np.testing.assert_allclose(rw(x, y).numpy(), ref_step(x, y).numpy(), rtol=1e-5)
    assert float(optimizers["main"].step.numpy()) == 3
    assert_close_models(model, reference)
    frozen_slots = [m for p, m in optimizers["main"].slots.items() if "/out/" not in p]
    assert all(not m.numpy().any() for m in frozen_slots), "frozen slots must stay untouched"


@pytest.mark.parametrize("make_optimizer", [
    lambda: keras.optimizers.Adam(1e-2),
    lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    lambda: keras.optimizers.AdamW(1e-2, use_ema=True, ema_overwrite_frequency=2),
    lambda: keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2),
    lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05)),
], ids=["Adam", "SGD_momentum", "AdamW_ema", "accumulation", "LossScaleOptimizer"])
def test_keras_optimizer_state_is_recognised_from_the_graph_alone(make_optimizer, monkeypatch):
    """Even with the search for live Keras objects switched off, the graph tells every
    optimizer variable (slots, counters, learning rate, loss scale, EMA) from the model's."""
    from graphfreeze import discovery
    monkeypatch.setattr(discovery, "live_keras_state", lambda unexplained: [])
    model = _bn_model()
    optimizers = {"main": make_optimizer()}

    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = optimizers["main"].scale_loss(MSE(y, model(x, training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizers["main"].apply_gradients(zip(grads, model.trainable_variables))
        return loss

    rw = gf.rewrite(train_step, ["*", gf.Unfreeze("out/*")], *DATA[0])
    assert set(rw.report().frozen) == {v.path for v in model.weights
                                       if not v.path.startswith("sequential/out")}
    for x, y in DATA[:4]:
        rw(x, y)
    # The step counter still counts. Keras 3.3's LossScaleOptimizer counts on its inner
    # optimizer only (its own `iterations` stays 0 without graphfreeze too).
    optimizer = optimizers["main"]
    counters = [optimizer.iterations]
    if hasattr(optimizer, "inner_optimizer"):
        counters.append(optimizer.inner_optimizer.iterations)
    assert max(int(c.numpy()) for c in counters) > 0


# --------------------------------------------------------------------------- item 10 (part)


def _two_optimizer_step(model, backbone_opt, head_opt):
    """Per-group learning rates the classic way: one optimizer per group."""
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = MSE(y, model(x, training=True))
        backbone = [v for v in model.trainable_variables if "/out/" not in v.path]
        head = [v for v in model.trainable_variables if "/out/" in v.path]
        grads = tape.gradient(loss, backbone + head)
        backbone_opt.apply_gradients(zip(grads[:len(backbone)], backbone))
        head_opt.apply_gradients(zip(grads[len(backbone):], head))
        return loss
    return train_step


def test_two_optimizers_in_one_step_equal_trainable_false():
    model = _model()
    reference = twin(model, _model)
    reference.get_layer(FROZEN).trainable = False
    reference.get_layer("out").kernel.trainable = False

    def optimizers():
        return keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-2, weight_decay=0.01)

    (backbone_opt, head_opt), ref_opts = optimizers(), optimizers()
    rules = [f"{FROZEN}/*", "out/kernel"]  # one frozen variable in each group
    rw = gf.rewrite(_two_optimizer_step(model, backbone_opt, head_opt), rules, *DATA[0])
    assert set(rw.report().frozen) == {f"sequential/{FROZEN}/kernel", f"sequential/{FROZEN}/bias",
                                       "sequential/out/kernel"}
    ref_step = tf.function(_two_optimizer_step(reference, *ref_opts))
    frozen = [model.get_layer(FROZEN).kernel, model.get_layer(FROZEN).bias, model.get_layer("out").kernel]
    before = [v.numpy().copy() for v in frozen]
    for x, y in DATA:
        np.testing.assert_allclose(rw(x, y).numpy(), ref_step(x, y).numpy(), rtol=1e-5, atol=1e-6)
    assert_close_models(model, reference)
    assert all(np.array_equal(v.numpy(), b) for v, b in zip(frozen, before))
    assert int(backbone_opt.iterations.numpy()) == int(head_opt.iterations.numpy()) == len(DATA)


# --------------------------------------------------------------------------- item 6


def _step_with(model, optimizer, extra):
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = MSE(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        extra(x)
        return loss
    return train_step


def test_py_function_writing_a_frozen_kernel_is_refused_by_name():
    model = _model()
    kernel = model.get_layer(FROZEN).kernel

    def nudge(x):
        def python(_):
            kernel.assign_add(tf.ones_like(kernel))  # invisible in the graph
            return np.float32(0)
        tf.py_function(python, [x], tf.float32)

    step = _step_with(model, keras.optimizers.SGD(0.1), nudge)
    before = snapshot(model.variables)
    with pytest.raises(gf.UnsupportedGraphError, match=r"EagerPyFunc node .* runs Python.*allow_opaque=True"):
        gf.rewrite(step, [f"{FROZEN}/*"], *DATA[0])
    with pytest.raises(gf.UnsupportedGraphError, match="EagerPyFunc"):
        gf.freeze(f"{FROZEN}/*")(step)(*DATA[0])
    assert all(np.array_equal(v, before[p]) for p, v in snapshot(model.variables).items())


def test_opaque_ops_in_bodies_are_found_and_allowed_ops_are_reported():
    model = _model()
    seen = []

    def log_in_a_branch(x):
        def record(t):
            seen.append(float(t))
            return t
        tf.cond(tf.reduce_sum(x) > -1e9,
                lambda: tf.numpy_function(record, [tf.reduce_mean(x)], tf.float32),
                lambda: tf.constant(0.0))

    step = _step_with(model, keras.optimizers.SGD(0.1), log_in_a_branch)
    with pytest.raises(gf.UnsupportedGraphError, match=r"PyFunc node .* in function"):
        gf.rewrite(step, [f"{FROZEN}/*"], *DATA[0])
    rw = gf.rewrite(step, [f"{FROZEN}/*"], *DATA[0], allow_opaque=True)
    before = snapshot(model.get_layer(FROZEN).variables)
    rw(*DATA[0])
    assert seen, "the allowed Python op still runs"
    assert all(np.array_equal(v, before[p]) for p, v in snapshot(model.get_layer(FROZEN).variables).items())
    report = rw.report()
    assert len(report.opaque_ops) == 1 and report.opaque_ops[0].startswith("PyFunc node")
    assert "opaque ops allowed" in str(report) and report.to_dict()["opaque_ops"] == report.opaque_ops


class _NumpyLogger(keras.layers.Layer):
    def call(self, x):
        mean = tf.numpy_function(lambda t: t, [tf.reduce_mean(x)], tf.float32)
        return x + 0.0 * tf.ensure_shape(mean, ())

    def compute_output_shape(self, input_shape):
        return input_shape


def test_keras_fit_refuses_opaque_ops_unless_allowed():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="d1"),
                              _NumpyLogger(), keras.layers.Dense(3, name="out")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = DATA[0]
    gf.keras.freeze(model, "d1/*")
    with pytest.raises(gf.UnsupportedGraphError, match="PyFunc"):
        model.fit(x, y, epochs=1, verbose=0)
    gf.keras.freeze(model, "d1/*", allow_opaque=True)
    before = model.get_layer("d1").kernel.numpy().copy()
    model.fit(x, y, epochs=1, verbose=0)
    assert np.array_equal(model.get_layer("d1").kernel.numpy(), before)
    assert gf.keras.rewritten(model).report().opaque_ops


# --------------------------------------------------------------------------- item 5


def _forward_with(model, custom):
    def forward(x):
        h = custom(model.get_layer("hidden1")(x))
        for name in ("hidden2", "hidden3", "out"):
            h = model.get_layer(name)(h)
        return h
    return forward


def test_forward_custom_gradient_referring_to_its_trace_is_refused_at_rewrite():
    model = _model()

    @tf.custom_gradient
    def gated(x):
        def grad(dy):
            return dy * tf.sigmoid(x)  # x belongs to the original trace
        return tf.identity(x), grad

    with pytest.raises(gf.UnsupportedGraphError, match=r"tf\.custom_gradient .*IdentityN"):
        gf.rewrite(_forward_with(model, gated), [f"{FROZEN}/*"], DATA[0][0])


def test_forward_custom_gradient_of_its_arguments_works():
    """The caller's tape gets the custom gradient, and frozen weights no gradient."""
    model = _model()

    @tf.custom_gradient
    def clip_backward(x):
        def grad(dy):
            return tf.clip_by_value(dy, -1e-3, 1e-3)
        return tf.identity(x), grad

    forward = _forward_with(model, clip_backward)
    rw = gf.rewrite(forward, [f"{FROZEN}/*"], DATA[0][0])
    assert rw.report().mode == "forward function"
    x = DATA[0][0]
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(rw(x) ** 2)
    got = tape.gradient(loss, variables)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(forward(x) ** 2)
    expected = tape.gradient(loss, variables)
    for v, g, e in zip(variables, got, expected):
        if f"/{FROZEN}/" in v.path:
            assert g is None or not np.any(g.numpy()), f"{v.path} must get no gradient"
        else:
            np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-7, err_msg=v.path)


# --------------------------------------------------------------------------- item 7


def test_gradient_with_respect_to_tensors_is_refused_when_a_frozen_weight_is_written():
    """Keras 3's stateless style: gradients of tensors, not variables, cannot be masked."""
    model = _model()
    optimizer = keras.optimizers.Adam(1e-2)

    def train_step(x, y):
        trainable = [tf.convert_to_tensor(v) for v in model.trainable_variables]
        non_trainable = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            out, _ = model.stateless_call(trainable, non_trainable, x, training=True)
            loss = MSE(y, out)
        optimizer.apply(tape.gradient(loss, trainable), model.trainable_variables)
        return loss

    with pytest.raises(gf.UnsupportedGraphError,
                       match=rf"frozen trainable variable 'sequential/{FROZEN}/kernel' is written"):
        gf.rewrite(train_step, [f"{FROZEN}/*"], *DATA[0])


def test_forward_function_that_updates_weights_is_refused():
    """Gradients computed elsewhere and passed in: no gradient to mark, so not forward mode."""
    model = _model()
    optimizer = keras.optimizers.SGD(0.1)
    variables = model.trainable_variables

    def apply(grads):
        optimizer.apply_gradients(zip(grads, variables))

    grads = [tf.ones_like(v) for v in variables]
    with pytest.raises(gf.UnsupportedGraphError, match="takes no gradient graphfreeze can mark"):
        gf.rewrite(apply, [f"{FROZEN}/*"], grads)


def _refusal_of(grads_for):
    from graphfreeze.capture import _MarkerRecorder
    model = _model()
    recorder = _MarkerRecorder()

    @tf.function
    def traced():
        variables = model.trainable_variables
        recorder.mark(variables, grads_for(variables), "a gradient call")
        return tf.constant(0.0)

    traced.get_concrete_function()
    return str(recorder.refusal)


def test_gradients_that_cannot_be_matched_to_variables_are_refused():
    """The marker refuses a structure or a gradient type it does not expect instead of
    passing the gradient through unmasked."""
    assert "returned 7 gradients for 8 sources" in _refusal_of(
        lambda vs: [tf.zeros_like(v) for v in vs[:-1]])
    assert "returned a RaggedTensor as the gradient of variable 'sequential_1/hidden1/kernel'" in \
        _refusal_of(lambda vs: [tf.RaggedTensor.from_row_lengths([1.0], [1])] + [None] * (len(vs) - 1))
