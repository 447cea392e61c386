"""What graphfreeze knows about one variable a traced function reads.

Shared by the front end (which discovers variables), the rules (which match them) and the
passes (which rewrite their reads and writes), so it depends on nothing but TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tensorflow as tf


@dataclass(eq=False)
class VariableInfo:
    """One variable captured by the traced function.

    `path` is the Keras `Variable.path` when the variable is a Keras variable, else the
    `tf.Variable` name without its `:0`. `placeholder` is the graph node through which the
    traced function receives the variable's resource handle.
    """

    path: str
    shape: tuple[int, ...]
    dtype: tf.DType
    variable: tf.Variable
    keras_variable: Any | None
    placeholder: str
    trainable: bool
    optimizer_state: bool = False   # slots, accumulators, EMA, the step counter
    metric_state: bool = False      # Keras metrics' totals and counts
    replica: int | None = None      # per-replica component of a distributed variable

    @property
    def rng_state(self) -> bool:
        """A Keras SeedGenerator's state: freezing it would replay one dropout mask forever."""
        return is_rng_state(self.keras_variable if self.keras_variable is not None else self.variable)

    @property
    def model_state(self) -> bool:
        """A weight or a statistic of the model: what globs and layer rules may match."""
        return not (self.optimizer_state or self.metric_state or self.rng_state)

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def __repr__(self) -> str:
        return f"<variable {self.path!r} shape={list(self.shape)} {self.dtype.name}>"


def is_keras_variable(obj: Any) -> bool:
    """A Keras 3 variable: wraps a `tf.Variable` in `_value` and knows its `path`."""
    return hasattr(obj, "path") and isinstance(getattr(obj, "_value", None), tf.Variable)


def is_keras_model(obj: Any) -> bool:
    """A Keras model (something with Keras's train function), by duck typing."""
    return hasattr(obj, "make_train_function") and hasattr(obj, "train_step")


def is_rng_state(obj: Any) -> bool:
    name = getattr(obj, "name", "") or ""
    return name.split(":")[0].endswith("seed_generator_state")


def resource_variable(obj: Any) -> tf.Variable | None:
    """The `tf.Variable` whose handle a function captures when it reads `obj`."""
    if isinstance(obj, tf.Variable):
        return obj
    if is_keras_variable(obj):
        return obj._value
    return None


def variable_path(obj: Any) -> str:
    if is_keras_variable(obj):
        return obj.path
    name = obj.name
    return name[:-2] if name.endswith(":0") else name


def metric_variables(obj: Any) -> list[Any]:
    """Variables of a Keras model's metrics (loss tracker included), which are not weights."""
    try:
        metrics = list(getattr(obj, "metrics", None) or [])
    except Exception:
        return []
    found = []
    for metric in metrics:
        found.extend(module_variables(metric) or [])
    return found


def module_variables(obj: Any) -> list[Any] | None:
    """All variables of a Keras layer/model or `tf.Module`, trainable or not; else None."""
    if isinstance(obj, (str, bytes, type)) or resource_variable(obj) is not None:
        return None
    try:  # discovery is best effort: some objects' `variables` properties raise
        variables = getattr(obj, "variables", None)
        if variables is None or callable(variables):
            return None
        return list(variables)
    except Exception:
        return None
