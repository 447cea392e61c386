"""The one place the passes get a frozen variable's mask from.

A mask is stored once per graph and variable, in the compact form of
`VariableFreeze.compact` (every axis along which it does not change collapsed to 1: a
Rows mask of a [1088, 1088] kernel is a [1088, 1] constant), as bools, or, from
`PACK_AT` entries on, as bits: eight entries of the last axis per uint8, unpacked in the
graph where used (a random Mask over a [2_000_000, 256] table is a 64 MB constant, not
512 MB of bools, let alone a float copy). Every pass that needs it (gradient masks, write
guards, forward mode) reads that constant and *selects* with it (`SelectV2`), never
multiplies, so an inf or NaN at a frozen entry cannot leak into a trainable one or turn a
frozen one into NaN.

Sparse uses gather what they need: the mask rows of an `IndexedSlices`' indices (only when
the mask varies along axis 0; a Columns mask simply broadcasts), packed rows unpacked
after the gather, or the mask entries at a `ScatterNd`'s index tuples (collapsed axes
indexed at 0).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..errors import UnsupportedGraphError
from ..ir import Tensor
from ..rules import VariableFreeze
from .build import Builder

#: Masks with at least this many entries (after compaction) whose last axis is a multiple
#: of 8 are stored eight entries per byte.
PACK_AT = 1 << 22
_BITS = np.array([128, 64, 32, 16, 8, 4, 2, 1], np.uint8)  # np.packbits' (big-endian) order


def slug(path: str) -> str:
    return path.replace("/", "_").replace(":", "_")


def packed(vf: VariableFreeze) -> bool:
    """Whether `vf`'s mask is stored as bits (see PACK_AT)."""
    compact = vf.compact
    return compact.size >= PACK_AT and compact.ndim > 0 and compact.shape[-1] % 8 == 0


def shared_const(b: Builder, key: tuple[str, ...], name: str, value: np.ndarray,
                 dtype: tf.DType) -> Tensor:
    """The constant `value` in `b`'s graph, one per graph and `key` however many passes and
    ops use it; a reused constant moves up in program order to precede its new consumer."""
    ir = b.ir
    tensor = ir.const_cache.get(key)
    if tensor is not None and tensor[0] in ir:
        node = ir.graph.nodes[tensor[0]]
        node["order"] = min(node["order"], ir.order_after(b.after))
        return b.adopt(tensor)
    tensor = ir.add_const(name, value, dtype, device=b.device, after=b.after,
                          inserted_by=b.pass_name)
    ir.const_cache[key] = tensor
    return b.adopt(tensor)


def trainable_indices(b: Builder, vf: VariableFreeze) -> Tensor:
    """`vf`'s trainable lines along its one varying axis, or for any other mask every
    trainable entry's index tuple: an int32 constant, one per graph and variable (the
    sliced updates and the sparse form of a fused kernel scatter at it)."""
    path = vf.variable.path
    value = vf.indices(frozen=False) if vf.axis is not None else np.argwhere(~vf.frozen)
    return shared_const(b, ("trainable", path), f"graphfreeze/trainable/{slug(path)}",
                        value.astype(np.int32), tf.int32)


def stored_mask(b: Builder, vf: VariableFreeze) -> Tensor:
    """The constant holding `vf`'s compact mask in `b`'s graph: bool, or uint8 bits packed
    along the last axis (see `shared_const`)."""
    name = f"graphfreeze/frozen/{slug(vf.variable.path)}"
    if packed(vf):
        return shared_const(b, ("frozen", vf.variable.path), name,
                            np.packbits(vf.compact, axis=-1), tf.uint8)
    return shared_const(b, ("frozen", vf.variable.path), name, vf.compact, tf.bool)


def _unpack(b: Builder, bits: Tensor, vf: VariableFreeze) -> Tensor:
    """uint8 [..., n] -> bool [..., 8 n]; one leading dimension may be unknown."""
    shape = b.ir.shape(bits)
    target = None if shape is None else tuple(shape[:-1]) + (8 * shape[-1],)
    if target is None or sum(d is None for d in target) > 1:
        raise UnsupportedGraphError(
            f"{b.ir.op(b.anchor)} node {b.anchor!r} reads {vf.variable.path!r} in a shape "
            f"graphfreeze cannot unpack its bit-packed mask ({vf.compact.size:,} entries) to "
            f"({shape}); report the op.")
    byte = b.bitwise_and(b.expand_dims(bits, -1, "frozen_bytes"),
                         b.const("frozen_bits", _BITS, tf.uint8), "frozen_bit")
    flags = b.not_equal(byte, b.const("frozen_zero", np.uint8(0), tf.uint8), "frozen_flags")
    return b.reshape(flags, target, "frozen_unpacked")


def frozen_mask(b: Builder, vf: VariableFreeze) -> Tensor:
    """The variable's compact frozen mask (True = frozen) as a bool tensor that broadcasts
    to the variable's shape."""
    mask = stored_mask(b, vf)
    return _unpack(b, mask, vf) if packed(vf) else mask


def frozen_rows(b: Builder, vf: VariableFreeze, indices: Tensor) -> Tensor:
    """The mask of rows `indices` (axis 0), broadcastable to [*indices.shape, *shape[1:]]."""
    # unpacked after the gather (fewer bytes to expand), also when every row is the same and
    # `compact_rows` hands back the stored constant itself
    rows = compact_rows(b, stored_mask(b, vf), vf.compact.shape, indices, "frozen")
    return _unpack(b, rows, vf) if packed(vf) else rows


def frozen_entries(b: Builder, vf: VariableFreeze, indices: Tensor) -> Tensor:
    """The mask at ScatterNd/GatherNd index tuples `indices` ([..., k], k <= rank): the
    entries (or trailing blocks) they address, broadcastable to the gathered values."""
    return compact_entries(b, frozen_mask(b, vf), vf.compact.shape, indices, "frozen")


def frozen_at(b: Builder, vf: VariableFreeze, indices: Tensor | None = None, *,
              nd: bool = False) -> Tensor:
    """The mask where a use touches the variable: all of it (`indices` None), rows
    `indices` (a gather or scatter along axis 0), or ScatterNd/GatherNd index tuples (`nd`)."""
    if indices is None:
        return frozen_mask(b, vf)
    return frozen_entries(b, vf, indices) if nd else frozen_rows(b, vf, indices)


def scalar_like(b: Builder, like: Tensor, value: float, name: str) -> Tensor:
    """The scalar `value` in the dtype of `like` (float16, bfloat16 and integers kept)."""
    dtype = b.ir.dtype(like)
    return b.const(name, np.asarray(value, dtype.as_numpy_dtype), dtype)


def select_frozen(b: Builder, vf: VariableFreeze, at_frozen: Tensor | float, value: Tensor,
                  indices: Tensor | None = None, *, nd: bool = False, name: str = "") -> Tensor:
    """where(frozen, at_frozen, value) with `vf`'s shared bool mask (see `frozen_at`): a
    select, never a multiply, so an inf or NaN on either side stays where it is. A number
    `at_frozen` becomes a scalar constant of `value`'s dtype named `name`."""
    frozen = frozen_at(b, vf, indices, nd=nd)
    if not isinstance(at_frozen, tuple):
        at_frozen = scalar_like(b, value, at_frozen, name or f"scalar_{at_frozen}")
    return b.select(frozen, at_frozen, value)


def compact_rows(b: Builder, compact: Tensor, shape: tuple[int, ...], indices: Tensor,
                 what: str) -> Tensor:
    """Rows `indices` (axis 0) of a compact constant of `shape` (axes collapsed to 1 where it
    does not change), broadcastable to [*indices.shape, *full_shape[1:]]."""
    if shape[0] == 1:  # the same for every row: no gather needed ...
        index_shape = b.ir.shape(indices)
        if index_shape is not None and len(index_shape) == 1:
            return compact
        zero = scalar_like(b, indices, 0, "row_zero")  # ... but row 0 as often as indices say
        indices = b.mul(indices, zero, "row_index")
    return b.gather_rows(compact, indices, f"{what}_rows")


def compact_entries(b: Builder, compact: Tensor, shape: tuple[int, ...], indices: Tensor,
                    what: str) -> Tensor:
    """A compact constant of `shape` at ScatterNd/GatherNd index tuples `indices`
    ([..., k], k <= rank); a collapsed axis is indexed at 0. ValueError when k is unknown."""
    index_shape = b.ir.shape(indices)
    depth = index_shape[-1] if index_shape else None
    if depth is None:
        raise ValueError(f"the index depth of {indices} is unknown")
    collapsed = [shape[a] == 1 for a in range(depth)]
    if any(collapsed):  # index a collapsed axis at 0
        dtype = b.ir.dtype(indices)
        keep = b.const(f"{what}_index_axes", np.array([0 if c else 1 for c in collapsed],
                                                       dtype.as_numpy_dtype), dtype)
        indices = b.mul(indices, keep, f"{what}_index")
    return b.gather_nd(compact, indices, f"{what}_at")
