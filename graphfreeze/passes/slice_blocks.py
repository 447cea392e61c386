"""Slice an update whose trainable entries are a few rectangles, block by block (issue 14).

A layer grown by new units (seed 000) keeps its old-to-old block frozen: in a [1088, 1088]
kernel the trainable entries are the new rows (all columns) and the new columns of the old
rows, an L. Its mask varies along two axes, so neither one axis nor (at 11% trainable) the
flat vector of entries fits; `blocks_of` cuts it into disjoint rectangles instead: the lines
of one varying axis grouped by their trainable pattern along the other, each distinct
non-empty pattern one block (its lines x the pattern's lines), grouping along whichever
axis gives fewer blocks. For the L: [64, 1088] (new rows, a plain rows slice) and
[1024, 64] (old rows x new columns).

`Blocks` slices each write to V and its slots once per block (`BlockSlicer`, one
`slice_updates._Slicer` per rectangle, with its own index constants and memo): the value is
cloned backwards on the block, reads become gathers of it, the weight-gradient product is
computed from operands gathered along both axes (`slice_product_block`), and the write
becomes one at the block: ResourceScatter* for a rows slice; for consecutive lines along
every cut axis a ResourceStridedSliceAssign (of the block read and updated, for Add/Sub),
since ResourceScatterNd* goes entry by entry and on CPU costs more than a dense update of
the whole variable; ResourceScatterNd* at the block's index tuples otherwise. The first
block's write replaces the original in place; every other block's is a new node with the
original's control inputs, placed just before it in program order. They run one after
another, the first only once every block's value is computed, and the original last, so
whatever waited for the write waits for every block, and no block write finds its variable
still aliased by a pending read (TensorFlow would copy all of it first). Frozen entries of
V and of every slot are never read-modify-written (S1, S4).

More than MAX_BLOCKS blocks (a random mask): the single-axis/flat/dense choice of
slice_updates applies. Blocks are preferred over flat below FLAT_AT because the flat
vector gathers its entries from the full-size weight-gradient product, a block does not.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from ..ir import Tensor
from ..plan import Plan
from ..program import Program
from ..rules import VariableFreeze
from .build import Builder
from .masks import shared_const, slug
from .slice_products import line_range, slice_product_block, take_lines
from .slice_updates import PASS, _Slicer

#: At most this many rectangles are sliced block by block (each adds a scatter per write
#: and a product per weight gradient); above, slice_updates' dense or flat choice applies.
MAX_BLOCKS = int(os.environ.get("GRAPHFREEZE_MAX_BLOCKS", "4"))

Block = tuple[tuple[int, np.ndarray], ...]  # (axis, trainable lines) for each cut axis


def blocks_of(vf: VariableFreeze) -> tuple[int, list[Block]]:
    """How many disjoint rectangles the trainable entries of a mask that varies along two
    axes form (see the module docstring), and those rectangles when there are at most
    MAX_BLOCKS; (0, []) for any other mask. A count above MAX_BLOCKS is a lower bound."""
    axes = vf.varying_axes
    if len(axes) != 2:
        return 0, []
    a0, a1 = axes
    frozen = vf.compact.reshape(vf.compact.shape[a0], vf.compact.shape[a1])
    # n distinct columns allow at most 2**n distinct rows: past that, too many either way
    limit = 2 ** (MAX_BLOCKS + 1)
    sample = frozen[np.linspace(0, len(frozen) - 1, min(len(frozen), 4 * limit)).astype(int)]
    if len(np.unique(_packed(sample), axis=0)) > limit:  # a random mask: told from a sample
        return MAX_BLOCKS + 1, []
    rows = _lines_by_pattern(_packed(frozen))
    if rows is None or len(rows) > limit:
        return MAX_BLOCKS + 1, []
    patterns = ~frozen[[r[0] for r in rows]]  # one trainable pattern per group of rows
    found = [_rectangles([(r, np.flatnonzero(p)) for r, p in zip(rows, patterns)],
                         (a0, a1), frozen.shape)]
    columns = _lines_by_pattern(_packed(np.ascontiguousarray(patterns.T)))
    if columns is not None:  # equal columns of the distinct rows are equal columns
        found.append(_rectangles(
            [(c, np.sort(np.concatenate([r for r, p in zip(rows, patterns[:, c[0]]) if p]
                                        or [np.zeros(0, np.int64)]))) for c in columns],
            (a1, a0), frozen.shape[::-1]))
    blocks = min(found, key=len)
    return len(blocks), blocks if len(blocks) <= MAX_BLOCKS else []


def _packed(frozen: np.ndarray) -> np.ndarray:
    """Each row of a C-ordered bool grid as uint64 words of its bits (zero padded)."""
    packed = np.packbits(frozen, axis=1)
    pad = -packed.shape[1] % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return np.ascontiguousarray(packed).view(np.uint64)


def _lines_by_pattern(words: np.ndarray) -> list[np.ndarray] | None:
    """Line indices grouped by equal `words`, in the order of their first line; None if two
    different patterns share a hash (then the caller keeps the dense route)."""
    odd = np.random.default_rng(0).integers(1, 2**63, words.shape[1], dtype=np.uint64) | 1
    with np.errstate(over="ignore"):
        keys = (words * odd).sum(axis=1, dtype=np.uint64)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    groups = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    groups = [groups[g] for g in np.argsort(first)]
    if any((words[g] != words[g[0]]).any() for g in groups):
        return None
    return groups


def _rectangles(groups: list[tuple[np.ndarray, np.ndarray]], axes: tuple[int, int],
                shape: tuple[int, int]) -> list[Block]:
    """One block per group of lines along axes[0] with its trainable lines along axes[1]."""
    blocks = []
    for lines, other in groups:
        if not len(other):
            continue
        cuts = [(axes[0], lines)] if len(lines) < shape[0] else []
        if len(other) < shape[1]:
            cuts.append((axes[1], other))
        blocks.append(tuple(sorted(cuts, key=lambda cut: cut[0])))
    return blocks


class BlockSlicer(_Slicer):
    """One rectangle of the trainable entries, cut along one or two axes."""

    def __init__(self, program: Program, plan: Plan, vf: VariableFreeze, slots: set[str],
                 block: Block, number: int):
        self.program, self.plan, self.vf, self.slots = program, plan, vf, slots
        self.ir = program.main
        self.targets = slots | {vf.variable.placeholder}
        self.shape = shape = tuple(vf.variable.shape)
        self.cuts, self.number = block, number
        self.axis, self.dense = None, False  # every method that reads axis is overridden
        self.rows = len(block) == 1 and block[0][0] == 0
        sliced = list(shape)
        for axis, lines in block:
            sliced[axis] = len(lines)
        self.sliced = tuple(sliced)
        self.index = block[0][1]
        self.memo: dict[Tensor, Tensor | None] = {}
        self.mask_const = self.ir.const_cache.get(("frozen", vf.variable.path))

    def _builder(self, anchor: str) -> Builder:
        return Builder(self.ir, PASS, anchor,
                       f"graphfreeze/{PASS}/{slug(self.vf.variable.path)}/block{self.number}")

    def _line(self, b: Builder, axis: int) -> Tensor:
        path = self.vf.variable.path
        return shared_const(b, ("trainable_block", path, str(self.number), str(axis)),
                            f"graphfreeze/trainable/{slug(path)}_block{self.number}_axis{axis}",
                            dict(self.cuts)[axis].astype(np.int32), tf.int32)

    def _indices(self, b: Builder) -> Tensor:
        return self._line(b, 0)  # only a rows block scatters or gathers by line

    def _tuples(self, b: Builder) -> Tensor:
        """ScatterNd index tuples: the grid of the leading axes and the block's lines."""
        path, cuts = self.vf.variable.path, dict(self.cuts)
        lines = [cuts.get(a, np.arange(n)) for a, n in enumerate(self.shape[:max(cuts) + 1])]
        tuples = np.stack(np.meshgrid(*lines, indexing="ij"), -1).astype(np.int32)
        return shared_const(b, ("trainable_block_tuples", path, str(self.number)),
                            f"graphfreeze/trainable/{slug(path)}_block{self.number}_tuples",
                            tuples, tf.int32)

    def _order(self) -> list[int]:
        """Cut axes, the one keeping the smallest share first: the gathers stay small."""
        return [a for a, lines in sorted(self.cuts, key=lambda c: len(c[1]) / self.shape[c[0]])]

    def _small(self, b: Builder, tensor: Tensor) -> Tensor | None:
        shape = self.ir.shape(tensor)
        rank = len(self.shape)
        if shape is None or None in shape or len(shape) > rank:
            return None
        offset = rank - len(shape)
        padded = (1,) * offset + tuple(shape)
        if any(d not in (1, n) for d, n in zip(padded, self.shape)):
            return None
        if tensor not in self.memo:
            out = tensor
            for axis in self._order():
                if padded[axis] != 1:
                    out = take_lines(b, out, self._line(b, axis), axis - offset, "small")
            self.memo[tensor] = out
        return self.memo[tensor]

    def _gather(self, b: Builder, tensor: Tensor) -> Tensor:
        out = tensor
        for axis in self._order():
            out = take_lines(b, out, self._line(b, axis), axis, f"slice_axis{axis}")
        self.ir.set_shape(out, self.sliced)
        return out

    def _product(self, b: Builder, tensor: Tensor) -> Tensor | None:
        cuts = [(axis, self._line(b, axis)) for axis, _ in self.cuts]
        return slice_product_block(b, tensor, cuts, self.sliced)


class Blocks(_Slicer):
    """Slices every write to a variable and its slots block by block."""

    def __init__(self, program: Program, plan: Plan, vf: VariableFreeze, slots: set[str],
                 blocks: list[Block]):
        self.program, self.plan, self.vf, self.slots = program, plan, vf, slots
        self.ir = program.main
        self.targets = slots | {vf.variable.placeholder}
        self.shape = tuple(vf.variable.shape)
        self.axis, self.dense = None, False
        self.parts = [BlockSlicer(program, plan, vf, slots, block, i)
                      for i, block in enumerate(blocks)]

    def describe(self) -> str:
        shapes = " + ".join(str(list(p.sliced)) for p in self.parts)
        return f"blocks: {len(self.parts)} ({shapes} of {list(self.shape)})"

    def _slice_write(self, node: str) -> bool:
        ir = self.ir
        resource, value = ir.inputs(node)[:2]
        if ir.shape(value) != self.shape:
            return False
        values = []
        for part in self.parts:  # all or nothing: a block that cannot be sliced leaves dead clones
            b = part._builder(node)
            new = part._slice(b, value)
            if new is None:
                return False
            values.append((part, b, new))
        # The block writes run one after the other, after every block's value: a write to a
        # variable that a pending read still aliases would copy all of it first.
        previous = sorted({t[0] for _, _, t in values})
        position = ir.graph.nodes[node]["order"][0]
        for i, (part, b, new) in enumerate([*values[1:], values[0]]):
            nd, inputs, read = self._write(part, b, node, new)
            if i == len(values) - 1:  # the first block's write takes the original's place
                nd.name = name = node
                ir.set_nodedef(node, nd)
                ir.graph.nodes[node]["op"] = nd.op
                ir.set_input(node, 1, inputs[1])
                for k, t in enumerate(inputs[2:], 2):
                    ir.graph.add_edge(t[0], node, k, src_output=t[1], dst_input=k, control=False)
                self.plan.notes.inserted.append(node)
            else:
                name = ir.add_node(f"{node}/block{part.number}", nd.op, inputs, device=nd.device,
                                   after=(position - 1, 0), inserted_by=PASS,
                                   control_inputs=ir.control_inputs(node))
                nd.name = name
                ir.set_nodedef(name, nd)
                ir.graph.nodes[name]["cloned"] = node
                self.plan.notes.inserted.append(name)
            for src in previous:
                ir.add_control_edge(src, read or name)
            previous = [name]
            self.plan.notes.inserted.extend(b.created)
            self.plan.notes.sliced_writes.append(name)
        return True

    def _write(self, part: BlockSlicer, b: Builder, node: str, new: Tensor):
        """(NodeDef, inputs, the read it starts from or None) of block `part`'s write doing
        `node`: a scatter, or for consecutive lines along every cut axis a strided-slice
        assignment (for Add/Sub: of the block read and updated), which copies runs where a
        ResourceScatterNd* goes entry by entry."""
        ir = self.ir
        resource, dtype, op = ir.inputs(node)[0], ir.dtype(new), ir.op(node)
        ranges = [line_range(b, part._line(b, axis)) for axis, _ in part.cuts]
        if part.rows or None in ranges:
            indices = part._indices(b) if part.rows else part._tuples(b)
            return part._scatter_def(node, node, dtype), [resource, indices, new], None
        begin, end = np.zeros(len(self.shape), np.int32), np.asarray(self.shape, np.int32)
        spans = [r for r in ranges if r is not None]  # every one, after the check above
        for (axis, _), (start, stop) in zip(part.cuts, spans, strict=True):
            begin[axis], end[axis] = start, stop
        read = None
        if op != "AssignVariableOp":
            last = self._last_read(node, resource)
            if last is not None:  # what it read is what the variable holds: no second copy
                old = part.memo.get((last, 0)) or part._gather(b, (last, 0))
            else:
                read = b.read(resource, dtype, self.shape, "old")
                for src in ir.control_inputs(node):
                    ir.add_control_edge(src, read[0])
                old = part._gather(b, read)
            new = b._elementwise("AddV2" if op == "AssignAddVariableOp" else "Sub", [old, new],
                                 "updated")
        nd = type(ir.nodedef(node))(name=node, op="ResourceStridedSliceAssign",
                                    device=ir.device(node))
        for key, value in (("T", dtype), ("Index", tf.int32)):
            nd.attr[key].type = value.as_datatype_enum
        for key in ("begin_mask", "end_mask", "ellipsis_mask", "new_axis_mask", "shrink_axis_mask"):
            nd.attr[key].i = 0
        bounds = [b.const(f"block_{k}", v, tf.int32)
                  for k, v in (("begin", begin), ("end", end), ("strides", np.ones_like(begin)))]
        return nd, [resource, *bounds, new], read and read[0]

    def _last_read(self, node: str, resource: Tensor) -> str | None:
        """A read of the variable `node` writes that nothing wrote after: the traced step's
        automatic control dependencies make a write wait for the reads since the last write
        (only for them, when there are any). Under copy-on-read (any scatter or strided
        assignment puts a variable in it) every full read is a copy of the whole variable."""
        ir, program = self.ir, self.program
        owners = program.resource_owners(ir, resource)
        touching = [c for c in ir.control_inputs(node)
                    if any(ir.is_resource(t) and program.resource_owners(ir, t) & owners
                           for t in ir.inputs(c))]
        if touching and all(ir.op(c) == "ReadVariableOp" for c in touching):
            return touching[0]
        return None
