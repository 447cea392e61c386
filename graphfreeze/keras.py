"""Keras integration: `model.fit` with freeze rules.

`gf.keras.freeze(model, *rules)` routes the model's own `train_step` through graphfreeze:
Keras's train function (callbacks, metrics, validation, `steps_per_execution`,
`jit_compile`, distribution) is built exactly as usual, and the step it calls is traced
and rewritten by the same passes as `gf.freeze`, once per input signature. Nothing about
the model's layers, variables or `trainable` flags changes, so saved files are ordinary
Keras files, and there is no "recompile for trainable=False to take effect" trap: rules
apply from the next `fit`, `train_on_batch` or `evaluate`, whether `compile` came before
or after, and changing them needs no recompilation.

    >>> gf.keras.freeze(model, "*", gf.Unfreeze(model.layers[-1]), batchnorm_inference=True)
    >>> model.fit(dataset, epochs=3)                                     # doctest: +SKIP
    >>> print(gf.keras.rewritten(model).report())                        # doctest: +SKIP
    >>> gf.keras.unfreeze(model)                                         # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from .api import FrozenFunction
from .dryrun import plan
from .errors import RuleError
from .rewritten import Rewritten
from .rules import RuleLike, as_rule

_STEP = "train_step"


def _check_model(model: Any) -> None:
    if not (hasattr(model, "make_train_function") and hasattr(type(model), _STEP)):
        raise RuleError(f"gf.keras.freeze needs a Keras Model, got {type(model).__name__}; "
                        "for a custom training step use @gf.freeze on the step.")


def _reset_train_function(model: Any) -> None:
    # Keras caches its train function; the next fit/train_on_batch rebuilds it around the
    # (re)routed step. compile() does the same reset, so either order works.
    model.train_function = None


def freeze(model: Any, *rules: RuleLike, batchnorm_inference: bool = False) -> Any:
    """Make `fit`, `train_on_batch` (and anything else that runs `train_step`) honour `rules`.

    Returns the same model. Rules are resolved against the model's variables now, so a rule
    that matches nothing raises `RuleError` here rather than at the first batch. Calling it
    again replaces the rules.

    >>> model = gf.keras.freeze(model, "encoder/*", gf.Rows("embedding/embeddings", ids))  # doctest: +SKIP
    """
    _check_model(model)
    checked = [as_rule(r) for r in rules]
    if not checked:
        raise RuleError("gf.keras.freeze needs at least one rule; use gf.keras.unfreeze(model) "
                        "to train everything.")
    plan(model, *checked)  # resolve against the model's variables: errors surface now
    step = FrozenFunction(getattr(type(model), _STEP).__get__(model, type(model)), checked,
                          batchnorm_inference=batchnorm_inference)
    # Bypass Keras's attribute tracking: this is routing, not model state, and must never
    # reach a saved config.
    object.__setattr__(model, _STEP, step)
    _reset_train_function(model)
    return model


def unfreeze(model: Any) -> Any:
    """Remove the rules: the next `fit` trains everything again. Returns the model."""
    _check_model(model)
    if isinstance(model.__dict__.get(_STEP), FrozenFunction):
        object.__delattr__(model, _STEP)
        _reset_train_function(model)
    return model


def frozen_step(model: Any) -> FrozenFunction | None:
    """The graphfreeze step a frozen model trains with, or None."""
    step = getattr(model, "__dict__", {}).get(_STEP)
    return step if isinstance(step, FrozenFunction) else None


def rules(model: Any) -> list:
    """The rules a model is frozen with (empty when it is not)."""
    step = frozen_step(model)
    return list(step.rules) if step is not None else []


def rewritten(model: Any) -> Rewritten | None:
    """The most recent rewrite of the model's train step (for `report()`, `diff()`, ...),
    or None before the first `fit` after freezing."""
    step = frozen_step(model)
    return step.latest if step is not None else None
