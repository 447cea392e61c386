"""Run a partly frozen variable's optimizer update on its trainable entries only (S3, S4).

For each partly frozen variable V, the writes to V and to its optimizer slots (resources
of V's shape written from V's gradient alone: Adam's moments, a momentum, RMSprop's
average) are rewritten so that frozen entries are never read-modify-written:

* the value each write stores is cloned backwards through elementwise ops on the
  trainable entries only: a read of V or of a slot becomes a gather of the trainable
  entries (ResourceGather of rows; a read then GatherNd of entries, as XLA has no
  ResourceGatherNd), any other full-size tensor (the gradient)
  is gathered where the elementwise chain starts, scalars (learning rate, bias
  corrections) are kept; a select on V's frozen mask (the guards of mask_gradients and
  guard_writes) takes its trainable branch, since no trainable entry is frozen;
* the write becomes a scatter at the trainable entries: Assign -> ResourceScatterUpdate,
  AssignAdd/Sub -> ResourceScatterAdd/Sub (rows of a Rows mask), or their Nd forms at the
  trainable (row, column, ...) tuples (Columns, Mask).

So the slots of frozen entries keep the values they had when freezing began, bit for bit:
freezing is a pause for rows, columns and entries too. A write that cannot be sliced (a
write in a function body, a scatter of a sparse update, a value of unknown shape) is
recorded as "not sliced: <op> <node>" in plan.notes.unsliced; a slot write among them is
guarded with V's mask instead (the slot's frozen entries are still unchanged), V's own
writes stay guarded by guard_writes.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from .. import opkinds
from ..ir import IR, Tensor
from ..plan import Plan
from ..program import Program
from ..rules import VariableFreeze
from .build import Builder
from .guard_writes import _guard_scatter
from .masks import compact_entries, compact_rows, frozen_mask, slug

PASS = "slice_updates"
_SCATTER = {"AssignVariableOp": "Update", "AssignAddVariableOp": "Add", "AssignSubVariableOp": "Sub"}
# Elementwise ops whose clone over sliced inputs computes the slice of their output.
_CLONABLE = opkinds.ELEMENTWISE - {"Select"}


def slice_updates(program: Program, plan: Plan) -> Program:
    dep = plan.dependence
    if dep is None:
        return program
    # the per-replica components of a distributed variable share its gradient bit
    bit_of = {id(v.variable): i for i, v in plan.gradient_owner.items()}
    by_placeholder = plan.capture.variable_by_placeholder
    for vf in plan.freezes:
        bit = bit_of.get(id(vf.variable.variable))
        if not vf.partial or bit is None:
            continue
        slots = _slots(dep, bit, vf, by_placeholder)
        _Slicer(program, plan, vf, slots).run()
    return program


def _slots(dep, bit: int, vf: VariableFreeze, by_placeholder: dict) -> set[str]:
    """Resources of V's shape written from V's gradient only, not V itself; under a
    strategy, those of V's replica."""
    found = set()
    for r, bits in dep.resource_bits.items():
        g, _ = dep.split(bits)
        var = by_placeholder.get(r)
        if var is not None and g == 1 << bit and var.optimizer_state \
                and var.replica == vf.variable.replica \
                and r != vf.variable.placeholder and tuple(var.shape) == tuple(vf.variable.shape):
            found.add(r)
    return found


class _Slicer:
    """Slices the writes to one partly frozen variable and its slots."""

    def __init__(self, program: Program, plan: Plan, vf: VariableFreeze, slots: set[str]):
        self.program, self.plan, self.vf, self.slots = program, plan, vf, slots
        self.ir = program.main
        self.targets = slots | {vf.variable.placeholder}
        self.rows = vf.axis == 0
        shape = tuple(vf.variable.shape)
        if self.rows:
            self.index = vf.indices(frozen=False).astype(np.int32)
            self.sliced = (len(self.index),) + shape[1:]
        else:  # every trainable entry as an index tuple
            self.index = np.argwhere(~vf.frozen).astype(np.int32)
            self.sliced = (len(self.index),)
        self.shape = shape
        self.memo: dict[Tensor, Tensor | None] = {}
        self.mask_const = self.ir.const_cache.get(("frozen", vf.variable.path))

    def run(self) -> None:
        dep = self.plan.dependence
        for ir, node in list(dep.writes):
            if node not in ir:
                continue
            written = dep.write_targets(ir, node) & self.targets
            if not written:
                continue
            if ir is self.ir and ir.op(node) in _SCATTER and self._slice_write(node):
                self.plan.notes.inserted.append(node)
                continue
            self.plan.notes.unsliced.append(f"not sliced: {ir.op(node)} {node}")
            if written & self.slots:
                self._guard_slot_write(ir, node)

    # ------------------------------------------------------------------ writes

    def _builder(self, anchor: str) -> Builder:
        return Builder(self.ir, PASS, anchor, f"graphfreeze/{PASS}/{slug(self.vf.variable.path)}")

    def _slice_write(self, node: str) -> bool:
        ir = self.ir
        resource, value = ir.inputs(node)[:2]
        if ir.shape(value) != self.shape:
            return False
        b = self._builder(node)
        new = self._slice(b, value)
        if new is None:
            return False
        indices = self._indices(b)
        dtype = ir.dtype(value)
        kind = _SCATTER[ir.op(node)]
        op = f"ResourceScatter{'' if self.rows else 'Nd'}{kind}"
        nd = type(ir.nodedef(node))(name=node, op=op, device=ir.device(node))
        if self.rows:
            nd.attr["dtype"].type = dtype.as_datatype_enum
        else:
            nd.attr["T"].type = dtype.as_datatype_enum
            nd.attr["use_locking"].b = True
        nd.attr["Tindices"].type = tf.int32.as_datatype_enum
        ir.set_nodedef(node, nd)
        ir.graph.nodes[node]["op"] = op
        ir.set_input(node, 1, indices)
        ir.graph.add_edge(new[0], node, 2, src_output=new[1], dst_input=2, control=False)
        self.plan.notes.inserted.extend(b.created)
        self.plan.notes.sliced_writes.append(node)
        return True

    def _guard_slot_write(self, ir: IR, node: str) -> None:
        b = Builder(ir, PASS, node, f"graphfreeze/{PASS}/{slug(self.vf.variable.path)}")
        op, inputs = ir.op(node), ir.inputs(node)
        if op == "AssignVariableOp":
            old = b.read(inputs[0], ir.dtype(inputs[1]), self.shape, "old")
            ir.set_input(node, 1, b.select(frozen_mask(b, self.vf), old, inputs[1]))
        elif op in ("AssignAddVariableOp", "AssignSubVariableOp"):
            dtype = ir.dtype(inputs[1])
            zero = b.const("zero", np.zeros((), dtype.as_numpy_dtype), dtype)
            ir.set_input(node, 1, b.select(frozen_mask(b, self.vf), zero, inputs[1]))
        elif op.startswith("ResourceScatter"):
            _guard_scatter(ir, b, node, inputs, self.vf, nd=op.startswith("ResourceScatterNd"))
        else:
            return  # a fused kernel: refused or guarded where V itself is written
        self.plan.notes.guarded_writes.append(node)
        self.plan.notes.inserted.extend(b.created)

    # ------------------------------------------------------------------ values

    def _indices(self, b: Builder) -> Tensor:
        key = ("trainable", self.vf.variable.path)
        cached = self.ir.const_cache.get(key)
        if cached is not None and cached[0] in self.ir:
            node = self.ir.graph.nodes[cached[0]]
            node["order"] = min(node["order"], b.after + 1e-9)
            return b.adopt(cached)
        t = b.const("trainable_indices", self.index, tf.int32)
        self.ir.const_cache[key] = t
        return t

    def _is_mask(self, tensor: Tensor) -> bool:
        if self.mask_const is None:
            self.mask_const = self.ir.const_cache.get(("frozen", self.vf.variable.path))
        return self.mask_const is not None and tensor == self.mask_const

    def _broadcasts(self, tensor: Tensor) -> bool:
        """Whether a tensor that is not full-size broadcasts the same way against the slice."""
        shape = self.ir.shape(tensor)
        if shape is None:
            return False
        if all(d == 1 for d in shape) and len(shape) <= len(self.sliced):
            return True
        if not self.rows:
            return False
        rank = len(self.shape)
        return len(shape) < rank or shape[0] == 1

    def _compact(self, tensor: Tensor) -> bool:
        """Whether a tensor of V's rank has, on every axis, V's size or 1 (a compact array
        that broadcasts to V's shape)."""
        shape = self.ir.shape(tensor)
        return shape is not None and len(shape) == len(self.shape) and None not in shape \
            and all(d in (1, n) for d, n in zip(shape, self.shape))

    def _slice_compact(self, b: Builder, tensor: Tensor) -> Tensor:
        """A compact tensor at the trainable entries, broadcastable to the slice."""
        if tensor not in self.memo:
            shape = tuple(self.ir.shape(tensor))
            if self.rows:
                out = compact_rows(b, tensor, shape, self._indices(b), "compact")
            else:
                out = compact_entries(b, tensor, shape, self._indices(b), "compact")
                self.ir.set_shape(out, self.sliced)
            self.memo[tensor] = out
        return self.memo[tensor]

    def _slice(self, b: Builder, tensor: Tensor) -> Tensor | None:
        """The trainable entries of a full-size tensor, computed on those entries."""
        if tensor in self.memo:
            return self.memo[tensor]
        out = self._slice_uncached(b, tensor)
        self.memo[tensor] = out
        return out

    def _slice_uncached(self, b: Builder, tensor: Tensor) -> Tensor | None:
        ir = self.ir
        node, k = tensor
        op = ir.op(node)
        inputs = ir.inputs(node)
        if op == "IdentityN":
            return self._slice(b, inputs[k])
        if op == "ReadVariableOp" and self.program.resource_owners(ir, inputs[0]) & self.targets:
            return self._gather_read(b, node, inputs[0])
        if op == "SelectV2" and self._is_mask(inputs[0]):
            return self._slice(b, inputs[2])  # no trainable entry is frozen
        if op in _CLONABLE and len(ir.graph.nodes[node]["dtypes"]) == 1:
            new_inputs = []
            for t in inputs:
                if ir.shape(t) == self.shape:
                    s = self._slice(b, t)
                    if s is None:
                        return None
                    new_inputs.append(s)
                elif self._broadcasts(t):
                    new_inputs.append(t)
                elif self._compact(t):  # e.g. gf.Scale factors, one per row or column
                    new_inputs.append(self._slice_compact(b, t))
                else:
                    return self._gather(b, tensor)
            return self._clone(b, node, new_inputs)
        return self._gather(b, tensor)

    def _clone(self, b: Builder, node: str, inputs: list[Tensor]) -> Tensor:
        ir = self.ir
        new = ir.add_node(f"{b.prefix}/{node.rsplit('/', 1)[-1]}", ir.op(node), inputs,
                          dtypes=[ir.dtype((node, 0))], shapes=[self.sliced],
                          device=ir.device(node), inserted_by=PASS)
        with ir.edit(new) as nd:
            for key, value in ir.nodedef(node).attr.items():
                if key != "_class":
                    nd.attr[key].CopyFrom(value)
        # a copy of an op the step already ran: not held to INSERTED_OPS, which lists the
        # kinds the passes introduce
        ir.graph.nodes[new]["cloned"] = node
        b.created.append(new)
        return (new, 0)

    def _gather(self, b: Builder, tensor: Tensor) -> Tensor:
        indices = self._indices(b)
        if self.rows:
            out = b.gather_rows(tensor, indices, "slice")
        else:
            out = b.gather_nd(tensor, indices, "slice")
        self.ir.set_shape(out, self.sliced)
        return out

    def _gather_read(self, b: Builder, read: str, resource: Tensor) -> Tensor:
        ir = self.ir
        dtype = ir.dtype((read, 0))
        if self.rows:
            out = first = b.resource_gather(resource, self._indices(b), dtype, "read_slice")
        else:  # XLA has no ResourceGatherNd kernel: read, then gather the entries
            first = b.read(resource, dtype, self.shape, "read_full")
            out = b.gather_nd(first, self._indices(b), "read_slice")
        ir.set_shape(out, self.sliced)
        # keep the read's place among the writes to the same resource
        for src in ir.control_inputs(read):
            ir.add_control_edge(src, first[0])
        for _, dst, attrs in list(ir.graph.out_edges(read, data=True)):
            if attrs["control"]:
                ir.add_control_edge(out[0], dst)
        return out
