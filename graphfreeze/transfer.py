"""Transfer: find the layers two Keras models have in common, copy their weights, freeze them.

Seed 003 (several architectures share early layers) and seed 001 (reuse a saved network's
lower layers). Layers are matched on the models' dataflow graphs, never on names:

1. Each model becomes a networkx ``MultiDiGraph`` of *call sites*: one node per layer call,
   an edge ``producer -> consumer`` keyed by the consumer's input position and carrying the
   producer's output index; the model inputs are roots ``input:0``, ``input:1``...
   Functional and Sequential models use their Keras layer graph, with nested functional
   models expanded in place. A model without one (subclassed) is traced with
   ``tf.function`` while ``Layer.__call__`` is recorded: calls of layers that are not models
   become the nodes (models are expanded, as above), and the TensorFlow ops between them
   (``x + shortcut``, ``tf.nn.relu`` written in ``call``) become weightless nodes of kind
   ``tf.<OpType>``, so they take part in the structure too. When either model needs
   tracing, both are traced, so the two graphs are always built the same way.
2. The target graph is walked in topological order. A target node matches a source node
   when every inbound node is already matched to the source node's inbound node in the same
   input position, and the two have the same layer class, the same configuration that
   matters and the same variable names, shapes and dtypes. The result is the largest common
   prefix from the inputs, extended through branches exactly where both graphs agree; the
   first difference stops the match for everything downstream.
3. A layer is transferred when all of its call sites matched call sites of one source layer.
   Weightless layers must match for the walk to pass through them, but only layers with
   weights are reported as pairs and returned as rules.

"Configuration that matters" is ``get_config()`` without what changes only starting values
or training behaviour: ``name``, ``trainable``, ``dtype``, ``seed``, ``*_initializer``,
``*_regularizer``, ``*_constraint``, ``momentum``, ``dropout``, ``recurrent_dropout``,
``unit_forget_bias``, ``quantization_config``; noise layers (``*Dropout``, ``*Noise``) are
the identity at inference, so only their class must agree.

Why the trace records layer calls instead of reading name scopes: inside a trace TensorFlow
uniquifies name scopes (the layer ``a`` may run under ``a_1/``, which is also the scope
another layer named ``a_1`` would get), and weightless layers have no ``ReadVariableOp`` to
locate them by.

>>> rules = gf.transfer("pretrained.keras", new_model)          # doctest: +SKIP
>>> print(rules)                                                 # doctest: +SKIP
>>> step = gf.freeze(*rules)(train_step)                         # doctest: +SKIP
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import keras
import networkx as nx
import numpy as np
import tensorflow as tf

from .errors import FreezeError
from .text import format_shape, text_table
from .variables import resource_variable, variable_path

__all__ = ["TransferError", "LayerPair", "Unmatched", "MatchReport", "Transferred",
           "match_layers", "transfer", "transfer_report"]

SourceLike: TypeAlias = keras.Model | str | os.PathLike[str]
Architecture: TypeAlias = keras.Model | Callable[[], keras.Model]
GraphMode: TypeAlias = Literal["auto", "keras", "traced"]
Ref: TypeAlias = tuple[str, int]   # (producer node key, producer output index)

# Configuration that does not change what a layer computes at inference, or only its
# starting values: two layers differing in these still share transferable weights.
_IGNORED_KEYS = frozenset({"name", "trainable", "dtype", "seed", "momentum", "renorm_momentum",
                           "dropout", "recurrent_dropout", "unit_forget_bias",
                           "quantization_config"})
_IGNORED_SUFFIXES = ("_initializer", "_regularizer", "_constraint")
_MATCHABLE_ROOTS = ("input", "constant")
_TRANSPARENT_OPS = frozenset({"Identity", "StopGradient"})


class TransferError(FreezeError):
    """A transfer cannot be done: unreadable or incompatible source, no common layer, a
    checkpoint missing variables. Raised before any target weight changes.

    >>> gf.transfer("model.weights.h5", new_model)                      # doctest: +SKIP
    Traceback (most recent call last):
    graphfreeze.transfer.TransferError: ... it holds weights but no dataflow graph ... Pass architecture= ...
    """


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LayerPair:
    """One transferred layer: `source`'s weights go to `target` (same shapes, in order)."""

    source: Any
    target: Any
    weights: tuple[tuple[str, tuple[int, ...], str], ...]   # (name, shape, dtype)

    @property
    def parameters(self) -> int:
        return sum(int(np.prod(shape)) for _, shape, _ in self.weights)

    def describe_weights(self) -> str:
        return ", ".join(f"{n} {format_shape(s)}" for n, s, _ in self.weights)


@dataclass(frozen=True)
class Unmatched:
    """A target layer (or the weightless node where the match stopped) and why."""

    target: str
    kind: str
    reason: str
    weighted: bool
    layer: Any = None


@dataclass
class MatchReport:
    """What matched between two models, and why the rest did not.

    `pairs` are the layers with weights whose call sites all matched; `structure` lists every
    matched call site as ``(source, target, kind)``, weightless ones included; `unmatched`
    holds each target layer with weights left out, plus the weightless nodes where the match
    stopped, with the reason.

    >>> report = gf.transfer_report("pretrained.keras", new_model)      # doctest: +SKIP
    >>> print(report.summary())                                         # doctest: +SKIP
    >>> [(p.source.name, p.target.name) for p in report.pairs]          # doctest: +SKIP
    """

    source: str
    target: str
    method: str
    pairs: list[LayerPair]
    structure: list[tuple[str, str, str]]
    unmatched: list[Unmatched]
    target_sites: int

    @property
    def parameters(self) -> int:
        """Parameters in the matched target layers."""
        return sum(p.parameters for p in self.pairs)

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def summary(self) -> str:
        """One sentence: how many layers with weights match, and how much structure."""
        weighted = len(self.pairs) + sum(u.weighted for u in self.unmatched)
        if not self.pairs:
            return (f"no common layer: none of the target's {weighted} layer(s) with weights "
                    f"matches the source ({self.method} graphs); see why below.")
        return (f"{len(self.pairs)} of {weighted} target layer(s) with weights match "
                f"({self.parameters:,} parameters); {len(self.structure)} of "
                f"{self.target_sites} target call sites are in the common structure.")

    def __str__(self) -> str:
        lines = [f"transfer: {self.source} -> target {self.target!r} ({self.method} graphs)",
                 self.summary()]
        if self.pairs:
            lines += ["", _table(("source", "target", "layer", "weights"), [
                (p.source.name, p.target.name, type(p.target).__name__, p.describe_weights())
                for p in self.pairs])]
        if self.unmatched:
            lines += ["", "not transferred:", _table(("target", "layer", "why"), [
                (u.target + ("" if u.weighted else " (no weights)"), u.kind, u.reason)
                for u in self.unmatched])]
        return "\n".join(lines)


class Transferred(list[Any]):
    """The rules `transfer` returns (target layers to freeze), plus what it did.

    A plain list for `gf.freeze(*rules)` / `gf.rewrite(fn, rules, ...)`; `.pairs` are the
    copied layers, `.report` the full `MatchReport`, `.source_model` the model the weights
    came from (loaded from the file when the source was a path). ``str()`` shows the table.

    >>> rules = gf.transfer("pretrained.keras", new_model)              # doctest: +SKIP
    >>> print(rules)                         # the match table          # doctest: +SKIP
    >>> train_step = gf.freeze(*rules)(train_step)                      # doctest: +SKIP
    """

    def __init__(self, rules: Iterable[Any], report: MatchReport, source_model: keras.Model):
        super().__init__(rules)
        self.report = report
        self.pairs = list(report.pairs)
        self.source_model = source_model

    def __str__(self) -> str:
        return str(self.report)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    return "\n".join(text_table(header, rows))


# --------------------------------------------------------------------------- call-site graph


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


# --------------------------------------------------------------------------- traced graphs


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
        while tensor.name not in self.produced and tensor.op.type in _TRANSPARENT_OPS:
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


# --------------------------------------------------------------------------- matching


@dataclass
class _Matching:
    mapping: dict[str, str]        # target key -> source key
    reasons: dict[str, str]        # target key -> why it did not match
    after: dict[str, str]          # target key -> the unmatched inbound key that stopped it


def _same(s: _Site, t: _Site) -> bool:
    return (s.kind, s.config, s.call, s.weights) == (t.kind, t.config, t.call, t.weights)


def _match(source: _Graph, target: _Graph, excluded: set[int]) -> _Matching:
    by_inputs: dict[tuple[Ref, ...], list[str]] = defaultdict(list)
    for key in source.order:
        by_inputs[source.site(key).inputs].append(key)
    m = _Matching({}, {}, {})
    taken: set[str] = set()
    for key in nx.topological_sort(target.nx):
        site = target.site(key)
        if site.layer is not None and id(site.layer) in excluded:
            m.reasons[key] = "excluded by the caller"
            continue
        stopped = next((p for p, _ in site.inputs if p not in m.mapping), None)
        if stopped is not None:
            m.after[key] = stopped
            continue
        expected = tuple((m.mapping[p], i) for p, i in site.inputs)
        if site.inputs:
            candidates = by_inputs.get(expected, [])
        else:
            candidates = [key] if site.kind in _MATCHABLE_ROOTS and key in source else []
        free = [c for c in candidates if c not in taken]
        hit = next((c for c in free if _same(source.site(c), site)), None)
        if hit is None:
            m.reasons[key] = _why(source, site, expected, candidates, free)
            continue
        m.mapping[key] = hit
        if site.kind != "constant":   # one constant may feed any number of ops
            taken.add(hit)
    return m


def _why(source: _Graph, site: _Site, expected: tuple[Ref, ...], candidates: list[str],
         free: list[str]) -> str:
    if not candidates:
        return _no_candidate(source, site, expected)
    if not free:
        names = ", ".join(repr(source.site(c).label) for c in candidates)
        return f"its source counterpart ({names}) is already matched to another target call"
    sites = [source.site(c) for c in free]
    s = next((x for x in sites if x.kind == site.kind), sites[0])
    where = f"source {s.label!r}"
    if s.kind != site.kind:
        return f"layer kind differs: {_short_kind(s.kind)} in the {where}"
    if s.config != site.config:
        keys = sorted(set(s.config) | set(site.config), key=lambda k: (k not in site.config, k))
        k = next(x for x in keys if s.config.get(x) != site.config.get(x))
        return (f"config differs: {k} = {site.config.get(k, '(unset)')} here, "
                f"{s.config.get(k, '(unset)')} in the {where}")
    if s.call != site.call:
        return f"call arguments differ: {site.call} here, {s.call} in the {where}"
    return _weights_differ(s, site, where)


def _weights_differ(s: _Site, t: _Site, where: str) -> str:
    if [v[0] for v in s.weights] != [v[0] for v in t.weights]:
        return (f"weights differ: {[v[0] for v in t.weights]} here, "
                f"{[v[0] for v in s.weights]} in the {where}")
    for (name, ts, td), (_, ss, sd) in zip(t.weights, s.weights):
        if ts != ss:
            return f"shape differs: {name} {list(ts)} here, {list(ss)} in the {where}"
        if td != sd:
            return f"dtype differs: {name} {td} here, {sd} in the {where}"
    return f"differs from the {where}"


def _no_candidate(source: _Graph, site: _Site, expected: tuple[Ref, ...]) -> str:
    if not site.inputs:
        return f"no candidate: the source has no {site.label}"
    producers = list(dict.fromkeys(p for p, _ in expected))
    labels = ", ".join(repr(source.site(p).label) for p in producers)
    readers = sorted({c for p in producers for c in source.nx.successors(p)}, key=source.order.index)
    if not readers:
        return f"no candidate: nothing in the source reads the output of {labels}"
    names = ", ".join(repr(source.site(c).label) for c in readers[:3])
    return (f"inbound layers differ: no source call reads ({labels}) in these positions; "
            f"in the source they feed {names}")


def _short_kind(kind: str) -> str:
    return kind.rsplit(".", 1)[-1]


def _root_cause(m: _Matching, key: str) -> str:
    """The first unmatched node upstream of `key` whose own inputs all matched."""
    while key in m.after:
        key = m.after[key]
    return key


def _unmatched_reason(target: _Graph, m: _Matching, keys: list[str]) -> tuple[str, str | None]:
    """Why a target layer (all its call sites `keys`) was left, and the node to blame."""
    missing = next((k for k in keys if k not in m.mapping), None)
    if missing is None:
        return "its calls match different source layers (weights shared here, not there)", None
    cause = _root_cause(m, missing)
    if cause == missing:
        return m.reasons[cause], cause
    return f"after {target.site(cause).label!r}, which did not match", cause


def _report(source: _Graph, target: _Graph, m: _Matching, source_desc: str) -> MatchReport:
    calls: dict[int, list[str]] = defaultdict(list)
    for key in target.order:
        if target.site(key).layer is not None:
            calls[id(target.site(key).layer)].append(key)
    pairs, unmatched, blamed = [], [], set()
    for keys in calls.values():
        t = target.site(keys[0])
        owners = {id(source.site(m.mapping[k]).layer) for k in keys if k in m.mapping}
        if len(owners) == 1 and all(k in m.mapping for k in keys):
            if t.weights:
                pairs.append(LayerPair(source.site(m.mapping[keys[0]]).layer, t.layer, t.weights))
        elif t.weights:
            reason, cause = _unmatched_reason(target, m, keys)
            blamed.add(cause)
            unmatched.append(Unmatched(t.label, _short_kind(t.kind), reason, True, t.layer))
    # A weightless node where the match stopped explains the layers after it: show it too.
    for key in target.order:
        site = target.site(key)
        if key in blamed and not site.weights:
            unmatched.append(Unmatched(site.label, _short_kind(site.kind), m.reasons[key], False,
                                       site.layer))
    structure = [(source.site(s).label, target.site(t).label, _short_kind(target.site(t).kind))
                 for t, s in m.mapping.items() if target.site(t).layer is not None]
    return MatchReport(source_desc, target.name, source.method, pairs, structure, unmatched,
                       target_sites=sum(1 for k in target.order if target.site(k).layer is not None))


# --------------------------------------------------------------------------- sources


def _as_model(obj: Any, what: str) -> keras.Model:
    if isinstance(obj, keras.Model):
        return obj
    raise TransferError(f"{what} must be a Keras model, got {type(obj).__name__} {obj!r}; "
                        "wrap a single layer in keras.Sequential([keras.Input(...), layer]).")


def _built(model: keras.Model, example_inputs: Any, what: str) -> keras.Model:
    if model.built and model.variables:
        return model
    if model.built or example_inputs is None:
        raise TransferError(f"{what} {model.name!r} has no variables yet; build it (give it a "
                            "keras.Input or call it once) or pass example_inputs=.")
    try:
        model(tf.nest.map_structure(tf.convert_to_tensor, example_inputs))
    except Exception as e:
        raise TransferError(f"building {what} {model.name!r} by calling it on example_inputs "
                            f"failed with {type(e).__name__}: {e}") from e
    return model


def _architecture(architecture: Architecture | None, path: str, kind: str,
                  example_inputs: Any) -> keras.Model:
    if architecture is None:
        raise TransferError(
            f"{path} is a {kind}: it holds weights but no dataflow graph to match layers on. "
            "Pass architecture= (the model that saved it, or a zero-argument function that "
            "builds it); the weights are loaded into it and its graph is matched against the "
            "target. Or save the full model with model.save('model.keras').")
    arch = architecture
    if not isinstance(architecture, keras.Model) and callable(architecture):
        try:
            arch = architecture()
        except Exception as e:
            raise TransferError(f"architecture() raised {type(e).__name__}: {e}; it must build "
                                f"the model that wrote {path}.") from e
    return _built(_as_model(arch, "architecture (or what it returns)"), example_inputs, "architecture")


def _load_weights_h5(path: str, arch: keras.Model) -> None:
    backup = _snapshot(arch)
    try:
        arch.load_weights(path)
    except Exception as e:
        _restore(arch, backup)
        raise TransferError(f"cannot load the weights file {path} into architecture "
                            f"{arch.name!r}: {e}. The architecture must be the one that saved "
                            "the file (model.save_weights).") from e


def _snapshot(model: keras.Model) -> list[np.ndarray]:
    return [np.array(v.numpy(), copy=True) for v in model.variables]


def _restore(model: keras.Model, values: list[np.ndarray]) -> None:
    for v, value in zip(model.variables, values):
        v.assign(value)


def _checkpoint_prefix(path: str) -> str:
    if path.endswith(".index"):
        return path[: -len(".index")]
    if not os.path.isdir(path):
        return path
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        raise TransferError(f"{path} is a SavedModel, which transfer does not read: it may hold no "
                            "Keras layers. Load the model yourself and pass it as the source, or "
                            "save it as a .keras file.")
    latest = tf.train.latest_checkpoint(path)
    if latest:
        return latest
    indexes = sorted(glob.glob(os.path.join(path, "*.index")))
    if len(indexes) == 1:   # written by Checkpoint.write(), which keeps no state file
        return indexes[0][: -len(".index")]
    raise TransferError(f"{path} is a directory without a checkpoint: no 'checkpoint' state file "
                        f"and {len(indexes)} '*.index' files. Pass the checkpoint prefix (e.g. "
                        f"{os.path.join(path, 'ckpt-1')}).")


def _checkpoint_children(prefix: str) -> list[str]:
    from tensorflow.core.protobuf import trackable_object_graph_pb2
    try:
        reader = tf.train.load_checkpoint(prefix)
        proto = trackable_object_graph_pb2.TrackableObjectGraph()
        proto.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    except Exception as e:
        raise TransferError(f"cannot read the checkpoint {prefix}: {type(e).__name__}: {e}. "
                            "Pass a directory written by tf.train.Checkpoint.save / "
                            "CheckpointManager, or a checkpoint prefix.") from e
    return [c.local_name for c in proto.nodes[0].children]


def _unmatched_variables(status: Any, arch: keras.Model) -> list[str] | None:
    objects = getattr(getattr(status, "_checkpoint", None), "object_by_proto_id", None)
    if objects is None:
        return None
    matched = {id(o) for o in objects.values()}
    return [v.path for v in arch.variables
            if id(v) not in matched and id(resource_variable(v)) not in matched]


def _try_restore(prefix: str, arch: keras.Model, child: str | None) -> tuple[int, str, str] | None:
    """None if the checkpoint object `child` (None: the root) holds every variable of `arch`;
    else (how many are missing, where, which)."""
    where = "the checkpoint root" if child is None else f"{child!r}"
    try:
        ckpt = tf.train.Checkpoint(root=arch) if child is None else tf.train.Checkpoint(**{child: arch})
        status = ckpt.read(prefix)
        status.expect_partial()
        status.assert_existing_objects_matched()
    except AssertionError as e:
        missing = _unmatched_variables(status, arch)
        if missing:
            return len(missing), where, ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        return len(arch.variables), where, str(e).splitlines()[0]
    except (ValueError, AttributeError, tf.errors.OpError) as e:   # a shape that differs
        return len(arch.variables), where, str(e).splitlines()[0]
    return None


def _load_checkpoint(path: str, arch: keras.Model) -> None:
    """Restore `arch` from the checkpoint object that holds all of its variables: the child
    saved as ``model=`` first, then every other child, then the root."""
    prefix = _checkpoint_prefix(path)
    children = _checkpoint_children(prefix)
    backup = _snapshot(arch)
    failures = []
    candidates = sorted((c for c in children if c != "save_counter"), key=lambda c: c != "model")
    for child in [*candidates, None]:
        failure = _try_restore(prefix, arch, child)
        if failure is None:
            return
        _restore(arch, backup)
        failures.append(failure)
    count, where, detail = min(failures)
    raise TransferError(
        f"checkpoint {prefix} is missing variables of architecture {arch.name!r}: the closest "
        f"match ({where}) leaves {count} of {len(arch.variables)} variable(s) without a value: "
        f"{detail}. "
        f"Objects at the checkpoint root: {children}. Pass the architecture that wrote it.")


def _resolve_source(source: SourceLike, architecture: Architecture | None,
                    example_inputs: Any) -> tuple[keras.Model, str]:
    """The source as a model with weights, and how to name it in messages."""
    if isinstance(source, keras.Model):
        return _built(source, example_inputs, "source model"), f"model {source.name!r}"
    if not isinstance(source, (str, os.PathLike)):
        raise TransferError(f"source must be a Keras model, a .keras / .weights.h5 file or a "
                            f"tf.train.Checkpoint directory, got {type(source).__name__} {source!r}.")
    path = os.fspath(source)
    checkpoint = os.path.isdir(path) or path.endswith(".index") or os.path.exists(path + ".index")
    if not checkpoint and not os.path.exists(path):
        raise TransferError(f"source file {path} does not exist.")
    if checkpoint:
        arch = _architecture(architecture, path, "tf.train.Checkpoint", example_inputs)
        _load_checkpoint(path, arch)
        return arch, f"checkpoint {path} (architecture {arch.name!r})"
    if path.endswith(".weights.h5"):
        arch = _architecture(architecture, path, "weights-only file", example_inputs)
        _load_weights_h5(path, arch)
        return arch, f"weights {path} (architecture {arch.name!r})"
    if path.endswith((".keras", ".h5", ".hdf5")):
        return _load_model(path), f"file {path}"
    raise TransferError(f"source {path} is not a file type transfer reads: expected a .keras "
                        "model, a .weights.h5 file (with architecture=), or a tf.train.Checkpoint "
                        "directory or prefix (with architecture=).")


def _load_model(path: str) -> keras.Model:
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:
        raise TransferError(f"cannot load the model file {path}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}. A .keras file is "
                            "written by model.save('name.keras'); a .weights.h5 file needs "
                            "architecture=.") from e
    return _as_model(model, f"the object saved in {path}")


# --------------------------------------------------------------------------- public API


def _matched(source: SourceLike, target: keras.Model, architecture: Architecture | None,
             example_inputs: Any, graph: GraphMode, exclude: Iterable[Any]
             ) -> tuple[MatchReport, keras.Model]:
    if graph not in ("auto", "keras", "traced"):
        raise TransferError(f"graph={graph!r}: expected 'auto', 'keras' or 'traced'.")
    target = _built(_as_model(target, "target"), example_inputs, "target model")
    model, desc = _resolve_source(source, architecture, example_inputs)
    excluded = {id(_excluded_layer(target, e)) for e in exclude}
    src, tgt = _graphs(model, target, graph, example_inputs)
    return _report(src, tgt, _match(src, tgt, excluded), desc), model


def _excluded_layer(target: keras.Model, item: Any) -> Any:
    if isinstance(item, keras.layers.Layer):
        return item
    if not isinstance(item, str):
        raise TransferError(f"exclude: expected target layers or layer names, got "
                            f"{type(item).__name__} {item!r}.")
    try:
        return target.get_layer(item)
    except ValueError:
        raise TransferError(f"exclude: the target {target.name!r} has no layer named {item!r}; "
                            f"its layers: {[layer.name for layer in target.layers][:10]}.") from None


def match_layers(source: SourceLike, target: keras.Model, *,
                 architecture: Architecture | None = None, example_inputs: Any = None,
                 graph: GraphMode = "auto", exclude: Iterable[Any] = ()) -> list[tuple[Any, Any]]:
    """The ``(source_layer, target_layer)`` pairs of layers with weights the two models have
    in common, matched on their dataflow graphs (class, configuration that matters, variable
    shapes, and position from the inputs), not on names. Nothing is copied.

    `source` is a model or a file (see `transfer`). `graph`: ``"keras"`` uses the Keras layer
    graphs (functional and Sequential models), ``"traced"`` traces both models' forward
    functions (needed for subclassed models; `example_inputs` if a model has no
    ``model.inputs``), ``"auto"`` uses the layer graphs when both models have one.
    `exclude`: target layers (or names of its top-level layers) that must not match, such as
    a new head that happens to have the old head's shape; the match stops there.

    >>> pairs = gf.match_layers(pretrained, new_model)             # doctest: +SKIP
    >>> [(s.name, t.name) for s, t in pairs]                        # doctest: +SKIP
    [('hidden1', 'layer_a'), ('hidden2', 'layer_b')]
    """
    report, _ = _matched(source, target, architecture, example_inputs, graph, exclude)
    return [(p.source, p.target) for p in report.pairs]


def transfer_report(source: SourceLike, target: keras.Model, *,
                    architecture: Architecture | None = None, example_inputs: Any = None,
                    graph: GraphMode = "auto", exclude: Iterable[Any] = ()) -> MatchReport:
    """What `transfer` would copy, and why every other target layer would be left; copies
    nothing. Arguments as for `transfer`.

    >>> print(gf.transfer_report("pretrained.keras", new_model))   # doctest: +SKIP
    """
    report, _ = _matched(source, target, architecture, example_inputs, graph, exclude)
    return report


def transfer(source: SourceLike, target: keras.Model, freeze: bool = True, *,
             architecture: Architecture | None = None, example_inputs: Any = None,
             graph: GraphMode = "auto", exclude: Iterable[Any] = ()) -> Transferred:
    """Copy the weights of the layers `target` has in common with `source` (bitwise) and
    return the rules that freeze them: the matched target layers, or ``[]`` when
    ``freeze=False``. The returned list carries ``.pairs`` and ``.report``; ``str()`` shows
    each pair with its shapes and why the other target layers were left.

    `source` may be a Keras model, a ``.keras`` (or legacy ``.h5``) model file, a
    ``.weights.h5`` file, or a ``tf.train.Checkpoint`` directory or prefix. The last two hold
    no dataflow graph, so they need `architecture`: the model that saved them, or a
    zero-argument function building it. The weights are loaded into it (a model passed
    here has its weights overwritten) and its graph is matched against the target's. A
    checkpoint is searched for the object holding the whole architecture (saved as
    ``Checkpoint(model=...)``, any other name, or the root).

    Raises `TransferError` (a `FreezeError`) for an unreadable or wrong file, a checkpoint
    missing the architecture's variables, or - when ``freeze=True`` - no common layer;
    with ``freeze=False`` no common layer gives an empty result whose report says why.
    Every shape is checked before the first assignment: on an error no target weight
    changes. See `match_layers` for `graph`, `example_inputs` and `exclude`.

    >>> rules = gf.transfer("pretrained.keras", new_model)         # doctest: +SKIP
    >>> print(rules)                                                # doctest: +SKIP
    >>> train_step = gf.freeze(*rules)(train_step)                  # doctest: +SKIP
    """
    report, model = _matched(source, target, architecture, example_inputs, graph, exclude)
    if not report.pairs and freeze:
        raise TransferError(f"nothing to transfer from {report.source} to {target.name!r}, so "
                            f"nothing to freeze.\n{report}")
    _copy(report.pairs)
    return Transferred([p.target for p in report.pairs] if freeze else [], report, model)


def _copy(pairs: Sequence[LayerPair]) -> None:
    """Assign every source value to its target variable, all shapes checked first."""
    plan = []
    for pair in pairs:
        src, dst = list(pair.source.weights), list(pair.target.weights)
        if len(src) != len(dst):
            raise TransferError(f"layer {pair.target.name!r} has {len(dst)} weights, its source "
                                f"{pair.source.name!r} {len(src)}; nothing was copied.")
        for s, d in zip(src, dst):
            if tuple(s.shape) != tuple(d.shape) or tf.as_dtype(s.dtype) != tf.as_dtype(d.dtype):
                raise TransferError(f"cannot copy {variable_path(s)} {list(s.shape)} {s.dtype} to "
                                    f"{variable_path(d)} {list(d.shape)} {d.dtype}; nothing was "
                                    "copied.")
            plan.append((d, np.array(s.numpy(), copy=True)))
    backup = [np.array(d.numpy(), copy=True) for d, _ in plan]
    try:
        for d, value in plan:
            d.assign(value)
    except Exception as e:
        for (d, _), old in zip(plan, backup):
            d.assign(old)
        raise TransferError(f"copying the transferred weights failed ({type(e).__name__}: {e}); "
                            "the target's weights were restored.") from e
