"""Builders for the few op kinds the passes insert, with their attrs, dtypes and shapes.

Every kind here has CPU, GPU and XLA kernels but one inserted outside XLA only
(`INSERTED_OPS`; tests check that inserted nodes stay within it and that rewritten steps
compile with XLA). Inserted nodes take the
device of the node they are inserted for, so they are colocated with their neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ..ir import IR, Tensor

INSERTED_OPS = frozenset({
    "Const", "Fill", "Mul", "AddV2", "SelectV2", "GatherV2", "GatherNd", "StopGradient",
    "ReadVariableOp", "ResourceGather", "ResourceGatherNd", "Shape", "ConcatV2", "Cast",
    # unpacking a bit-packed mask (passes/masks.py)
    "ExpandDims", "BitwiseAnd", "NotEqual", "Reshape",
    # a fused optimizer kernel written out elementwise (passes/lower_fused_apply.py)
    "Sub", "RealDiv", "Sqrt", "Rsqrt", "Square", "Maximum", "Abs", "Sign", "Exp",
    "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
    # a block of consecutive lines read and written back (passes/slice_blocks.py)
    "StridedSlice",
    # before a full read of a sparsely written variable, outside XLA only: XLA has no kernel
    # for it and needs none (passes/read_without_copy.py)
    "DisableCopyOnRead",
})


def _broadcast(a: tuple | None, b: tuple | None) -> tuple | None:
    if a is None or b is None:
        return None
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return tuple(y if x == 1 else x for x, y in zip(a, b))


@dataclass
class Builder:
    """Inserts nodes near `anchor`: same device, ordered just before it, tagged by pass."""

    ir: IR
    pass_name: str
    anchor: str
    prefix: str

    def __post_init__(self) -> None:
        self.device = self.ir.device(self.anchor)
        preds = [self.ir.graph.nodes[s]["order"] for s in self.ir.graph.predecessors(self.anchor)]
        position, sequence = self.ir.graph.nodes[self.anchor]["order"]
        self.after = max(preds, default=(position - 1, sequence))
        self.created: list[str] = []

    def _add(self, suffix: str, op: str, inputs: list[Tensor], out_dtype: tf.DType, shape,
             attrs: dict) -> Tensor:
        node = self.ir.add_node(f"{self.prefix}/{suffix}", op, inputs, attrs=attrs,
                                dtypes=[out_dtype], shapes=[shape], device=self.device,
                                after=self.after, inserted_by=self.pass_name)
        self.created.append(node)
        return (node, 0)

    def const(self, suffix: str, value, dtype: tf.DType) -> Tensor:
        t = self.ir.add_const(f"{self.prefix}/{suffix}", np.asarray(value), dtype,
                              device=self.device, after=self.after, inserted_by=self.pass_name)
        self.created.append(t[0])
        return t

    def adopt(self, tensor: Tensor) -> Tensor:
        self.created.append(tensor[0])
        return tensor

    def _elementwise(self, op: str, inputs: list[Tensor], suffix: str) -> Tensor:
        """An op whose output has the dtype of its last input and the broadcast shape."""
        dtype = self.ir.dtype(inputs[-1])
        shape = self.ir.shape(inputs[0])
        for t in inputs[1:]:
            shape = _broadcast(shape, self.ir.shape(t))
        return self._add(suffix, op, inputs, dtype, shape, {"T": dtype})

    def elementwise(self, op: str, inputs: list[Tensor], suffix: str) -> Tensor:
        """An op of `INSERTED_OPS` with one output of its last input's dtype and the
        inputs' broadcast shape (Sub, RealDiv, Sqrt, Maximum, ...)."""
        return self._elementwise(op, inputs, suffix)

    def mul(self, a: Tensor, b: Tensor, suffix: str = "mul") -> Tensor:
        return self._elementwise("Mul", [a, b], suffix)

    def add(self, a: Tensor, b: Tensor, suffix: str = "add") -> Tensor:
        return self._elementwise("AddV2", [a, b], suffix)

    def select(self, cond: Tensor, a: Tensor, b: Tensor, suffix: str = "select") -> Tensor:
        return self._elementwise("SelectV2", [cond, a, b], suffix)

    def bitwise_and(self, a: Tensor, b: Tensor, suffix: str = "bitwise_and") -> Tensor:
        return self._elementwise("BitwiseAnd", [a, b], suffix)

    def not_equal(self, a: Tensor, b: Tensor, suffix: str = "not_equal") -> Tensor:
        out = self._elementwise("NotEqual", [a, b], suffix)
        self.ir.graph.nodes[out[0]]["dtypes"] = [tf.bool.as_datatype_enum]
        return out

    def expand_dims(self, x: Tensor, axis: int, suffix: str = "expand_dims") -> Tensor:
        shape = self.ir.shape(x)
        if shape is not None:
            at = axis if axis >= 0 else len(shape) + 1 + axis
            shape = tuple(shape[:at]) + (1,) + tuple(shape[at:])
        dim = self.const(f"{suffix}_axis", np.int32(axis), tf.int32)
        return self._add(suffix, "ExpandDims", [x, dim], self.ir.dtype(x), shape,
                         {"T": self.ir.dtype(x), "Tdim": tf.int32})

    def reshape(self, x: Tensor, shape: tuple, suffix: str = "reshape") -> Tensor:
        """Reshape to `shape`, of which one dimension may be None (inferred)."""
        target = self.const(f"{suffix}_shape", np.array([-1 if d is None else d for d in shape],
                                                         np.int32), tf.int32)
        return self._add(suffix, "Reshape", [x, target], self.ir.dtype(x), tuple(shape),
                         {"T": self.ir.dtype(x), "Tshape": tf.int32})

    def stop_gradient(self, x: Tensor, suffix: str = "stop_gradient") -> Tensor:
        return self._elementwise("StopGradient", [x], suffix)

    def gather_rows(self, params: Tensor, indices: Tensor, suffix: str = "gather") -> Tensor:
        dtype, idx_dtype = self.ir.dtype(params), self.ir.dtype(indices)
        axis = self.const(f"{suffix}_axis", 0, tf.int32)
        p_shape, i_shape = self.ir.shape(params), self.ir.shape(indices)
        shape = None if p_shape is None or i_shape is None else tuple(i_shape) + tuple(p_shape[1:])
        return self._add(suffix, "GatherV2", [params, indices, axis], dtype, shape,
                         {"Tparams": dtype, "Tindices": idx_dtype, "Taxis": tf.int32, "batch_dims": 0})

    def gather_nd(self, params: Tensor, indices: Tensor, suffix: str = "gather_nd") -> Tensor:
        dtype, idx_dtype = self.ir.dtype(params), self.ir.dtype(indices)
        return self._add(suffix, "GatherNd", [params, indices], dtype, None,
                         {"Tparams": dtype, "Tindices": idx_dtype})

    def cast(self, x: Tensor, dtype: tf.DType, suffix: str = "cast") -> Tensor:
        return self._add(suffix, "Cast", [x], dtype, self.ir.shape(x),
                         {"SrcT": self.ir.dtype(x), "DstT": dtype, "Truncate": False})

    def read(self, resource: Tensor, dtype: tf.DType, shape, suffix: str = "read") -> Tensor:
        return self._add(suffix, "ReadVariableOp", [resource], dtype, shape, {"dtype": dtype})

    def resource_gather(self, resource: Tensor, indices: Tensor, dtype: tf.DType,
                        suffix: str = "read_rows", *, nd: bool = False) -> Tensor:
        if nd:
            return self._add(suffix, "ResourceGatherNd", [resource, indices], dtype, None,
                             {"dtype": dtype, "Tindices": self.ir.dtype(indices)})
        return self._add(suffix, "ResourceGather", [resource, indices], dtype, None,
                         {"dtype": dtype, "Tindices": self.ir.dtype(indices), "batch_dims": 0,
                          "validate_indices": True})

    def fill(self, dims: Tensor, value: Tensor, shape, suffix: str = "zeros") -> Tensor:
        dtype = self.ir.dtype(value)
        return self._add(suffix, "Fill", [dims, value], dtype, shape,
                         {"T": dtype, "index_type": self.ir.dtype(dims)})

    def zeros(self, shape: tuple, dtype: tf.DType, suffix: str = "zeros") -> Tensor:
        dims = self.const(f"{suffix}_shape", np.asarray(shape, dtype=np.int32), tf.int32)
        value = self.const(f"{suffix}_value", np.zeros((), dtype=dtype.as_numpy_dtype), dtype)
        return self.fill(dims, value, tuple(shape), suffix)

    def zeros_rows(self, indices: Tensor, row_shape: tuple, dtype: tf.DType,
                   suffix: str = "zeros") -> Tensor:
        """Zeros of shape [len(indices), *row_shape] without touching the sparse values."""
        n = self._add(f"{suffix}_n", "Shape", [indices], tf.int32, (1,),
                      {"T": self.ir.dtype(indices), "out_type": tf.int32})
        rest = self.const(f"{suffix}_row_shape", np.asarray(row_shape, dtype=np.int32), tf.int32)
        axis = self.const(f"{suffix}_axis", 0, tf.int32)
        dims = self._add(f"{suffix}_dims", "ConcatV2", [n, rest, axis], tf.int32,
                         (1 + len(row_shape),), {"N": 2, "T": tf.int32, "Tidx": tf.int32})
        value = self.const(f"{suffix}_value", np.zeros((), dtype=dtype.as_numpy_dtype), dtype)
        return self.fill(dims, value, (None,) + tuple(row_shape), suffix)
