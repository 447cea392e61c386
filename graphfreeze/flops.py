"""Rough FLOP counts per op from the static shapes kept on the IR.

Only the order of magnitude matters (the report says how much backward and optimizer work
a rewrite removed), so the table covers what dominates training steps: matrix products
and convolutions exactly, everything else as one FLOP per output (or input, for
reductions) element, bookkeeping ops as free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod
from typing import Any

import networkx as nx

from .opkinds import CALL_TARGETS, CONVOLUTIONS, COST_FREE, COST_REDUCTIONS


def _size(shape: Sequence[Any] | None) -> int | None:  # dims: int, or None when unknown
    if shape is None or any(d is None or d < 0 for d in shape):
        return None
    return prod(shape)


def _output_shapes(graph: nx.MultiDiGraph, node: str, traced: Mapping[str, list] | None) -> list:
    """A node's output shapes, each unknown one taken from `traced` when it has it."""
    shapes = list(graph.nodes[node].get("shapes") or ())
    known = traced.get(node) if traced else None
    if not known:
        return shapes
    if not shapes:
        return list(known)
    return [s if _size(s) is not None or k >= len(known) else known[k] for k, s in enumerate(shapes)]


def _input_shapes(graph: nx.MultiDiGraph, node: str, traced: Mapping[str, list] | None) -> list:
    found = []
    for src, _, attrs in graph.in_edges(node, data=True):
        if attrs["control"]:
            continue
        shapes = _output_shapes(graph, src, traced)
        k = attrs["src_output"]
        found.append((attrs["dst_input"], shapes[k] if k < len(shapes) else None))
    return [s for _, s in sorted(found, key=lambda x: x[0])]


def op_flops(graph: nx.MultiDiGraph, node: str, traced: Mapping[str, list] | None = None) -> int | None:
    """Estimated FLOPs of one execution of `node`; None when shapes are unknown.

    `traced` (node -> output shapes) fills in shapes the graph does not know (a function
    body loaded from its FunctionDef has lost the shapes of the variables it reads).
    A call op is free here: its work is in the body it calls.
    """
    data = graph.nodes[node]
    op = data["op"]
    if op in COST_FREE or op in CALL_TARGETS:
        return 0
    outs = _output_shapes(graph, node, traced)
    out = _size(outs[0]) if outs else 0
    ins = _input_shapes(graph, node, traced)
    if op in ("MatMul", "BatchMatMulV2", "BatchMatMul"):
        nd = data["nodedef"]
        a = ins[0] if ins else None
        if a is None or out is None or len(a) < 2:
            return None
        adj = nd.attr["transpose_a"].b or nd.attr["adj_x"].b
        k = a[-2] if adj else a[-1]
        return None if k is None else 2 * out * k
    if op in CONVOLUTIONS:
        # Forward, input-gradient and filter-gradient convolutions all do one multiply-add
        # per (output-side element, window entry); the window is kh*kw*Cin (kh*kw when
        # depthwise). The output side is the forward output, or the incoming gradient.
        if op.endswith("BackpropFilter"):
            grad, filt = (ins[2] if len(ins) > 2 else None), (outs[0] if outs else None)
        elif op.endswith("BackpropInput"):
            grad, filt = (ins[2] if len(ins) > 2 else None), (ins[1] if len(ins) > 1 else None)
        else:
            grad, filt = (outs[0] if outs else None), (ins[1] if len(ins) > 1 else None)
        grad_size = _size(grad)
        if grad_size is None or filt is None or len(filt) < 3:
            return None
        window = prod(filt[:-2]) * (1 if op.startswith("Depthwise") else filt[-2])
        return 2 * grad_size * window
    if op in COST_REDUCTIONS:
        return _size(ins[0]) if ins else None
    return out
