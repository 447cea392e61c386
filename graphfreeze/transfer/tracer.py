"""Call-site graphs of models without a Keras layer graph (subclassed): trace with
``tf.function`` while ``Layer.__call__`` is recorded; the TensorFlow ops between layer
calls become weightless nodes."""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..opkinds import PASS_THROUGH
from .callgraph import _call_args, _functional, _Graph, _keras_graph, _Site
from .results import GraphMode, Ref, TransferError

_RECORD_LOCK = threading.RLock()


@dataclass(eq=False)
class _Call:
    layer: Any
    args: tuple[tuple[Any, ...], dict[str, Any]]  # (positional, keyword) as the layer got them
    outputs: Any = None


class _CallRecorder:
    """Records the ``Layer.__call__``s the tracing thread makes, callers after their callees.

    Models are containers; any other layer is a unit, as in a Keras layer graph: what it
    calls inside (an LSTM's cell, a custom block's Dense layers) is not recorded."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self._stack: list[_Call] = []
        self._thread = threading.get_ident()

    def _recording(self) -> bool:
        if threading.get_ident() != self._thread or tf.executing_eagerly():
            return False
        return not self._stack or isinstance(self._stack[-1].layer, keras.Model)

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def __call__(layer: Any, *args: Any, **kwargs: Any) -> Any:
            if not self._recording():
                return original(layer, *args, **kwargs)
            call = _Call(layer, (args, kwargs))
            self._stack.append(call)
            try:
                call.outputs = original(layer, *args, **kwargs)
            finally:
                self._stack.pop()
            self.calls.append(call)
            return call.outputs
        return __call__


def _record_trace(model: keras.Model, spec: Any) -> tuple[Any, list[_Call]]:
    layer_cls = keras.layers.Layer
    recorder = _CallRecorder()
    with _RECORD_LOCK:
        original = layer_cls.__call__
        layer_cls.__call__ = recorder.wrap(original)
        try:
            cf = tf.function(lambda x: model(x)).get_concrete_function(spec)
        except Exception as e:
            raise TransferError(f"tracing model {model.name!r} on {spec} failed with "
                                f"{type(e).__name__}: {e}. Pass example_inputs= that the model "
                                "accepts.") from e
        finally:
            layer_cls.__call__ = original
    return cf, recorder.calls


class _TraceBuilder:
    """Turns a recorded trace into call sites: the calls of layers that are not models, plus
    the ops between them (found by walking each call's input tensors back to their producers)."""

    def __init__(self, model: keras.Model, cf: Any, calls: list[_Call], n_inputs: int):
        self.graph = _Graph(model.name, "traced")
        self.fg = cf.graph
        self.produced: dict[str, Ref] = {}
        for i, t in enumerate(cf.inputs[:n_inputs]):
            self.produced[t.name] = (self.graph.add_input(i, t.dtype, t.shape.rank), 0)
        self.ops: dict[str, str] = {}
        self.calls = calls

    def _in_trace(self, call: _Call) -> list[tf.Tensor] | None:
        tensors = [x for x in tf.nest.flatten(call.args) if isinstance(x, tf.Tensor)]
        if tensors and all(getattr(t, "graph", None) is self.fg for t in tensors):
            return tensors
        return None   # a call inside a loop body or a symbolic build: part of its caller

    def build(self) -> _Graph:
        for call in self.calls:
            tensors = self._in_trace(call)
            if tensors is None or isinstance(call.layer, keras.Model):
                continue
            inputs = [self._ref(t) for t in tensors]
            config = _call_args(*call.args, is_tensor=lambda x: isinstance(x, tf.Tensor))
            key = self.graph.add_layer_call(call.layer, inputs, config)
            # Later consumers read this call's outputs, even one that returns its input
            # unchanged (Dropout at inference): the graph keeps the order the model ran in.
            outs = [t for t in tf.nest.flatten(call.outputs) if isinstance(t, tf.Tensor)]
            self.produced.update({t.name: (key, i) for i, t in enumerate(outs)})
        return self.graph

    def _through(self, tensor: tf.Tensor) -> tf.Tensor:
        """Past the identities tracing adds, to the tensor a layer or an op produced."""
        while tensor.name not in self.produced and tensor.op.type in PASS_THROUGH:
            tensor = tensor.op.inputs[0]
        return tensor

    def _ref(self, tensor: tf.Tensor) -> Ref:
        tensor = self._through(tensor)
        if tensor.name in self.produced:
            return self.produced[tensor.name]
        return self._op_node(tensor.op), tensor.value_index

    def _op_node(self, op: Any) -> str:
        """The node of an op between layer calls, creating it and its producers (iteratively:
        a model written with raw ops can have long chains)."""
        pending = [op]
        while pending:
            top = pending[-1]
            if top.name in self.ops:
                pending.pop()
                continue
            todo = [t.op for t in map(self._through, top.inputs)
                    if t.name not in self.produced and t.op.name not in self.ops]
            if todo:
                pending.extend(todo)
                continue
            pending.pop()
            self.ops[top.name] = self._add_op(top)
        return self.ops[op.name]

    def _add_op(self, op: Any) -> str:
        if op.type == "Const":
            digest = hashlib.sha1(op.node_def.attr["value"].SerializeToString()).hexdigest()[:16]
            key = f"constant:{digest}"
            if key not in self.graph:
                self.graph.add(_Site(key, "constant", "constant", {"value": digest}, "", (), ()))
            return key
        if op.type == "Placeholder":   # a variable or tensor the model itself captures
            return self.graph.add(_Site(f"capture:{op.name}", op.name, "capture", {}, "", (), ()))
        inputs = tuple(self._ref(t) for t in op.inputs)
        return self.graph.add(_Site(f"op:{op.name}", op.name, f"tf.{op.type}",
                                    _op_attrs(op), "", (), inputs))


def _op_attrs(op: Any) -> dict[str, str]:
    out = {}
    for k, v in sorted(op.node_def.attr.items()):
        if k.startswith("_"):
            continue
        # Function names differ from trace to trace; the bodies are not compared.
        out[k] = "<function>" if v.HasField("func") or len(v.list.func) else \
            hashlib.sha1(v.SerializeToString()).hexdigest()[:16]
    return out


def _input_spec(model: keras.Model, example_inputs: Any) -> Any:
    def spec(x: Any) -> tf.TensorSpec:
        if isinstance(x, tf.TensorSpec):
            return x
        x = x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)
        shape = list(x.shape)
        # A free batch dimension keeps both traces free of batch-size constants.
        return tf.TensorSpec([None, *shape[1:]] if shape else [], tf.as_dtype(x.dtype))

    if example_inputs is not None:
        return tf.nest.map_structure(spec, example_inputs)
    fn = _functional(model)
    if fn is not None:
        return keras.tree.map_structure(spec, fn.input)
    build = model.get_build_config() if model.built else None
    shape = (build or {}).get("input_shape")
    if shape is None or not all(isinstance(d, (int, type(None))) for d in shape):
        raise TransferError(
            f"model {model.name!r} ({type(model).__name__}) has no Keras layer graph and its "
            "input shape is unknown, so it cannot be traced; pass example_inputs= (an array or "
            "a structure of arrays the model accepts).")
    return tf.TensorSpec([None, *shape[1:]], tf.float32)


def _traced_graph(model: keras.Model, example_inputs: Any) -> _Graph:
    spec = _input_spec(model, example_inputs)
    cf, calls = _record_trace(model, spec)
    return _TraceBuilder(model, cf, calls, len(tf.nest.flatten(spec))).build()


def _graphs(source: keras.Model, target: keras.Model, mode: GraphMode,
            example_inputs: Any) -> tuple[_Graph, _Graph]:
    keras_graphs = _functional(source) is not None and _functional(target) is not None
    if mode == "keras" and not keras_graphs:
        which = source if _functional(source) is None else target
        raise TransferError(f"model {which.name!r} ({type(which).__name__}) has no Keras layer "
                            "graph (a subclassed model, or a Sequential without an Input); use "
                            "graph='traced' or 'auto'.")
    if mode == "traced" or not keras_graphs:
        return _traced_graph(source, example_inputs), _traced_graph(target, example_inputs)
    return _keras_graph(source), _keras_graph(target)
