"""Keras-version differences `gf.keras` must bridge, kept apart from keras.py.

`gf.keras` rewrites the per-step function of the train function Keras builds: since Keras
3.7 that is `one_step_on_data(data)`, which runs `strategy.run(train_step)` and reduces the
replicas' results (`TensorFlowTrainer._make_function`). Keras 3.0-3.6 build
`tf.function(one_step_on_iterator)` (or `multi_step_on_iterator`), which takes the iterator
and calls `strategy.run(one_step_on_data, (next(iterator),))`: there `one_step_on_data` is
the per-REPLICA step, and no function of one batch holds the run over replicas and its
reduction (rewriting the per-replica step would nest the rewrite inside `strategy.run`,
where replicas cannot be synchronised). For those versions `use_keras37_step` builds the
same iterator loop around the Keras 3.7 per-step function, over the model's own
`train_step` and the installed Keras's own reduction, so both generations hand graphfreeze
the same kind of step.
"""

from __future__ import annotations

import inspect
from typing import Any

# The names Keras 3.0-3.6 give the Python function of the train function they build.
_LEGACY_TRAIN_FUNCTIONS = ("one_step_on_iterator", "multi_step_on_iterator")


def use_keras37_step(model: Any) -> None:
    """Replace a Keras 3.0-3.6 train function Keras just built for `model` with one that
    calls a Keras 3.7-style `one_step_on_data`; leave any other train function alone."""
    built = getattr(model.train_function, "python_function", model.train_function)
    if getattr(built, "__name__", "") not in _LEGACY_TRAIN_FUNCTIONS:
        return
    trainer_module = inspect.unwrap(built).__globals__  # beneath autograph's decorator
    model.train_function = _train_function(model, trainer_module["reduce_per_replica"])


def _train_function(model: Any, reduce_per_replica: Any) -> Any:
    """The Keras 3.0-3.6 loop (`next(iterator)`, `steps_per_execution` times per call)
    around Keras 3.7's per-step function."""
    import tensorflow as tf

    strategy = model.distribute_strategy
    if getattr(model, "_distribute_strategy", None) is not None and model.optimizer is not None \
            and not model.optimizer.built and model.built:
        # Keras 3.7+ build the optimizer before fit under a strategy; 3.0-3.6 do it in the
        # first traced step, where mirrored slots cannot be created inside graphfreeze's trace.
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)

    @tf.autograph.experimental.do_not_convert
    def one_step_on_data(data):
        outputs = strategy.run(model.train_step, args=(data,))
        return reduce_per_replica(outputs, strategy, reduction="auto")

    if not model.run_eagerly:
        traced_step = tf.function(one_step_on_data, reduce_retracing=True,
                                  jit_compile=model.jit_compile)

        # Keras 3.15 hands its tf.function over inside a plain function of the same name
        # (`_autoconvert_optionals`), so the step graphfreeze traces is a thin wrapper that
        # calls the step's body; wrapping it the same way gives both trainers one program
        # layout (the same bodies in the report, the diff and the pictures).
        @tf.autograph.experimental.do_not_convert
        def one_step_on_data(data):
            return traced_step(data)

    @tf.autograph.experimental.do_not_convert
    def one_step_on_iterator(iterator):
        for _ in range(model.steps_per_execution):
            outputs = one_step_on_data(next(iterator))
        return outputs

    if model.run_eagerly:
        return one_step_on_iterator
    return tf.function(one_step_on_iterator, reduce_retracing=True)
