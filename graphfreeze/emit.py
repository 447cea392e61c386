"""Back end: turn a rewritten IR into an ordinary TensorFlow callable.

The GraphDef is imported inside a fresh `tf.function` whose only arguments are the flat
user inputs. Each variable handle the graph still uses is captured into the new function
(so the same variable objects are read and written and checkpoints are unaffected) and
watched (so a caller's GradientTape sees reads through it in forward mode). Because the
nodes are imported in program order, the new function's automatic control dependencies
re-derive the read/write order of every resource and collect every remaining side effect
as a control output; nothing is pruned away by accident. Device strings on the nodes are
kept as traced. The result works eagerly, inside another tf.function, and under XLA when
the traced step asked for ``jit_compile=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from .capture import Capture
from .program import Program
from .protos import drop_missing_colocations

IMPORT_SCOPE = "rewritten"


@dataclass
class Emitted:
    function: Any           # tf.function over the flat inputs, with an input signature
    graph_def: Any          # what was imported (also handy for inspection)
    renamed: dict           # library function -> the fresh name of its rewritten body

    @property
    def concrete_function(self) -> Any:
        return self.function.get_concrete_function()


def emit(program: Program, capture: Capture) -> Emitted:
    """The rewritten step as a tf.function over the step's flat inputs."""
    graph_def, renamed = program.to_graph_def()
    _register_new_functions(graph_def, program)
    function = import_as_function(graph_def, capture, capture.input_placeholders,
                                  capture.structured_outputs,
                                  f"graphfreeze_{identifier(capture.function_name)}")
    return Emitted(function, graph_def, renamed)


def import_as_function(graph_def: Any, capture: Capture, inputs: list[str], outputs: Any,
                       name: str, input_specs: dict[str, Any] | None = None) -> Any:
    """A tf.function importing `graph_def`, fed `inputs` (placeholder names, in argument
    order) and returning `outputs` (a structure of tensors of the traced graph, or of
    "node:k" names). The variables and call-time values the graph captured are captured
    again, so the function reads and writes the same variable objects."""
    input_specs = input_specs or {}
    fed = set(inputs) | set(capture.captured) | set(capture.deferred)
    graph_def = _without(graph_def, fed)
    referenced = _referenced(graph_def)
    used_captures = [p for p in capture.captured if p in referenced]
    used_deferred = [p for p in capture.deferred if p in referenced]
    variables = capture.variable_by_placeholder
    signature = [input_specs.get(p) or tf.TensorSpec(_shape(capture, p),
                                                      tf.as_dtype(capture.meta[p][0][0]), name=p)
                 for p in inputs]
    flat_outputs = tf.nest.flatten(outputs, expand_composites=True)
    names = [t.name if isinstance(t, tf.Tensor) else t for t in flat_outputs]
    fetch = sorted({n for n in names if isinstance(n, str) and n.rpartition(":")[0] not in fed})

    def imported(*flat_inputs):
        graph = tf.compat.v1.get_default_graph()
        input_map = {f"{p}:0": t for p, t in zip(inputs, flat_inputs)}
        for p in used_captures:
            input_map[f"{p}:0"] = graph.capture(capture.captured[p])
            var = variables.get(p)
            if var is not None:
                graph.watch_variable(var.variable)
        for p in used_deferred:  # e.g. collective instance keys, fetched anew at each call
            closure, spec = capture.deferred[p]
            input_map[f"{p}:0"] = graph.capture_call_time_value(closure, spec)
        results = tf.graph_util.import_graph_def(
            graph_def, input_map={k: v for k, v in input_map.items()
                                  if k.rpartition(":")[0] in referenced},
            return_elements=fetch, name=IMPORT_SCOPE)
        values = dict(zip(fetch, results or []))
        values.update(input_map)
        leaves = [values[n] if isinstance(n, str) else t for n, t in zip(names, flat_outputs)]
        return tf.nest.pack_sequence_as(outputs, leaves, expand_composites=True)

    imported.__name__ = name
    function = tf.function(imported, input_signature=signature, jit_compile=capture.jit_compile,
                           autograph=False)
    # Trace now, so that failures surface at rewrite time rather than at the first call.
    function.get_concrete_function()
    return function


def _without(graph_def: Any, names: set[str]) -> Any:
    """`graph_def` without the fed placeholders `names`, and without the colocation hints
    naming them (TF1 and tf_keras legacy optimizers colocate each fused update with its
    variable's handle, which is fed through the input map, not imported)."""
    out = type(graph_def)()
    out.CopyFrom(graph_def)
    del out.node[:]
    out.node.extend(n for n in graph_def.node if n.name not in names)
    kept = {n.name for n in out.node}
    for n in out.node:
        if "_class" in n.attr:
            drop_missing_colocations(n, kept)
    return out


def _register_new_functions(graph_def: Any, program: Program) -> None:
    """Bodies rewritten under fresh names must be known to the runtime before any call op
    that names them runs (the importer only attaches them to the importing graph)."""
    from tensorflow.python.eager import context

    known = set(program.fdefs)
    ctx = context.context()
    for fdef in graph_def.library.function:  # registration does not resolve the calls a
        if fdef.signature.name not in known:  # body makes, so the order does not matter
            ctx.add_function_def(fdef)


def _shape(capture: Capture, placeholder: str) -> Any:
    shape = capture.meta[placeholder][1][0]
    return None if shape is None else list(shape)


def identifier(name: str) -> str:
    """`name` with every character that may not appear in a function name replaced."""
    return "".join(c if c.isalnum() else "_" for c in name)


def _referenced(graph_def: Any) -> set[str]:
    """Node names some imported node reads (placeholders fed through the input map)."""
    refs = set()
    for n in graph_def.node:
        for text in n.input:
            if not text.startswith("^"):
                refs.add(text.rpartition(":")[0] if ":" in text else text)
    return refs
