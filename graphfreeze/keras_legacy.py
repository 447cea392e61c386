"""`gf.keras.freeze` for tf_keras (Keras 2) models.

tf_keras builds its train function differently from Keras 3: a `tf.function` over the
iterator whose closure holds `step_function(model, iterator)`, which reads the batch with
`next(iterator)` and runs `strategy.run(run_step, (data,))` (`run_step` being
`model.train_step` plus the model's `_train_counter` increment, jit-compiled when the model
is). That step is rebuilt inside `step_function` on every trace, so there is no per-step
function to swap. graphfreeze swaps `step_function` itself for one that reads the batch and
hands it to a per-step function it can rewrite: tf_keras's own `step_function`, fed the
batch through a one-item iterator. Everything tf_keras does per step (the strategy, the
counter, XLA) stays inside the rewritten trace; the loop over `steps_per_execution` stays
in tf_keras's function around it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from .discovery import closure_cell
from .errors import FreezeError, RuleError, UnsupportedGraphError
from .variables import resource_variable

_LEGACY_STEP = "step_function"  # the closure variable tf_keras's train function calls


def keras_package(model: Any) -> str:
    """The Keras package a model belongs to, with its version: 'keras 3.15.1', 'tf_keras 2.21.0'."""
    package = type(model).__module__.split(".")[0]
    try:
        version = getattr(importlib.import_module(package), "__version__", "unknown")
    except ImportError:  # pragma: no cover - the model's own package is imported
        version = "unknown"
    return f"{package} {version}"


def is_tf_keras_model(model: Any) -> bool:
    """A model built with tf_keras (also what `tf.keras` is under TF_USE_LEGACY_KERAS=1)."""
    return any(cls.__module__.startswith("tf_keras.") for cls in type(model).__mro__)


class _OneBatch:
    """The iterator tf_keras's `step_function` reads its batch from, holding one batch."""

    def __init__(self, data: Any):
        self.data = data

    def __iter__(self) -> _OneBatch:
        return self

    def __next__(self) -> Any:
        return self.data


class _RoutedStep:
    """Stands in for tf_keras's `step_function(model, iterator)`: reads the batch, runs the
    rewritten per-step function on it."""

    def __init__(self, keras_step: Callable, frozen: Any):
        self.keras_step = keras_step
        self.frozen = frozen

    @tf.autograph.experimental.do_not_convert
    def __call__(self, model: Any, iterator: Any) -> Any:
        return self.frozen(next(iterator))


def _is_step_function(value: Any) -> bool:
    return isinstance(value, _RoutedStep) or getattr(value, "__name__", "") == _LEGACY_STEP


def route(model: Any, make_step: Callable[[Callable], Any]) -> Any:
    """Build the model's train function as tf_keras does, then route its per-step work
    through `make_step(one_step_on_data)` (a FrozenFunction). Returns that step."""
    function = type(model).make_train_function(model, force=True)
    cell = closure_cell(function, _is_step_function)
    if cell is None:
        model.train_function = None
        raise UnsupportedGraphError(
            f"cannot find the per-step function ({_LEGACY_STEP}) in the train function "
            f"{keras_package(model)} builds for {type(model).__name__} {model.name!r}; "
            "gf.keras supports the train functions of Keras 3 and tf_keras (tested: 2.21). Use "
            "@gf.freeze on a custom training step instead.")
    keras_step = cell.cell_contents
    if isinstance(keras_step, _RoutedStep):
        keras_step = keras_step.keras_step

    def one_step_on_data(data: Any) -> Any:
        return keras_step(model, _OneBatch(data))

    frozen = make_step(one_step_on_data)
    checked = _Checked(frozen, model)
    cell.cell_contents = _RoutedStep(keras_step, checked)
    model.train_function = _surface_freeze_errors(model.train_function, checked)
    return frozen


class _Checked:
    """Runs the rewritten step after checking that no rule froze tf_keras's own counters.

    Optimizer counters are recognised from the graph (state_roles), so a glob such as '*'
    never matches tf_keras's iteration count or learning rate. This is the safety net for
    a counter that recognition misses: freezing it would silently stop Adam's bias
    correction or a learning-rate schedule, so refuse it by name instead.
    """

    def __init__(self, frozen: Any, model: Any):
        self.frozen = frozen
        self.model = model
        self.error: FreezeError | None = None  # raised while tf_keras traced its function

    @tf.autograph.experimental.do_not_convert
    def __call__(self, *args: Any) -> Any:
        try:
            rewritten = self.frozen.rewritten(*args)
            _check_model_state_only(rewritten, self.frozen.rules, self.model)
        except FreezeError as e:
            self.error = e
            raise
        self.frozen.latest = rewritten
        return rewritten(*args)


def _surface_freeze_errors(train_function: Callable, checked: _Checked) -> Callable:
    """tf_keras's train function is converted by autograph, which re-raises an exception
    it cannot rebuild (a `RuleError` is also a `ValueError`) as a `StagingError`, or folds
    it into a message of its own (a loop over `steps_per_execution`). The graphfreeze error
    was raised while tracing, before anything ran: raise it as it was."""

    @functools.wraps(train_function)
    def function(*args: Any) -> Any:
        checked.error = None
        try:
            return train_function(*args)
        except FreezeError:
            raise
        except Exception:
            if checked.error is None:
                raise
            raise checked.error.with_traceback(None) from None

    return function


def _check_model_state_only(rewritten: Any, rules: list, model: Any) -> None:
    weights = {id(resource_variable(v)) for v in model.variables}
    named = {id(resource_variable(r.target)) for r in rules if resource_variable(r.target) is not None}
    stray = [vf for vf in rewritten.plan.freezes
             if id(vf.variable.variable) not in weights and id(vf.variable.variable) not in named]
    if stray:
        vf = stray[0]
        raise RuleError(
            f"rule(s) {', '.join(vf.rules)} froze {vf.variable.path!r}, which is not a weight "
            f"of {model.name!r} but a counter of {keras_package(model)} (its optimizer's "
            "iteration count or learning rate, or the model's batch counter) that graphfreeze "
            "did not recognise as training state. Name the layers to freeze "
            "instead of '*' (e.g. gf.keras.freeze(model, *model.layers[:-1])), or use Keras 3.")
