"""Keras integration: `model.fit` with freeze rules.

`gf.keras.freeze(model, *rules)` lets Keras build its train function exactly as usual
(callbacks, metrics, validation, `steps_per_execution`, `jit_compile`, distribution
strategies all untouched) and then hands the per-step function inside it to graphfreeze:
the `one_step_on_data` tf.function, which runs `strategy.run(model.train_step)` and
reduces the per-replica results. That whole function is traced and rewritten by the same
passes as `gf.freeze`, once per input signature, so every replica and collective of a
distributed step is in one trace (rewriting `train_step` alone would nest a tf.function
inside `strategy.run`, where tf.distribute cannot synchronise replicas).

tf_keras (Keras 2) models are routed the same way through their own train function
(graphfreeze/keras_legacy.py). `GradualUnfreezing` (graphfreeze/unfreezing.py) changes the
rules at epoch boundaries within one `fit`.

Nothing about the model's layers, variables or `trainable` flags changes, so saved files
are ordinary Keras files, and there is no "recompile for trainable=False to take effect"
trap: rules apply from the next `fit` or `train_on_batch`, whether `compile` came before
or after, and changing them needs no recompilation.

    >>> gf.keras.freeze(model, "*", gf.Unfreeze(model.layers[-1]), batchnorm_inference=True)
    >>> model.fit(dataset, epochs=3)                                     # doctest: +SKIP
    >>> print(gf.keras.rewritten(model).report())                        # doctest: +SKIP
    >>> gf.keras.unfreeze(model)                                         # doctest: +SKIP
    >>> schedule = gf.keras.GradualUnfreezing.top_down(model, 3)          # doctest: +SKIP
    >>> model.fit(dataset, epochs=6, callbacks=[schedule])               # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import keras_legacy
from ._keras_compat import use_keras37_step
from .api import FrozenFunction
from .discovery import closure_cell
from .dryrun import plan
from .errors import RuleError, UnsupportedGraphError
from .optimizer_state import extend_model_optimizer, filtered_build, finalize_known
from .rewritten import Rewritten
from .rules import Rule, RuleLike, as_rule
from .unfreezing import GradualUnfreezing
from .variables import is_keras_model

__all__ = ["freeze", "unfreeze", "rules", "rewritten", "frozen_step", "GradualUnfreezing"]

_STEP_FUNCTION = "one_step_on_data"  # the per-step function Keras's train function calls
# Model methods a frozen model routes through graphfreeze (instance attributes, bypassing
# Keras's tracking: routing, not model state, never saved).
_ROUTED = ("make_train_function", "_symbolic_build", "fit")


def _check_model(model: Any) -> None:
    if not is_keras_model(model):
        raise RuleError(f"gf.keras.freeze needs a Keras Model, got {type(model).__name__}; "
                        "for a custom training step use @gf.freeze on the step.")


def _is_step_function(value: Any) -> bool:
    """Keras's per-step function (a tf.function, or a plain function when run_eagerly=True),
    or the FrozenFunction that replaced it."""
    body = getattr(value, "python_function", value)
    return getattr(body, "__name__", "") == _STEP_FUNCTION or isinstance(value, FrozenFunction)


class _Routing:
    """Per-model state: the rules, and Keras's own make_train_function to build with."""

    def __init__(self, model: Any, rules: list[Rule], batchnorm_inference: bool, allow_opaque: bool):
        self.model = model
        self.rules = rules
        self.batchnorm_inference = batchnorm_inference
        self.allow_opaque = allow_opaque
        self.step: FrozenFunction | None = None

    def _symbolic_build(self, *args: Any, **kwargs: Any) -> Any:
        """Keras builds the optimizer here under a distribution strategy: only for what
        the rules leave trainable (see graphfreeze/optimizer_state.py)."""
        with filtered_build(getattr(self.model, "optimizer", None), self.rules):
            return type(self.model)._symbolic_build(self.model, *args, **kwargs)

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        """Keras's fit; its final EMA copy goes variable by variable, never into a wholly
        frozen variable (the optimizer may hold averages for the trainable ones only)."""
        with finalize_known(getattr(self.model, "optimizer", None), self.rules):
            return type(self.model).fit(self.model, *args, **kwargs)

    def make_train_function(self, force: bool = False) -> Any:
        model = self.model
        if model.train_function is not None and not force:
            return model.train_function
        # Keras 3.0-3.6 under a strategy: the compat step builds the optimizer here
        with filtered_build(getattr(model, "optimizer", None), self.rules):
            self.step = route_train_function(
                model, lambda inner: FrozenFunction(inner, self.rules,
                                                    batchnorm_inference=self.batchnorm_inference,
                                                    allow_opaque=self.allow_opaque))
        return model.train_function


def route_train_function(model: Any,
                         make_step: Callable[[Callable[..., Any]], FrozenFunction]) -> FrozenFunction:
    """Have Keras build `model.train_function` exactly as usual, then swap the per-step
    function inside it for `make_step(per_step_function)`; returns that FrozenFunction."""
    if keras_legacy.is_tf_keras_model(model):
        return keras_legacy.route(model, make_step)
    type(model).make_train_function(model, force=True)  # Keras builds it as usual
    use_keras37_step(model)  # Keras 3.0-3.6: see _keras_compat.py
    cell = closure_cell(model.train_function, _is_step_function)
    if cell is None:
        model.train_function = None
        raise UnsupportedGraphError(
            f"cannot find the per-step function ({_STEP_FUNCTION}) in the train function "
            f"{keras_legacy.keras_package(model)} builds for {type(model).__name__}; gf.keras "
            "supports the Keras 3 TensorFlow trainer and tf_keras. Use @gf.freeze on a custom "
            "training step instead.")
    inner = cell.cell_contents
    if isinstance(inner, FrozenFunction):
        inner = inner.python_function
    step = make_step(inner)
    cell.cell_contents = step
    return step


def _routing(model: Any) -> _Routing | None:
    bound = getattr(model, "__dict__", {}).get("make_train_function")
    owner = getattr(bound, "__self__", None)
    return owner if isinstance(owner, _Routing) else None


def freeze(model: Any, *rules: RuleLike, batchnorm_inference: bool = False,
           allow_opaque: bool = False) -> Any:
    """Make `fit` and `train_on_batch` honour `rules`; returns the same model.

    Rules are resolved against the model's variables now, so a rule that matches nothing
    raises `RuleError` here rather than at the first batch. Calling it again replaces the
    rules (effective at the next `fit`, no recompiling). `batchnorm_inference` and
    `allow_opaque` mean what they mean for `gf.rewrite`.

    >>> model = gf.keras.freeze(model, "encoder/*", gf.Rows("embedding/embeddings", ids))  # doctest: +SKIP
    """
    _check_model(model)
    checked = [as_rule(r) for r in rules]
    if not checked:
        raise RuleError("gf.keras.freeze needs at least one rule; use gf.keras.unfreeze(model) "
                        "to train everything.")
    plan(model, *checked)  # resolve against the model's variables: errors surface now
    routing = _Routing(model, checked, batchnorm_inference, allow_opaque)
    for name in _ROUTED:
        if hasattr(type(model), name):
            object.__setattr__(model, name, getattr(routing, name))
    model.train_function = None  # rebuilt (and rerouted) by the next fit / train_on_batch
    return model


def unfreeze(model: Any) -> Any:
    """Remove the rules: the next `fit` trains everything again. Returns the model.

    >>> gf.keras.unfreeze(model).fit(dataset, epochs=1)                 # doctest: +SKIP
    """
    _check_model(model)
    if _routing(model) is not None:
        for name in _ROUTED:
            if name in model.__dict__:
                object.__delattr__(model, name)
        model.train_function = None
    extend_model_optimizer(model)
    return model


def frozen_step(model: Any) -> FrozenFunction | None:
    """The graphfreeze step a frozen model trains with (after its first fit), or None.

    >>> gf.keras.frozen_step(model).cache_size                          # doctest: +SKIP
    1
    """
    routing = _routing(model)
    return routing.step if routing is not None else None


def rules(model: Any) -> list[Rule]:
    """The rules a model is frozen with (empty when it is not).

    >>> gf.keras.freeze(model, "encoder/*"); gf.keras.rules(model)      # doctest: +SKIP
    ['encoder/*']
    """
    routing = _routing(model)
    return list(routing.rules) if routing is not None else []


def rewritten(model: Any) -> Rewritten | None:
    """The most recent rewrite of the model's train step (for `report()`, `diff()`, ...),
    or None before the first `fit` after freezing.

    >>> model.fit(dataset, epochs=1)                                    # doctest: +SKIP
    >>> print(gf.keras.rewritten(model).report())                       # doctest: +SKIP
    """
    step = frozen_step(model)
    return step.latest if step is not None else None
