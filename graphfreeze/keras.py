"""Keras integration: `model.fit` with freeze rules.

`gf.keras.freeze(model, *rules)` lets Keras build its train function exactly as usual
(callbacks, metrics, validation, `steps_per_execution`, `jit_compile`, distribution
strategies all untouched) and then hands the per-step function inside it to graphfreeze:
the `one_step_on_data` tf.function, which runs `strategy.run(model.train_step)` and
reduces the per-replica results. That whole function is traced and rewritten by the same
passes as `gf.freeze`, once per input signature, so every replica and collective of a
distributed step is in one trace (rewriting `train_step` alone would nest a tf.function
inside `strategy.run`, where tf.distribute cannot synchronise replicas).

Nothing about the model's layers, variables or `trainable` flags changes, so saved files
are ordinary Keras files, and there is no "recompile for trainable=False to take effect"
trap: rules apply from the next `fit` or `train_on_batch`, whether `compile` came before
or after, and changing them needs no recompilation.

    >>> gf.keras.freeze(model, "*", gf.Unfreeze(model.layers[-1]), batchnorm_inference=True)
    >>> model.fit(dataset, epochs=3)                                     # doctest: +SKIP
    >>> print(gf.keras.rewritten(model).report())                        # doctest: +SKIP
    >>> gf.keras.unfreeze(model)                                         # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from ._keras_compat import use_keras37_step
from .api import FrozenFunction
from .dryrun import plan
from .errors import RuleError, UnsupportedGraphError
from .rewritten import Rewritten
from .rules import RuleLike, as_rule
from .variables import is_keras_model

_STEP_FUNCTION = "one_step_on_data"  # the per-step function Keras's train function calls


def _check_model(model: Any) -> None:
    if not is_keras_model(model):
        raise RuleError(f"gf.keras.freeze needs a Keras Model, got {type(model).__name__}; "
                        "for a custom training step use @gf.freeze on the step.")


def _step_cell(function: Any) -> Any:
    """The closure cell, somewhere inside Keras's train function, holding its per-step
    function (a tf.function, or a plain function when run_eagerly=True)."""
    pending, seen = [function], set()
    while pending:
        fn = pending.pop()
        if id(fn) in seen or not hasattr(fn, "__closure__") or fn.__closure__ is None:
            continue
        seen.add(id(fn))
        for cell in fn.__closure__:
            value = cell.cell_contents
            body = getattr(value, "python_function", value)
            if getattr(body, "__name__", "") == _STEP_FUNCTION or isinstance(value, FrozenFunction):
                return cell
            if callable(value) and hasattr(value, "__closure__"):
                pending.append(value)
    return None


class _Routing:
    """Per-model state: the rules, and Keras's own make_train_function to build with."""

    def __init__(self, model: Any, rules: list, batchnorm_inference: bool):
        self.model = model
        self.rules = rules
        self.batchnorm_inference = batchnorm_inference
        self.step: FrozenFunction | None = None

    def make_train_function(self, force: bool = False) -> Any:
        model = self.model
        if model.train_function is not None and not force:
            return model.train_function
        type(model).make_train_function(model, force=True)  # Keras builds it as usual
        use_keras37_step(model)  # Keras 3.0-3.6: see _keras_compat.py
        cell = _step_cell(getattr(model.train_function, "python_function", model.train_function))
        if cell is None:
            model.train_function = None
            raise UnsupportedGraphError(
                f"cannot find the per-step function ({_STEP_FUNCTION}) in the train function "
                f"this Keras version ({_keras_version()}) builds; gf.keras supports the Keras 3 "
                "TensorFlow trainer. Use @gf.freeze on a custom training step instead.")
        inner = cell.cell_contents
        if isinstance(inner, FrozenFunction):
            inner = inner.python_function
        self.step = FrozenFunction(inner, self.rules, batchnorm_inference=self.batchnorm_inference)
        cell.cell_contents = self.step
        return model.train_function


def _keras_version() -> str:
    import keras
    return getattr(keras, "__version__", "unknown")


def _routing(model: Any) -> _Routing | None:
    bound = getattr(model, "__dict__", {}).get("make_train_function")
    owner = getattr(bound, "__self__", None)
    return owner if isinstance(owner, _Routing) else None


def freeze(model: Any, *rules: RuleLike, batchnorm_inference: bool = False) -> Any:
    """Make `fit` and `train_on_batch` honour `rules`; returns the same model.

    Rules are resolved against the model's variables now, so a rule that matches nothing
    raises `RuleError` here rather than at the first batch. Calling it again replaces the
    rules (effective at the next `fit`, no recompiling).

    >>> model = gf.keras.freeze(model, "encoder/*", gf.Rows("embedding/embeddings", ids))  # doctest: +SKIP
    """
    _check_model(model)
    checked = [as_rule(r) for r in rules]
    if not checked:
        raise RuleError("gf.keras.freeze needs at least one rule; use gf.keras.unfreeze(model) "
                        "to train everything.")
    plan(model, *checked)  # resolve against the model's variables: errors surface now
    routing = _Routing(model, checked, batchnorm_inference)
    # Bypass Keras's attribute tracking: this is routing, not model state, and must never
    # reach a saved config.
    object.__setattr__(model, "make_train_function", routing.make_train_function)
    model.train_function = None  # rebuilt (and rerouted) by the next fit / train_on_batch
    return model


def unfreeze(model: Any) -> Any:
    """Remove the rules: the next `fit` trains everything again. Returns the model."""
    _check_model(model)
    if _routing(model) is not None:
        object.__delattr__(model, "make_train_function")
        model.train_function = None
    return model


def frozen_step(model: Any) -> FrozenFunction | None:
    """The graphfreeze step a frozen model trains with (after its first fit), or None."""
    routing = _routing(model)
    return routing.step if routing is not None else None


def rules(model: Any) -> list:
    """The rules a model is frozen with (empty when it is not)."""
    routing = _routing(model)
    return list(routing.rules) if routing is not None else []


def rewritten(model: Any) -> Rewritten | None:
    """The most recent rewrite of the model's train step (for `report()`, `diff()`, ...),
    or None before the first `fit` after freezing."""
    step = frozen_step(model)
    return step.latest if step is not None else None
