"""Keep full reads of a sparsely updated variable from copying it (S3).

A sliced update writes a partly frozen variable and its slots with ResourceScatter* or
ResourceStridedSliceAssign, and reads rows of them with ResourceGather. Each of those ops
puts the variable in TensorFlow's copy-on-read mode (`EnsureSparseVariableAccess` in
tensorflow/core/kernels/training_op_helpers.h), and the mode never ends by itself: from
then on every ReadVariableOp of the variable copies the whole buffer, the forward pass's
read of a kernel and the update's reads of Adam's moments included. On the grown
1088 x 1088 kernels of bench_partial.py those copies cost more than the slicing saved.

So each full ReadVariableOp of such a variable gets a DisableCopyOnRead before it (the op
`ResourceVariable.read_value_no_copy` uses): the read aliases the buffer, and a later
sparse write copies the buffer once only if a read's value is still alive then, as
TensorFlow does for any variable. Values are the same either way; only copies change.

XLA keeps variables in its own buffers and has no DisableCopyOnRead kernel, so graphs
compiled with `jit_compile=True` are left alone.
"""

from __future__ import annotations

import networkx as nx

from .. import opkinds
from ..ir import IR, Tensor
from ..plan import Plan
from ..program import Program
from .result import PassResult

PASS = "read_without_copy"

#: Ops that put a variable in copy-on-read mode.
_SPARSE_ACCESS = ("ResourceGather", "ResourceStridedSliceAssign", *opkinds.SCATTER_PREFIXES,
                  "ResourceSparseApply")

#: Ops whose output shares their input's buffer.
_FORWARDING = frozenset({"Identity", "Reshape", "ExpandDims", "Squeeze", "StopGradient",
                         "Snapshot"})


def read_without_copy(program: Program, plan: Plan) -> PassResult:
    start = program.edits
    compiled = _compiled_graphs(program, plan)
    for placeholder in plan.capture.variable_by_placeholder:
        if placeholder not in program.main:
            continue
        uses = program.resource_uses(program.main, (placeholder, 0))
        if not any(_inserted_sparse_access(ir, node) for ir, node, _ in uses):
            continue
        for ir, node, index in uses:
            if id(ir) in compiled:
                continue
            if ir.op(node) == "ReadVariableOp":
                _disable_copy_before(ir, node, index)
            elif _inserted_sparse_access(ir, node) and opkinds.is_write(ir.op(node)):
                _wait_for_aliases(ir, node, index)
    return PassResult(program, program.edits != start)


def _inserted_sparse_access(ir: IR, node: str) -> bool:
    """A sparse access the rewrite made: a new node, or a write it turned into a scatter."""
    data = ir.graph.nodes[node]
    return bool(data.get("inserted") or data.get("modified")) and \
        ir.op(node).startswith(_SPARSE_ACCESS)


def _disable_copy_before(ir: IR, read: str, index: int) -> None:
    handle = ir.inputs(read)[index]
    disable = ir.add_node(f"{read}/graphfreeze_no_copy", "DisableCopyOnRead", [handle],
                          device=ir.device(read), inserted_by=PASS,
                          control_inputs=ir.control_inputs(read))
    ir.add_control_edge(disable, read)


def _wait_for_aliases(ir: IR, write: str, index: int) -> None:
    """Make a sparse write wait for the ops still using the reads it is ordered after.

    TensorFlow copies the whole variable before a sparse write when a read's value still
    aliases its buffer: the forward pass's read of a kernel is used again by the gradient of
    the layer's input, which often runs after the kernel's weight gradient and so after its
    update could. Waiting for those uses costs nothing on the critical path (they are on it)
    and saves the copy."""
    handle = ir.inputs(write)[index]
    later = nx.descendants(ir.graph, write)
    for read in ir.control_inputs(write):
        if ir.op(read) != "ReadVariableOp" or ir.inputs(read)[0] != handle:
            continue
        for user in _alias_users(ir, (read, 0)):
            if user != write and user not in later:
                ir.add_control_edge(user, write)


def _alias_users(ir: IR, tensor: Tensor) -> set[str]:
    """The ops using `tensor`'s buffer: its consumers, through ops that forward it."""
    users: set[str] = set()
    pending = [tensor]
    while pending:
        for node, _ in ir.consumers(pending.pop()):
            if ir.op(node) in _FORWARDING:
                pending.append((node, 0))
            else:
                users.add(node)
    return users


def _compiled_graphs(program: Program, plan: Plan) -> set[int]:
    """ids of the graphs XLA compiles: the step under jit_compile, a body whose function or
    call site asks for XLA (Keras's one_step_on_data under `fit(jit_compile=True)`), and
    everything such a graph calls."""
    roots = [program.main] if plan.capture.jit_compile else []
    for name, body in program.bodies.items():
        fdef = program.fdefs.get(name)
        if fdef is not None and _must_compile(fdef.attr):
            roots.append(body)
        for caller, call, _ in program.call_sites[name]:
            if call in caller and _must_compile(caller.nodedef(call).attr):
                roots.append(body)
    compiled: set[int] = set()
    while roots:
        ir = roots.pop()
        if id(ir) in compiled:
            continue
        compiled.add(id(ir))
        for node in program.call_nodes(ir):
            roots.extend(program.bodies[c.name] for c in program.callees(ir, node)
                         if c.name in program.bodies)
    return compiled


def _must_compile(attrs) -> bool:
    # `in` first: reading a missing key of a proto map would add it to a shared NodeDef
    return "_XlaMustCompile" in attrs and attrs["_XlaMustCompile"].b
