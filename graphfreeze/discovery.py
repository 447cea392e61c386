"""What a step refers to: the Keras models, optimizers, metrics and variables reachable from
its code, so that capture can tell each captured variable's role (model weight, optimizer
state, metric) and name it by its Keras path.

The step's own references come first (closure cells, globals it names, its `self`, a few
levels deep); only when they leave a captured variable unexplained are the live Keras
objects of the process searched (one pass of the garbage collector's list).
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

from .variables import is_keras_variable, metric_variables, module_variables, resource_variable


def keras_state_classes() -> tuple[type[Any], ...]:
    """Keras's optimizer and metric base classes (empty if Keras is missing)."""
    try:
        import keras
        return keras.optimizers.Optimizer, keras.metrics.Metric
    except Exception:  # pragma: no cover - keras is a TensorFlow dependency
        return ()


def reachable_objects(fn: Callable, depth: int = 3) -> list[Any]:
    """Objects the step's code refers to: closure cells and globals it names, its `self`,
    and the same for the functions it refers to (a step calling `strategy.run(step_fn)`
    keeps the model and optimizer in step_fn's closure), a few levels deep."""
    out: list[Any] = []
    pending, seen = [(fn, 0)], set()
    while pending:
        target, level = pending.pop()
        target = inspect.unwrap(target)
        if id(target) in seen:
            continue
        seen.add(id(target))
        owner = getattr(target, "__self__", None)
        if owner is not None and not inspect.ismodule(owner):
            out.append(owner)
            out.extend(v for v in vars(owner).values() if not callable(v) or module_variables(v))
            target = getattr(target, "__func__", target)
        python_fn = getattr(target, "python_function", target)  # a tf.function's body
        if not inspect.isfunction(python_fn):
            continue
        try:
            cv = inspect.getclosurevars(python_fn)
        except (TypeError, ValueError):
            continue
        for value in [*cv.nonlocals.values(), *cv.globals.values()]:
            out.append(value)
            if level < depth and (inspect.isfunction(value) or inspect.ismethod(value)
                                  or hasattr(value, "python_function")):
                pending.append((value, level + 1))
    return out


@dataclass
class Discovered:
    """What the objects a step refers to say about the variables it may capture."""

    keras_by_tf: dict[int, Any] = field(default_factory=dict)  # id(tf.Variable) -> Keras var
    optimizer_ids: set[int] = field(default_factory=set)
    metric_ids: set[int] = field(default_factory=set)
    variables: list[tf.Variable] = field(default_factory=list)
    # id(per-replica component) -> (its distributed variable, replica index)
    components: dict[int, tuple[Any, int]] = field(default_factory=dict)

    def add_variable(self, var: tf.Variable) -> None:
        self.variables.append(var)
        if isinstance(var, tf.distribute.DistributedValues):
            for replica, component in enumerate(var.values):
                self.components[id(component)] = (var, replica)
                self.variables.append(component)


def discover(objects: list[Any]) -> Discovered:
    """Walk Keras models, layers, optimizers, metrics and variables reachable from `objects`."""
    found = Discovered()
    classes = keras_state_classes()
    pending: list[Any] = list(objects)
    seen: set[int] = set()
    while pending:
        obj = pending.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        if is_keras_variable(obj):
            found.keras_by_tf.setdefault(id(obj._value), obj)
            found.add_variable(obj._value)
            continue
        if isinstance(obj, tf.Variable):
            found.add_variable(obj)
            continue
        if classes and isinstance(obj, classes):
            ids = found.optimizer_ids if isinstance(obj, classes[0]) else found.metric_ids
            for v in obj.variables:
                ids.add(id(resource_variable(v)))
                pending.append(v)
            continue
        variables = module_variables(obj)
        if variables is not None:
            pending.extend(variables)
            metrics = metric_variables(obj)
            found.metric_ids.update(id(resource_variable(v)) for v in metrics)
            pending.extend(metrics)
            optimizer = getattr(obj, "optimizer", None)
            if optimizer is not None:
                pending.append(optimizer)
    return found


def live_keras_state(unexplained: set[int]) -> list[Any]:
    """Every Keras optimizer and metric alive in the process, and the Keras variables
    wrapping the `unexplained` tf.Variables (by id).

    A step may keep its optimizers in a dict, a list or a trainer object that no closure
    names; what a variable is must not depend on where its owner lives. A variable does
    not know its owner, so the owners are found among the live objects (one pass of the
    garbage collector's list, only when the step's own references leave a captured
    variable unexplained)."""
    try:
        import keras
        variable_cls = keras.Variable
    except Exception:  # pragma: no cover - keras is a TensorFlow dependency
        return []
    wanted = (*keras_state_classes(), variable_cls)
    out = []
    for obj in gc.get_objects():
        if not isinstance(obj, wanted):
            continue
        if not isinstance(obj, variable_cls):
            out.append(obj)
            continue
        value = getattr(obj, "_value", None)
        parts = getattr(value, "values", None) if isinstance(
            value, tf.distribute.DistributedValues) else ()
        if id(value) in unexplained or any(id(p) in unexplained for p in parts or ()):
            out.append(obj)
    return out


def discover_captured(objects: list[Any], graph: Any) -> Discovered:
    """What is known about the variables `graph` captured: from the objects the step
    refers to, and from the live Keras objects when those leave one unexplained."""
    found = discover(objects)
    known = {id(v) for v in found.variables}
    unexplained = {id(v) for v in graph.variables if id(v) not in known}
    if unexplained:
        found = discover(objects + live_keras_state(unexplained))
    return found
