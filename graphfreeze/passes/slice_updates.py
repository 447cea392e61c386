"""Run a partly frozen variable's optimizer update on its trainable entries only (S3, S4).

For each partly frozen variable V, the writes to V and to its optimizer slots (resources
of V's shape written from V's gradient alone: Adam's moments, a momentum, RMSprop's
average) are rewritten so that frozen entries are never read-modify-written:

* the value each write stores is cloned backwards through elementwise ops on the
  trainable entries only. When V's mask varies along one axis (Rows, Columns, a Mask of
  whole lines), the slice keeps V's rank with that axis cut to the trainable lines; when
  the trainable entries are a few rectangles (the L of a grown kernel), each rectangle is
  sliced on its own (slice_blocks.py); otherwise it is the flat vector of trainable
  entries. A read of V or of a slot becomes a gather of the trainable entries
  (a read then a gather, which keeps the read from copying: read_without_copy.py), a
  compact tensor (gf.Scale factors, a per-row constant) is
  gathered the same way, a weight-gradient MatMul computes only the trainable rows or
  columns (slice_products.py), any other full-size tensor is gathered where the
  elementwise chain starts, scalars (learning rate, bias corrections) are kept; a select
  on V's frozen mask (the guards of mask_gradients and guard_writes) takes its trainable
  branch, since no trainable entry is frozen;
* the write becomes a scatter at the trainable entries: Assign -> ResourceScatterUpdate,
  AssignAdd/Sub -> ResourceScatterAdd/Sub (rows), or their Nd forms at index tuples (a
  grid of the leading axes and the trainable lines for another axis, every trainable
  entry for a Mask).

So the slots of frozen entries keep the values they had when freezing began, bit for bit:
freezing is a pause for rows, columns and entries too. A write that cannot be sliced (a
write in a function body, a scatter of a sparse update, a value of unknown shape) is
recorded as "not sliced: <op> <node>" in plan.notes.unsliced; a slot write among them is
guarded with V's mask instead (the slot's frozen entries are still unchanged), V's own
writes stay guarded by guard_writes.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from .. import opkinds
from ..ir import IR, Tensor
from ..plan import Plan
from ..program import Program
from ..rules import VariableFreeze
from .build import Builder
from .guard_writes import guard_scatter
from .masks import compact_entries, frozen_mask, shared_const, slug, trainable_indices
from .result import PassResult
from .slice_products import clone, gather_axis, slice_product

PASS = "slice_updates"
_SCATTER = {"AssignVariableOp": "Update", "AssignAddVariableOp": "Add", "AssignSubVariableOp": "Sub"}
# Elementwise ops whose clone over sliced inputs computes the slice of their output.
_CLONABLE = (opkinds.ELEMENTWISE - {"Select"}) | {"AddN"}

#: A mask that is not whole lines (no single axis) is sliced into its flat vector of
#: trainable entries (GatherNd/ScatterNd at index tuples) only when at most this fraction
#: of the variable trains; above, the slot writes are guarded with the dense mask instead
#: (a select per slot: S4 holds either way). bench/bench_flat_mask.py measures the crossover.
FLAT_AT = float(os.environ.get("GRAPHFREEZE_FLAT_AT", "0.005"))


def slice_updates(program: Program, plan: Plan) -> PassResult:
    start = program.edits
    dep = plan.dependence
    if dep is None:
        return PassResult(program, False)
    # the per-replica components of a distributed variable share its gradient bit
    bit_of = {id(v.variable): i for i, v in plan.gradient_owner.items()}
    by_placeholder = plan.capture.variable_by_placeholder
    for vf in plan.freezes:
        bit = bit_of.get(id(vf.variable.variable))
        if not vf.partial or bit is None:
            continue
        slots = _slots(dep, bit, vf, by_placeholder)
        mixed = _mixed_slots(program, slots)
        if mixed:
            # Adafactor's update clip is an RMS over the whole update, slot values at frozen
            # entries included: paused (never written) there, they would change what the
            # trainable entries get (a zero second moment is a 0/0). Such slots evolve as
            # before, under the seed-002 mask's semantics; the variable itself stays guarded.
            plan.notes.unsliced.extend(f"not sliced: {by_placeholder[r].path} is read by "
                                       "an op over the whole variable" for r in sorted(mixed))
            continue
        _slicer(program, plan, vf, slots).run()
    return PassResult(program, program.edits != start)


def _slicer(program: Program, plan: Plan, vf: VariableFreeze, slots: set[str]) -> _Slicer:
    """One axis, block by block (a mask whose trainable entries are a few rectangles, an L
    of a grown layer: slice_blocks.py), flat, or dense; the choice goes to plan.notes.slicing."""
    from .slice_blocks import MAX_BLOCKS, Blocks, blocks_of  # subclasses _Slicer: late
    if vf.axis is None:
        count, blocks = blocks_of(vf)
        if blocks:
            slicer: _Slicer = Blocks(program, plan, vf, slots, blocks)
            plan.notes.slicing[vf.variable.path] = slicer.describe()
            return slicer
    elif vf.axis > 0 and _consecutive(lines := vf.indices(frozen=False)):
        # New columns or channels: one block, so the writes are strided-slice assignments,
        # where the ResourceScatterNd* of a slice along axis > 0 goes entry by entry.
        slicer = Blocks(program, plan, vf, slots, [((vf.axis, lines),)])
        plan.notes.slicing[vf.variable.path] = (
            f"axis {vf.axis}: {len(lines)} of {vf.variable.shape[vf.axis]} lines, consecutive")
        return slicer
    slicer = _Slicer(program, plan, vf, slots)
    more = f"; {count}+ rectangles, above MAX_BLOCKS={MAX_BLOCKS}" if vf.axis is None and count else ""
    plan.notes.slicing[vf.variable.path] = slicer.describe() + more
    return slicer


def _consecutive(lines: np.ndarray) -> bool:
    return bool(len(lines)) and bool((np.diff(lines) == 1).all())


def _mixed_slots(program: Program, slots: set[str]) -> set[str]:
    """Slots whose values reach an op that mixes entries (a reduction, a matmul) before
    they are written: slicing or pausing them would change the trainable entries."""
    mixed = set()
    for r in slots:
        for ir, node, _ in program.resource_uses(program.main, (r, 0)):
            if ir.op(node) == "ReadVariableOp" and _reaches_mixing(ir, node):
                mixed.add(r)
                break
    return mixed


def _reaches_mixing(ir: IR, read: str) -> bool:
    pending, seen = [read], {read}
    while pending:
        node = pending.pop()
        for out, _ in {c for k in range(len(ir.graph.nodes[node]["dtypes"]))
                       for c in ir.consumers((node, k))}:
            op = ir.op(out)
            if op in _SCATTER or out in seen:
                continue
            if op not in _CLONABLE and op != "IdentityN":
                return True
            seen.add(out)
            pending.append(out)
    return False


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
        shape = tuple(vf.variable.shape)
        self.axis = vf.axis  # None: the slice is the flat vector of trainable entries
        self.rows = self.axis == 0
        if self.axis is not None:
            self.index = vf.indices(frozen=False).astype(np.int32)
            self.sliced = shape[:self.axis] + (len(self.index),) + shape[self.axis + 1:]
            # ScatterNd tuples over the leading axes and the trainable lines
            lines = [np.arange(n) for n in shape[:self.axis]] + [self.index]
            self.tuples = np.stack(np.meshgrid(*lines, indexing="ij"), -1).astype(np.int32)
        else:  # every trainable entry as an index tuple
            self.index = self.tuples = np.argwhere(~vf.frozen).astype(np.int32)
            self.sliced = (len(self.index),)
        self.shape = shape
        self.memo: dict[Tensor, Tensor | None] = {}
        self.mask_const = self.ir.const_cache.get(("frozen", vf.variable.path))
        self.dense = self.axis is None and len(self.index) > FLAT_AT * self.vf.frozen.size

    def describe(self) -> str:
        """How the writes are sliced, for plan.notes.slicing."""
        if self.axis is not None:
            return f"axis {self.axis}: {len(self.index)} of {self.shape[self.axis]} lines"
        share = f"{len(self.index)} of {self.vf.frozen.size} entries train"
        return f"dense: slot writes guarded ({share})" if self.dense else f"flat: {share}"

    def run(self) -> None:
        dep = self.plan.dependence
        dense = self.dense
        for ir, node in list(dep.writes):
            if node not in ir:
                continue
            written = dep.write_targets(ir, node) & self.targets
            if not written or node in self.plan.notes.sliced_writes:  # a sparse fused kernel
                continue
            if not dense and ir is self.ir and ir.op(node) in _SCATTER and self._slice_write(node):
                self.plan.notes.inserted.append(node)
                continue
            if not dense:
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
        indices = self._indices(b) if self.rows else self._tuples(b)
        ir.set_nodedef(node, self._scatter_def(node, node, ir.dtype(value)))
        ir.graph.nodes[node]["op"] = ir.nodedef(node).op
        ir.set_input(node, 1, indices)
        ir.graph.add_edge(new[0], node, 2, src_output=new[1], dst_input=2, control=False)
        self.plan.notes.inserted.extend(b.created)
        self.plan.notes.sliced_writes.append(node)
        return True

    def _scatter_def(self, name: str, write: str, dtype: tf.DType):
        """The NodeDef of the scatter `name` that does `write` at the slice's entries."""
        ir = self.ir
        op = f"ResourceScatter{'' if self.rows else 'Nd'}{_SCATTER[ir.op(write)]}"
        nd = type(ir.nodedef(write))(name=name, op=op, device=ir.device(write))
        if self.rows:
            nd.attr["dtype"].type = dtype.as_datatype_enum
        else:
            nd.attr["T"].type = dtype.as_datatype_enum
            nd.attr["use_locking"].b = True
        nd.attr["Tindices"].type = tf.int32.as_datatype_enum
        return nd

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
            guard_scatter(ir, b, node, inputs, self.vf, nd=op.startswith("ResourceScatterNd"))
        else:
            return  # a fused kernel: refused or guarded where V itself is written
        self.plan.notes.guarded_writes.append(node)
        self.plan.notes.inserted.extend(b.created)

    # ------------------------------------------------------------------ values

    def _indices(self, b: Builder) -> Tensor:
        """The trainable lines along the axis (or every trainable entry's tuple)."""
        return trainable_indices(b, self.vf)

    def _tuples(self, b: Builder) -> Tensor:
        """ScatterNd/GatherNd index tuples of the slice."""
        if self.axis is None:
            return self._indices(b)
        path = self.vf.variable.path
        return shared_const(b, ("trainable_tuples", path),
                            f"graphfreeze/trainable/{slug(path)}_tuples", self.tuples, tf.int32)

    def _is_mask(self, tensor: Tensor) -> bool:
        if self.mask_const is None:
            self.mask_const = self.ir.const_cache.get(("frozen", self.vf.variable.path))
        return self.mask_const is not None and tensor == self.mask_const

    def _small(self, b: Builder, tensor: Tensor) -> Tensor | None:
        """A tensor smaller than V that broadcasts to V's shape (a scalar, gf.Scale
        factors, a per-row constant), cut to broadcast the same way against the slice;
        None if it does not broadcast to V's shape."""
        shape = self.ir.shape(tensor)
        rank = len(self.shape)
        if shape is None or None in shape or len(shape) > rank:
            return None
        padded = (1,) * (rank - len(shape)) + tuple(shape)
        if any(d not in (1, n) for d, n in zip(padded, self.shape)):
            return None
        if self.axis is not None:
            if padded[self.axis] == 1:
                return tensor
            if tensor not in self.memo:
                self.memo[tensor] = gather_axis(b, tensor, self._indices(b),
                                                self.axis - (rank - len(shape)), "small")
            return self.memo[tensor]
        if all(d == 1 for d in shape) and len(shape) <= 1:
            return tensor
        if len(shape) != rank:
            return None
        if tensor not in self.memo:
            out = compact_entries(b, tensor, tuple(shape), self._indices(b), "small")
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
                else:
                    small = self._small(b, t)
                    if small is None:
                        return self._gather(b, tensor)
                    new_inputs.append(small)
            return clone(b, node, new_inputs, self.sliced)
        product = self._product(b, tensor)  # a weight-gradient product: on the slice
        return self._gather(b, tensor) if product is None else product

    def _product(self, b: Builder, tensor: Tensor) -> Tensor | None:
        if self.axis is None:
            return None
        return slice_product(b, tensor, self.axis, self._indices(b), self.sliced)

    def _gather(self, b: Builder, tensor: Tensor) -> Tensor:
        if self.axis is not None:
            out = gather_axis(b, tensor, self._indices(b), self.axis, "slice")
        else:
            out = b.gather_nd(tensor, self._indices(b), "slice")
        self.ir.set_shape(out, self.sliced)
        return out

    def _gather_read(self, b: Builder, read: str, resource: Tensor) -> Tensor:
        ir = self.ir
        dtype = ir.dtype((read, 0))
        # Read, then gather: a ResourceGather would put the variable in copy-on-read mode,
        # and every full read of it (the forward pass's) would copy it (read_without_copy.py);
        # XLA has no ResourceGatherNd kernel either.
        first = b.read(resource, dtype, self.shape, "read_full")
        out = self._gather(b, first)
        ir.set_shape(out, self.sliced)
        # keep the read's place among the writes to the same resource
        for src in ir.control_inputs(read):
            ir.add_control_edge(src, first[0])
        for _, dst, attrs in list(ir.graph.out_edges(read, data=True)):
            if attrs["control"]:
                ir.add_control_edge(out[0], dst)
        return out
