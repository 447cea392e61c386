"""What a step refers to: the Keras models, optimizers, metrics and variables reachable from
its code, so that capture can tell each captured variable's role (model weight, optimizer
state, metric) and name it by its Keras path.

The step's own references come first (closure cells, globals it names, its `self`, a few
levels deep); only when they leave a captured variable unexplained are the live Keras
objects of the process searched (one pass of the garbage collector's list).

`references` is the one walk over what a function reaches (closures, named globals, `self`):
capture's discovery uses it, and so does gf.keras to find Keras's per-step function in the
train function it builds (`closure_cell`). `variables_of` is gf.plan's walk from a model or
a list of variables, where nothing is traced.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

from .errors import RuleError
from .variables import is_keras_variable, metric_variables, module_variables, resource_variable


def keras_state_classes() -> tuple[type[Any], ...]:
    """Keras's optimizer and metric base classes (empty if Keras is missing)."""
    try:
        import keras
        return keras.optimizers.Optimizer, keras.metrics.Metric
    except Exception:  # pragma: no cover - keras is a TensorFlow dependency
        return ()


@dataclass
class Reference:
    """A value a function's code refers to, and where it was found."""

    value: Any
    cell: Any = None  # the closure cell holding it (None: a global, or its `self` and attributes)


def _code_of(value: Any) -> bool:
    """Whether `value` is code whose references are followed: a function, a bound method or
    a tf.function (its Python body)."""
    return inspect.isfunction(value) or inspect.ismethod(value) or hasattr(value, "python_function")


def _closure(fn: Any) -> Iterator[Any]:
    """`fn`'s bound closure cells (a cell not yet bound holds nothing to find)."""
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            cell.cell_contents  # noqa: B018 - only whether it is bound
        except ValueError:
            continue
        yield cell


def _global_names(fn: Any) -> Iterator[Any]:
    """The module globals `fn`'s code names (as inspect.getclosurevars finds them)."""
    code, namespace = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
    if code is None or namespace is None:
        return
    for name in code.co_names:
        if name in namespace:
            yield namespace[name]


def references(fn: Any, *, depth: int | None = None, with_globals: bool = True) -> Iterator[Reference]:
    """What `fn` reaches: its closure cells, the globals it names (`with_globals`), its
    `self` and that object's attributes, and the same for the functions among those, up to
    `depth` levels of functions (None: all). The one walk behind capture's discovery (which
    objects may own a captured variable) and gf.keras's search for Keras's per-step function
    in the closures of the train function it builds."""
    pending: list[tuple[Any, int]] = [(fn, 0)]
    seen: set[int] = set()
    while pending:
        target, level = pending.pop()
        for code in dict.fromkeys([target, inspect.unwrap(target)]):  # a wrapper and what it wraps
            if id(code) in seen:
                continue
            seen.add(id(code))
            owner = getattr(code, "__self__", None)
            if owner is not None and not inspect.ismodule(owner):
                yield Reference(owner)
                for v in vars(owner).values() if hasattr(owner, "__dict__") else ():
                    if not callable(v) or module_variables(v):
                        yield Reference(v)
                code = getattr(code, "__func__", code)
            body = getattr(code, "python_function", code)  # a tf.function's Python body
            found = [Reference(c.cell_contents, c) for c in _closure(body)]
            if with_globals:
                found += [Reference(v) for v in _global_names(body)]
            for ref in found:
                yield ref
                if (depth is None or level < depth) and _code_of(ref.value):
                    pending.append((ref.value, level + 1))


def reachable_objects(fn: Callable, depth: int = 3) -> list[Any]:
    """Objects the step's code refers to: closure cells and globals it names, its `self`,
    and the same for the functions it refers to (a step calling `strategy.run(step_fn)`
    keeps the model and optimizer in step_fn's closure), a few levels deep."""
    return [ref.value for ref in references(fn, depth=depth)]


def closure_cell(function: Any, wanted: Callable[[Any], bool]) -> Any:
    """The first closure cell, in `function` or in the functions its closure holds (a
    tf.function's Python body included), whose value `wanted` accepts; None if none does."""
    return next((ref.cell for ref in references(function, with_globals=False)
                 if ref.cell is not None and wanted(ref.value)), None)


def variables_of(target: Any) -> list[Any]:
    """The variables of a model, layer, tf.Module, variable, or any nesting of lists of
    them, in their owners' order (gf.plan: no trace, so only what the target holds)."""
    found = module_variables(target)
    if found is not None:
        return found
    if resource_variable(target) is not None:
        return [target]
    if isinstance(target, Iterable) and not isinstance(target, (str, bytes)):
        out: list[Any] = []
        for item in target:
            out.extend(variables_of(item))
        return out
    raise RuleError(f"gf.plan needs a Keras model or layer, a tf.Module, or variables; got "
                    f"{type(target).__name__}.")


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
        legacy = _legacy_optimizer_variables(obj)
        if legacy is not None:
            found.optimizer_ids.update(id(resource_variable(v)) for v in legacy)
            pending.extend(legacy)
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


def _legacy_optimizer_variables(obj: Any) -> list[Any] | None:
    """The slots and counters of a tf_keras legacy (Keras 2 `OptimizerV2`) or TF1
    (`tf.compat.v1.train`) optimizer, whose `variables` is a method; None for anything else."""
    method = getattr(type(obj), "variables", None)
    if not callable(method) or not hasattr(obj, "get_slot") or not hasattr(obj, "apply_gradients"):
        return None
    try:  # discovery is best effort
        return [v for v in obj.variables() if resource_variable(v) is not None]
    except Exception:
        return None


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
