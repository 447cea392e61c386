"""The call-site graph both models become (one node per layer call), and how a Functional or
Sequential model's own Keras layer graph is read into it."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import networkx as nx
import tensorflow as tf

from .results import Ref

# Configuration that does not change what a layer computes at inference, or only its
# starting values: two layers differing in these still share transferable weights.
_IGNORED_KEYS = frozenset({"name", "trainable", "dtype", "seed", "momentum", "renorm_momentum",
                           "dropout", "recurrent_dropout", "unit_forget_bias",
                           "quantization_config"})
_IGNORED_SUFFIXES = ("_initializer", "_regularizer", "_constraint")
_MATCHABLE_ROOTS = ("input", "constant")


@dataclass(eq=False)
class _Site:
    """One call of a layer (or a root, or a TensorFlow op between layers)."""

    key: str
    label: str
    kind: str
    config: dict[str, str]
    call: str
    weights: tuple[tuple[str, tuple[int, ...], str], ...]
    inputs: tuple[Ref, ...]
    layer: Any = None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=lambda o: f"<{type(o).__qualname__}>")


def _layer_config(layer: Any) -> dict[str, str]:
    name = type(layer).__name__
    if "Dropout" in name or "Noise" in name:
        return {}
    try:
        config = layer.get_config()
    except Exception:  # a custom layer without get_config: class and shapes must do
        return {}
    return {k: _canonical(v) for k, v in config.items()
            if k not in _IGNORED_KEYS and not k.endswith(_IGNORED_SUFFIXES)}


def _weights(layer: Any) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """(name, shape, dtype) of a layer's weights, trainable or not (BatchNorm statistics
    included); not its random-seed state, which Keras keeps in `variables` only."""
    # The variable's own name (``kernel``), not its path: paths hold layer names, and
    # sublayers' auto-generated names differ between two otherwise identical models.
    out = []
    for v in getattr(layer, "weights", None) or ():
        name = v.name[:-2] if v.name.endswith(":0") else v.name
        out.append((name, tuple(int(d) for d in v.shape), tf.as_dtype(v.dtype).name))
    return tuple(out)


def _call_args(args: Sequence[Any], kwargs: dict[str, Any], is_tensor: Callable[[Any], bool]) -> str:
    """The non-tensor arguments of a call, canonical (an axis, a flag...). ``training`` and
    ``mask`` are left out: a Functional model passes them to its layers explicitly, a
    subclassed model usually leaves them to Keras's call context."""
    def strip(x: Any) -> Any:
        if is_tensor(x):
            return "<tensor>"
        if isinstance(x, (list, tuple)):
            return [strip(i) for i in x]
        if isinstance(x, dict):
            return {str(k): strip(v) for k, v in x.items()}
        return x if isinstance(x, (int, float, str, bool, type(None))) else f"<{type(x).__qualname__}>"
    return _canonical(strip([list(args), {k: v for k, v in kwargs.items()
                                          if k not in ("training", "mask")}]))


class _Graph:
    """Call sites in topological (insertion) order, on a networkx MultiDiGraph."""

    def __init__(self, name: str, method: str):
        self.name, self.method = name, method
        self.nx = nx.MultiDiGraph()
        self.order: list[str] = []

    def add(self, site: _Site) -> str:
        self.nx.add_node(site.key, site=site)
        for pos, (src, idx) in enumerate(site.inputs):
            self.nx.add_edge(src, site.key, key=pos, output=idx)
        self.order.append(site.key)
        return site.key

    def site(self, key: str) -> _Site:
        return self.nx.nodes[key]["site"]

    def __contains__(self, key: str) -> bool:
        return key in self.nx

    def add_layer_call(self, layer: Any, inputs: Sequence[Ref], call: str) -> str:
        key = f"{len(self.order)}:{layer.name}"
        return self.add(_Site(key, layer.name, _kind(layer), _layer_config(layer), call,
                              _weights(layer), tuple(inputs), layer))

    def add_input(self, index: int, dtype: Any, rank: int | None) -> str:
        key = f"input:{index}"
        return self.add(_Site(key, f"input {index}", "input",
                              {"dtype": str(tf.as_dtype(dtype).name), "rank": str(rank)}, "", (), ()))


def _kind(layer: Any) -> str:
    cls = type(layer)
    return f"{cls.__module__}.{cls.__qualname__}"


def _functional(model: Any) -> Any | None:
    """The Keras Function holding a model's layer graph: itself, or a Sequential's."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model if hasattr(model, "_nodes_by_depth") else None


# --------------------------------------------------------------------------- keras graphs


def _keras_graph(model: keras.Model) -> _Graph:
    fn = _functional(model)
    assert fn is not None, "callers check _functional first"
    graph = _Graph(model.name, "keras layer")
    bindings = {id(kt): (graph.add_input(i, kt.dtype, len(kt.shape)), 0)
                for i, kt in enumerate(fn.inputs)}
    _expand(graph, fn, bindings)
    return graph


def _expand(graph: _Graph, fn: Any, bindings: dict[int, Ref]) -> list[Ref]:
    """Add the call sites of Keras Function `fn` whose inputs are `bindings`; nested
    functional models are expanded in place so both models are compared layer by layer."""
    refs = dict(bindings)
    for depth in sorted(fn._nodes_by_depth, reverse=True):
        for node in fn._nodes_by_depth[depth]:
            if node.is_input:
                continue
            inputs = [refs[id(kt)] for kt in node.arguments.keras_tensors]
            inner = _functional(node.operation)
            if inner is not None:
                outputs = _expand(graph, inner, {id(kt): r for kt, r in zip(inner.inputs, inputs)})
            else:
                call = _call_args(node.arguments.args, node.arguments.kwargs,
                                  lambda x: isinstance(x, keras.KerasTensor))
                key = graph.add_layer_call(node.operation, inputs, call)
                outputs = [(key, i) for i in range(len(node.outputs))]
            refs.update({id(kt): r for kt, r in zip(node.outputs, outputs)})
    return [refs[id(kt)] for kt in fn.outputs]
