"""Front end: trace a step into a concrete function and describe what it touches.

The only trace-time intervention graphfreeze makes is here: while the step is traced,
``tf.GradientTape.gradient`` is wrapped so that every gradient it returns for a variable
passes through an Identity op (a *marker*) whose name we record together with the
variable. Everything else is read off the finished trace. The patch is installed under a
lock and removed in ``finally``, also when tracing fails.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import backprop
from tensorflow.python.eager.polymorphic_function import function_type_utils

from .errors import CaptureError
from .variables import (
    VariableInfo,
    is_keras_variable,
    metric_variables,
    module_variables,
    resource_variable,
    variable_path,
)

MARKER_NAME = "graphfreeze_grad"
_TRACE_LOCK = threading.RLock()


@dataclass
class Marker:
    """The gradient `tape.gradient` returned for one variable, as marker node names."""

    variable: tf.Variable
    values: str                 # Identity over the dense gradient, or over IndexedSlices.values
    indices: str | None = None  # Identity over IndexedSlices.indices (sparse gradients only)
    dense_shape: str | None = None  # tensor name of IndexedSlices.dense_shape, if any
    functions: frozenset[str] | None = None  # library functions holding it; None = the step

    @property
    def sparse(self) -> bool:
        return self.indices is not None


@dataclass
class Capture:
    """Everything the passes and the back end need to know about one trace."""

    concrete_function: Any
    graph_def: Any
    meta: dict[str, tuple[list, list]]
    variables: list[VariableInfo]
    markers: list[Marker]
    input_placeholders: list[str]
    output_tensors: list[str]
    structured_outputs: Any
    control_outputs: list[str]
    jit_compile: bool | None
    function_name: str
    canonical_args: Callable[[tuple, dict], tuple[list, list]]
    literal_args: list
    captured: dict[str, Any]    # capture placeholder -> the outer tensor it stands for
    variable_by_placeholder: dict[str, VariableInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.variable_by_placeholder = {v.placeholder: v for v in self.variables}

    @property
    def training(self) -> bool:
        """A function that takes gradients is a training step; otherwise a forward function."""
        return bool(self.markers)

    def markers_for(self, var: VariableInfo) -> list[Marker]:
        return [m for m in self.markers if m.variable is var.variable]


# --------------------------------------------------------------------------- markers


class _MarkerRecorder:
    def __init__(self) -> None:
        self.records: list[tuple[Any, Marker, Any]] = []  # (graph, marker, keras variable)

    def mark(self, sources: Any, grads: Any) -> Any:
        if tf.executing_eagerly():
            return grads
        flat_sources = tf.nest.flatten(sources)
        flat_grads = tf.nest.flatten(grads)
        if len(flat_sources) != len(flat_grads):
            return grads
        marked = []
        for src, grad in zip(flat_sources, flat_grads):
            var = resource_variable(src)
            if var is None or grad is None:
                marked.append(grad)
                continue
            keras_var = src if is_keras_variable(src) else None
            if isinstance(grad, tf.IndexedSlices):
                values = tf.identity(grad.values, name=MARKER_NAME)
                indices = tf.identity(grad.indices, name=MARKER_NAME + "_indices")
                dense = grad.dense_shape
                marker = Marker(var, values.op.name, indices.op.name,
                                dense.name if dense is not None else None)
                grad = tf.IndexedSlices(values, indices, dense)
            elif isinstance(grad, tf.Tensor):
                grad = tf.identity(grad, name=MARKER_NAME)
                marker = Marker(var, grad.op.name)
            else:
                marked.append(grad)
                continue
            self.records.append((grad.graph if isinstance(grad, tf.Tensor) else values.graph,
                                 marker, keras_var))
            marked.append(grad)
        return tf.nest.pack_sequence_as(grads, marked)


@contextlib.contextmanager
def _gradient_markers(recorder: _MarkerRecorder):
    original = backprop.GradientTape.gradient

    @functools.wraps(original)
    def gradient(self, target, sources, *args, **kwargs):
        return recorder.mark(sources, original(self, target, sources, *args, **kwargs))

    with _TRACE_LOCK:
        backprop.GradientTape.gradient = gradient
        try:
            yield
        finally:
            backprop.GradientTape.gradient = original


# --------------------------------------------------------------------------- objects


def _keras_optimizer_class() -> type | None:
    try:
        import keras
        return keras.optimizers.Optimizer
    except Exception:  # pragma: no cover - keras is a TensorFlow dependency
        return None


def _reachable_objects(fn: Callable) -> list[Any]:
    """Objects the step's code refers to: closure cells, globals it names, its `self`."""
    out: list[Any] = []
    target = inspect.unwrap(fn)
    owner = getattr(target, "__self__", None)
    if owner is not None:
        out.append(owner)
        out.extend(v for v in vars(owner).values() if not callable(v) or module_variables(v))
        target = target.__func__
    try:
        cv = inspect.getclosurevars(target)
        out.extend(cv.nonlocals.values())
        out.extend(cv.globals.values())
    except (TypeError, ValueError):
        pass
    return out


def _discover(objects: list[Any]) -> tuple[dict[int, Any], set[int], set[int], list[tf.Variable]]:
    """Keras variables by id of their tf.Variable, ids of optimizer-owned and of metric
    variables, and every tf.Variable found (to map handles used without a Python read)."""
    keras_by_tf: dict[int, Any] = {}
    plain: list[tf.Variable] = []
    optimizer_ids: set[int] = set()
    metric_ids: set[int] = set()
    opt_cls = _keras_optimizer_class()
    pending = list(objects)
    seen: set[int] = set()
    while pending:
        obj = pending.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        if is_keras_variable(obj):
            keras_by_tf.setdefault(id(obj._value), obj)
            plain.append(obj._value)
            continue
        if isinstance(obj, tf.Variable):
            plain.append(obj)
            continue
        if opt_cls is not None and isinstance(obj, opt_cls):
            for v in obj.variables:
                optimizer_ids.add(id(resource_variable(v)))
                pending.append(v)
            continue
        variables = module_variables(obj)
        if variables is not None:
            pending.extend(variables)
            metrics = metric_variables(obj)
            metric_ids.update(id(resource_variable(v)) for v in metrics)
            pending.extend(metrics)
            optimizer = getattr(obj, "optimizer", None)
            if optimizer is not None:
                pending.append(optimizer)
    return keras_by_tf, optimizer_ids, metric_ids, plain


# --------------------------------------------------------------------------- trace


def _python_function(fn: Callable) -> tuple[Callable, dict]:
    """The Python body of `fn` and the tf.function options to trace it with again."""
    if isinstance(fn, tf.types.experimental.PolymorphicFunction) or hasattr(fn, "python_function"):
        options = {"jit_compile": getattr(fn, "_jit_compile", None),
                   "autograph": getattr(fn, "_autograph", True)}
        return fn.python_function, options
    if not callable(fn):
        raise CaptureError(f"expected a function or tf.function to freeze, got {type(fn).__name__}.")
    return fn, {"jit_compile": None, "autograph": True}


def _shape_tuple(shape: tf.TensorShape) -> tuple | None:
    return None if shape.rank is None else tuple(shape.as_list())


def trace(fn: Callable, args: tuple, kwargs: dict, extra_objects: list[Any] = ()) -> Capture:
    """Trace `fn(*args, **kwargs)` once with gradient markers and describe the result."""
    py_fn, options = _python_function(fn)
    name = getattr(py_fn, "__name__", None) or type(py_fn).__name__
    # A fresh tf.function: the user's own may hold cached traces without markers.
    traced = tf.function(py_fn, **options)
    recorder = _MarkerRecorder()
    with _gradient_markers(recorder):
        try:
            cf = traced.get_concrete_function(*args, **kwargs)
        except Exception as e:  # the user's code failed: say so, with the original attached
            raise CaptureError(f"tracing {name} failed with {type(e).__name__}: {e}") from e
    graph = cf.graph

    keras_by_tf, optimizer_ids, metric_ids, found = _discover(
        list(extra_objects) + _reachable_objects(py_fn) + [k for _, _, k in recorder.records])
    tf_vars = {id(v.handle): v for v in found}
    tf_vars.update({id(v.handle): v for v in graph.variables})
    variables = []
    for external, internal in graph.captures:
        var = tf_vars.get(id(external))
        if var is None:
            continue
        keras_var = keras_by_tf.get(id(var))
        variables.append(VariableInfo(
            path=variable_path(keras_var if keras_var is not None else var),
            shape=tuple(var.shape.as_list()), dtype=var.dtype, variable=var,
            keras_variable=keras_var, placeholder=internal.op.name, trainable=var.trainable,
            optimizer_state=id(var) in optimizer_ids, metric_state=id(var) in metric_ids))
    if not variables:
        raise CaptureError(f"{name} reads no variable, so there is nothing to freeze; pass the "
                           "training step (or forward function) that uses the model.")

    names = _function_names(graph)
    markers = []
    for g, m, _ in recorder.records:
        if g is graph:
            markers.append(m)
        elif _is_nested(g, graph):  # tape.gradient inside a body (e.g. a loop over steps)
            m.functions = frozenset(names.get(id(g), ()))
            markers.append(m)
        # else: a discarded trace (tf.function retraces after creating variables)

    internal_ids = {id(i) for _, i in graph.captures}
    meta = {op.name: ([t.dtype.as_datatype_enum for t in op.outputs],
                      [_shape_tuple(t.shape) for t in op.outputs]) for op in graph.get_operations()}
    bound = function_type_utils.canonicalize_function_inputs(
        args, kwargs, traced.function_type, traced._default_values)

    def canonical_args(call_args: tuple, call_kwargs: dict) -> tuple[list, list]:
        """(flat tensor inputs, the Python values among the arguments) for one call."""
        b = function_type_utils.canonicalize_function_inputs(
            call_args, call_kwargs, traced.function_type, traced._default_values)
        return list(cf.function_type.unpack_inputs(b)), _literals(b)

    return Capture(
        concrete_function=cf, graph_def=graph.as_graph_def(), meta=meta, variables=variables,
        markers=markers,
        input_placeholders=[t.op.name for t in cf.inputs if id(t) not in internal_ids],
        output_tensors=[t.name for t in graph.outputs],
        structured_outputs=graph.structured_outputs,
        control_outputs=[op.name for op in graph.control_outputs],
        jit_compile=options["jit_compile"], function_name=name,
        canonical_args=canonical_args, literal_args=_literals(bound),
        captured={i.op.name: e for e, i in graph.captures})


def _literals(bound: Any) -> list:
    leaves = tf.nest.flatten((bound.args, bound.kwargs), expand_composites=True)
    return [x for x in leaves if not isinstance(x, (tf.Tensor, tf.Variable, np.ndarray))]


def _function_names(graph: Any) -> dict[int, set[str]]:
    """id(FuncGraph) -> names of the library functions built from it, at any depth."""
    out: dict[int, set[str]] = {}
    pending, seen = [graph], set()
    while pending:
        g = pending.pop()
        if id(g) in seen:
            continue
        seen.add(id(g))
        for name, fn in getattr(g, "_functions", {}).items():
            body = getattr(fn, "graph", None)
            if body is not None:
                out.setdefault(id(body), set()).add(name)
                pending.append(body)
    return out


def _is_nested(inner: Any, outer: Any) -> bool:
    g = getattr(inner, "outer_graph", None)
    while g is not None:
        if g is outer:
            return True
        g = getattr(g, "outer_graph", None)
    return False
