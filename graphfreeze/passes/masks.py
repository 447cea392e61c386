"""Mask constants inserted by the passes, as small as broadcasting allows.

A Rows/Columns mask is constant along all but one axis; collapsing those axes to 1 turns a
[1088, 1088] constant into [1088, 1] and lets Mul/SelectV2 broadcast it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..ir import IR, Tensor
from ..rules import VariableFreeze


def compress(mask: np.ndarray, *, keep_axis0: bool = False) -> np.ndarray:
    """The smallest array that broadcasts back to `mask` by collapsing constant axes.

    `keep_axis0` leaves axis 0 whole, for masks that are gathered by row index.
    """
    out = mask
    for axis in range(1 if keep_axis0 else 0, mask.ndim):
        first = np.take(out, [0], axis=axis)
        if out.shape[axis] > 1 and (out == first).all():
            out = first
    return out


def slug(path: str) -> str:
    return path.replace("/", "_").replace(":", "_")


def _shared_const(ir: IR, key: tuple, name: str, value: np.ndarray, dtype: tf.DType, device: str,
                  after: float | None, pass_name: str) -> Tensor:
    """One constant per (graph, variable, kind, dtype), however many ops use it. A reused
    constant moves up in program order to precede its new consumer (it has no inputs)."""
    cache = ir.const_cache
    tensor = cache.get(key)
    if tensor is not None and tensor[0] in ir:
        if after is not None:
            node = ir.graph.nodes[tensor[0]]
            node["order"] = min(node["order"], after + 1e-9)
        return tensor
    tensor = ir.add_const(name, value, dtype, device=device, after=after, inserted_by=pass_name)
    cache[key] = tensor
    return tensor


def keep_const(ir: IR, vf: VariableFreeze, dtype: tf.DType, *, gathered: bool = False,
               device: str = "", after: float | None = None, pass_name: str = "") -> Tensor:
    """1 where the entry trains, 0 where frozen, in `dtype` (for g * keep).

    `gathered` keeps axis 0 whole so the constant can be gathered with sparse row indices.
    """
    value = compress(~vf.frozen, keep_axis0=gathered).astype(dtype.as_numpy_dtype)
    return _shared_const(ir, ("keep", vf.variable.path, dtype.name, gathered),
                         f"graphfreeze/keep/{slug(vf.variable.path)}", value, dtype, device, after,
                         pass_name)


def frozen_const(ir: IR, vf: VariableFreeze, *, gathered: bool = False, device: str = "",
                 after: float | None = None, pass_name: str = "") -> Tensor:
    """True where the entry is frozen, as a compressed bool constant for SelectV2."""
    return _shared_const(ir, ("frozen", vf.variable.path, "bool", gathered),
                         f"graphfreeze/frozen/{slug(vf.variable.path)}",
                         compress(vf.frozen, keep_axis0=gathered), tf.bool, device, after, pass_name)
