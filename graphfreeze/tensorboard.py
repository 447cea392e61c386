"""Write programs where TensorBoard's graph dashboard finds them.

The dashboard groups nodes by name scope, and a GraphDef's function library is drawn apart
from the ops that call it. So the whole program is written as one flat GraphDef: the step
as traced, and each function body inlined under a name scope named after it (nested as the
calls nest: `<body>/<nested body>/...`), its arguments fed from the call op's inputs. It is
a picture to look at, not a graph to run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from .bodies import Body
from .ir import IR
from .opkinds import CALL_TARGETS


def write_graph(graph_def: Any, logdir: str) -> str:
    """One event file holding `graph_def` under `logdir`; returns the directory."""
    os.makedirs(logdir, exist_ok=True)
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        tf.summary.graph(graph_def)
    writer.flush()
    writer.close()
    return logdir


def _scoped(prefix: str, text: str) -> str:
    return f"^{prefix}{text[1:]}" if text.startswith("^") else prefix + text


def _argument_sources(caller: IR, call: str, body: IR) -> list[str | None]:
    """For each argument of `body`, the caller's tensor ("node:k") the call op feeds it."""
    offset = CALL_TARGETS.get(caller.op(call), ((), 0))[1]
    inputs = caller.inputs(call)
    return [f"{inputs[offset + k][0]}:{inputs[offset + k][1]}" if offset + k < len(inputs) else None
            for k in range(len(body.args))]


def program_graph_def(bodies: Sequence[Body], *, rewritten: bool = True) -> Any:
    """The step and its bodies (the rewritten ones, or the traced ones) as one GraphDef."""
    out = graph_pb2.GraphDef()
    graphs = {b.name: (b, b.rewritten if rewritten else b.original) for b in bodies}
    for body, ir in graphs.values():
        if ir is None:
            continue
        if body.is_step:
            out.versions.CopyFrom(ir.versions)
        prefix = f"{body.path}/" if body.path else ""
        caller = graphs.get(body.parent, (None, None))[1] if body.parent is not None else None
        sources: list[str | None] = []
        if caller is not None and body.call_node is not None and body.call_node in caller:
            sources = _argument_sources(caller, body.call_node, ir)
        caller_prefix = f"{body.path.rpartition('/')[0]}/" if "/" in body.path else ""
        fed = {arg: src for arg, src in zip(ir.args, sources) if src is not None}
        for nd in ir.to_graph_def(library=graph_pb2.GraphDef().library).node:
            node = out.node.add()
            node.CopyFrom(nd)
            node.name = prefix + nd.name
            node.input[:] = [_scoped(prefix, t) for t in nd.input]
            if nd.name in fed:
                node.input.append(caller_prefix + fed[nd.name])
            if "_class" in node.attr:  # colocation hints name unscoped nodes
                del node.attr["_class"]
    return out

