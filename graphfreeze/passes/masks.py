"""The one place the passes get a frozen variable's mask from.

A mask is stored once per graph and variable, as a bool constant in the compact form of
`VariableFreeze.compact` (every axis along which it does not change collapsed to 1: a
Rows mask of a [1088, 1088] kernel is a [1088, 1] constant, a random Mask over a
[2_000_000, 256] table 512 MB of bools, never a float copy). Every pass that needs it
(gradient masks, write guards, forward mode) reads that constant and *selects* with it
(`SelectV2`), never multiplies, so an inf or NaN at a frozen entry cannot leak into a
trainable one or turn a frozen one into NaN.

Sparse uses gather what they need: the mask rows of an `IndexedSlices`' indices (only when
the mask varies along axis 0; a Columns mask simply broadcasts), or the mask entries at a
`ScatterNd`'s index tuples (collapsed axes indexed at 0).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..ir import Tensor
from ..rules import VariableFreeze
from .build import Builder


def slug(path: str) -> str:
    return path.replace("/", "_").replace(":", "_")


def frozen_mask(b: Builder, vf: VariableFreeze) -> Tensor:
    """The variable's compact frozen mask (True = frozen) in `b`'s graph, as a bool constant
    that broadcasts to the variable's shape; one constant per graph and variable however
    many passes and ops use it. A reused constant moves up in program order to precede its
    new consumer (it has no inputs)."""
    ir = b.ir
    key = ("frozen", vf.variable.path)
    tensor = ir.const_cache.get(key)
    if tensor is not None and tensor[0] in ir:
        node = ir.graph.nodes[tensor[0]]
        node["order"] = min(node["order"], b.after + 1e-9)
        return b.adopt(tensor)
    tensor = ir.add_const(f"graphfreeze/frozen/{slug(vf.variable.path)}", vf.compact, tf.bool,
                          device=b.device, after=b.after, inserted_by=b.pass_name)
    ir.const_cache[key] = tensor
    return b.adopt(tensor)


def frozen_rows(b: Builder, vf: VariableFreeze, indices: Tensor) -> Tensor:
    """The mask of rows `indices` (axis 0), broadcastable to [len(indices), *shape[1:]]."""
    mask = frozen_mask(b, vf)
    if vf.compact.shape[0] == 1:  # the same for every row: no gather needed ...
        shape = b.ir.shape(indices)
        if shape is not None and len(shape) == 1:
            return mask
        zero = b.const("row_zero", np.zeros((), b.ir.dtype(indices).as_numpy_dtype),
                       b.ir.dtype(indices))  # ... but row 0 taken as often as indices say
        indices = b.mul(indices, zero, "row_index")
    return b.gather_rows(mask, indices, "frozen_rows")


def frozen_entries(b: Builder, vf: VariableFreeze, indices: Tensor) -> Tensor:
    """The mask at ScatterNd/GatherNd index tuples `indices` ([..., k], k <= rank): the
    entries (or trailing blocks) they address, broadcastable to the gathered values."""
    mask = frozen_mask(b, vf)
    shape = b.ir.shape(indices)
    depth = shape[-1] if shape else None
    if depth is None:
        raise ValueError(f"the index depth of {indices} is unknown")
    collapsed = [vf.compact.shape[a] == 1 for a in range(depth)]
    if any(collapsed):  # index a collapsed axis at 0
        dtype = b.ir.dtype(indices)
        keep = b.const("frozen_index_axes", np.array([0 if c else 1 for c in collapsed],
                                                     dtype.as_numpy_dtype), dtype)
        indices = b.mul(indices, keep, "frozen_index")
    return b.gather_nd(mask, indices, "frozen_at")
