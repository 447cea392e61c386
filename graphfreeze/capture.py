"""Front end: trace a step into a concrete function and describe what it touches.

The only trace-time intervention graphfreeze makes is here: while the step is traced,
``tf.GradientTape.gradient`` and ``tf.gradients`` are wrapped so that every gradient they
return for a variable passes through an Identity op (a *marker*) whose name we record
together with the variable. A gradient that cannot be marked (inside a vectorized loop, or
in a structure capture does not expect) is refused, never left unmarked. Everything else
is read off the finished trace. The patches are installed under a lock and removed in
``finally``, also when tracing fails.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import backprop
from tensorflow.python.eager.polymorphic_function import function_type_utils
from tensorflow.python.ops import gradients_util
from tensorflow.python.ops.parallel_for import control_flow_ops as pfor_ops

from .discovery import discover_captured, reachable_objects
from .errors import CaptureError, FreezeError, UnsupportedGraphError
from .protos import graph_meta
from .variables import (
    VariableInfo,
    is_keras_variable,
    resource_variable,
    variable_path,
)

MARKER_NAME = "graphfreeze_grad"
_TRACE_LOCK = threading.RLock()
_RECORDERS: list[_MarkerRecorder] = []  # the traces in progress (graphfreeze/optimizer_state.py)


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
    deferred: dict[str, tuple[Callable, Any]] = field(default_factory=dict)  # call-time captures
    strategy: Any = None        # the tf.distribute strategy owning the captured variables
    variable_by_placeholder: dict[str, VariableInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.variable_by_placeholder = {v.placeholder: v for v in self.variables}

    @property
    def training(self) -> bool:
        """A function that takes gradients is a training step; otherwise a forward function."""
        return bool(self.markers)

    @property
    def output_refs(self) -> list[tuple[str, int]]:
        """The flat outputs as (node, output index)."""
        return [(name, int(index)) for name, _, index in
                (t.rpartition(":") for t in self.output_tensors)]


# --------------------------------------------------------------------------- markers


class _MarkerRecorder:
    """Marks every gradient taken for a variable while the step is traced.

    What it cannot mark (a vectorized loop, a structure or gradient type it does not
    expect) is recorded as a refusal and raised once tracing is over: a gradient left
    unmarked would silently escape the rules.
    """

    def __init__(self) -> None:
        self.records: list[tuple[Any, Marker, Any]] = []  # (graph, marker, keras variable)
        self.refusal: UnsupportedGraphError | None = None
        self.vectorized = 0          # pfor loops around the code being traced
        self.constructs: list[str] = []  # named entry points around it (tape.jacobian)

    def refuse(self, message: str) -> None:
        if self.refusal is None:
            self.refusal = UnsupportedGraphError(message)

    def mark(self, sources: Any, grads: Any, construct: str) -> Any:
        if tf.executing_eagerly():
            return grads
        flat_sources = tf.nest.flatten(sources)
        flat_grads = tf.nest.flatten(grads)
        if len(flat_sources) != len(flat_grads):
            if any(resource_variable(s) is not None for s in flat_sources):
                self.refuse(
                    f"{construct} returned {len(flat_grads)} gradients for {len(flat_sources)} "
                    "sources, so graphfreeze cannot tell which gradient belongs to which variable "
                    "and would leave some unmasked; pass the variables as a flat list.")
            return grads
        marked = []
        for src, grad in zip(flat_sources, flat_grads):
            var = resource_variable(src)
            if var is None or grad is None:
                marked.append(grad)
                continue
            if self.vectorized:
                where = self.constructs[-1] if self.constructs else "tf.vectorized_map (pfor)"
                self.refuse(
                    f"{where} takes the gradient of variable "
                    f"{variable_path(src)!r} inside a vectorized loop (pfor), which rewrites it "
                    "into new ops graphfreeze cannot mark, so the gradient would escape the "
                    "rules. Take per-row gradients with tape.jacobian(..., "
                    "experimental_use_pfor=False) or tf.map_fn (a loop of tape.gradient calls, "
                    "which graphfreeze marks), or take the gradient outside the vectorized loop.")
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
                graph = values.graph
            elif isinstance(grad, tf.Tensor):
                grad = tf.identity(grad, name=MARKER_NAME)
                marker = Marker(var, grad.op.name)
                graph = grad.graph
            else:
                self.refuse(
                    f"{construct} returned a {type(grad).__name__} as the gradient of variable "
                    f"{variable_path(src)!r}; graphfreeze marks dense tensors and IndexedSlices "
                    "only, and will not leave a gradient unmasked.")
                marked.append(grad)
                continue
            self.records.append((graph, marker, keras_var))
            marked.append(grad)
        return tf.nest.pack_sequence_as(grads, marked)


@contextlib.contextmanager
def _patched(owner: Any, name: str, make: Callable[[Callable], Callable]):
    original = getattr(owner, name)
    setattr(owner, name, functools.wraps(original)(make(original)))
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def _gradient_markers(recorder: _MarkerRecorder):
    """Mark the gradients of every entry point that differentiates with respect to
    variables: `GradientTape.gradient` (persistent tapes, several tapes and a loop of
    gradients included) and `tf.gradients` (v1 and v2, through their common helper;
    TensorFlow's own uses of that helper differentiate function bodies with respect to
    tensors, which are left alone). A gradient taken inside `pfor` (the default
    `tape.jacobian`, `batch_jacobian`, `tf.vectorized_map`) is refused."""

    def tape_gradient(original):
        def gradient(self, target, sources, *args, **kwargs):
            return recorder.mark(sources, original(self, target, sources, *args, **kwargs),
                                 "GradientTape.gradient")
        return gradient

    def graph_gradients(original):
        def helper(ys, xs, *args, **kwargs):
            return recorder.mark(xs, original(ys, xs, *args, **kwargs), "tf.gradients")
        return helper

    def labelled(construct):
        def make(original):
            def run(*args, **kwargs):
                recorder.constructs.append(construct)
                try:
                    return original(*args, **kwargs)
                finally:
                    recorder.constructs.pop()
            return run
        return make

    def loop(depth):
        def make(original):
            def run(*args, **kwargs):  # pfor vectorizes; for_loop traces a markable body
                saved, recorder.vectorized = recorder.vectorized, depth(recorder.vectorized)
                try:
                    return original(*args, **kwargs)
                finally:
                    recorder.vectorized = saved
            return run
        return make

    tape = backprop.GradientTape
    with _TRACE_LOCK, contextlib.ExitStack() as stack:
        _RECORDERS.append(recorder)
        stack.callback(_RECORDERS.pop)
        stack.enter_context(_patched(tape, "gradient", tape_gradient))
        stack.enter_context(_patched(gradients_util, "_GradientsHelper", graph_gradients))
        stack.enter_context(_patched(pfor_ops, "pfor", loop(lambda d: d + 1)))
        stack.enter_context(_patched(pfor_ops, "for_loop", loop(lambda d: 0)))
        stack.enter_context(_patched(tape, "jacobian", labelled("GradientTape.jacobian")))
        stack.enter_context(_patched(tape, "batch_jacobian",
                                     labelled("GradientTape.batch_jacobian")))
        yield


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


def trace(fn: Callable, args: tuple, kwargs: dict, extra_objects: Sequence[Any] = ()) -> Capture:
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
            if recorder.refusal is not None:
                raise recorder.refusal from e
            if isinstance(e, FreezeError):
                raise
            raise CaptureError(f"tracing {name} failed with {type(e).__name__}: {e}") from e
    if recorder.refusal is not None:
        raise recorder.refusal
    graph = cf.graph

    found = discover_captured(
        list(extra_objects) + reachable_objects(py_fn) + [k for _, _, k in recorder.records],
        graph)
    tf_vars = {id(v.handle): v for v in found.variables if not
               isinstance(v, tf.distribute.DistributedValues)}
    tf_vars.update({id(v.handle): v for v in graph.variables})
    variables = []
    for external, internal in graph.captures:
        var = tf_vars.get(id(external))
        if var is None:
            continue
        # A per-replica component stands for its distributed variable: rules, markers and
        # reports speak of the latter; each component keeps its own placeholder.
        var, replica = found.components.get(id(var), (var, None))
        keras_var = found.keras_by_tf.get(id(var))
        variables.append(VariableInfo(
            path=variable_path(keras_var if keras_var is not None else var),
            shape=tuple(var.shape.as_list()), dtype=var.dtype, variable=var,
            keras_variable=keras_var, placeholder=internal.op.name, trainable=var.trainable,
            optimizer_state=id(var) in found.optimizer_ids,
            metric_state=id(var) in found.metric_ids, replica=replica))
    if not variables:
        raise CaptureError(f"{name} reads no variable, so there is nothing to freeze; pass the "
                           "training step (or forward function) that uses the model.")

    names = _function_names(graph)
    markers = []
    for g, m, _ in recorder.records:
        if g is graph:
            markers.append(m)
        elif _is_nested(g, graph) and names.get(id(g)):  # a body, e.g. a loop over steps
            m.functions = frozenset(names[id(g)])
            markers.append(m)
        # else: a discarded trace (tf.function retraces after creating variables), also of
        # a nested tf.function: no library function was built from its graph

    deferred = {t.op.name: (_single_tensor(closure), tf.TensorSpec(t.shape, t.dtype)) for t, closure in
                zip(graph.deferred_internal_captures, graph.deferred_external_captures)}
    internal_ids = {id(i) for _, i in graph.captures} | {id(t) for t in graph.deferred_internal_captures}
    bound = function_type_utils.canonicalize_function_inputs(
        args, kwargs, traced.function_type, traced._default_values)

    def canonical_args(call_args: tuple, call_kwargs: dict) -> tuple[list, list]:
        """(flat tensor inputs, the Python values among the arguments) for one call."""
        b = function_type_utils.canonicalize_function_inputs(
            call_args, call_kwargs, traced.function_type, traced._default_values)
        return list(cf.function_type.unpack_inputs(b)), _literals(b)

    return Capture(
        concrete_function=cf, graph_def=graph.as_graph_def(), meta=graph_meta(graph),
        variables=variables, markers=markers,
        input_placeholders=[t.op.name for t in cf.inputs if id(t) not in internal_ids],
        output_tensors=[t.name for t in graph.outputs],
        structured_outputs=graph.structured_outputs,
        control_outputs=[op.name for op in graph.control_outputs],
        jit_compile=options["jit_compile"], function_name=name,
        canonical_args=canonical_args, literal_args=_literals(bound),
        captured={i.op.name: e for e, i in graph.captures}, deferred=deferred,
        strategy=_strategy_of(variables))


def _literals(bound: Any) -> list:
    """The Python values among the arguments (a TensorSpec stands for a tensor)."""
    leaves = tf.nest.flatten((bound.args, bound.kwargs), expand_composites=True)
    return [x for x in leaves
            if not isinstance(x, (tf.Tensor, tf.Variable, np.ndarray, tf.TypeSpec))]


def _single_tensor(closure: Callable) -> Callable:
    """TF's deferred-capture closures return their value as a list of component tensors;
    each deferred placeholder is one tensor, so hand that tensor back."""
    def value():
        parts = closure()
        return parts[0] if isinstance(parts, (list, tuple)) and len(parts) == 1 else parts
    return value


def _strategy_of(variables: list[VariableInfo]) -> Any:
    for v in variables:
        strategy = getattr(v.variable, "_distribute_strategy", None)
        if strategy is not None:
            return strategy
    return tf.distribute.get_strategy() if tf.distribute.has_strategy() else None


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
