"""Compute only the trainable lines of a weight-gradient product (issue 14 item 1, S3).

A Dense kernel W[in, out] gets its gradient from `MatMul(x, dy, transpose_a=True)`; when
only some rows (inputs) or columns (outputs) of W train, the product is cut before it is
computed: the rows of W's gradient come from one operand and the columns from the other,
so the operand is gathered to the trainable lines and the product runs on them:

* rows of C = A @ B    are rows of A    (columns of A when transpose_a);
* columns of C = A @ B are columns of B (rows of B when transpose_b).

For a tied embedding's projection (logits = h @ table^T) the table's gradient is
`MatMul(dlogits, h, transpose_a=True)`: its trainable rows need only the matching columns
of dlogits, so a few trainable token rows cost a few columns, not the 32,000 x d product.
`slice_updates` calls `slice_product` while cloning an update chain backwards.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..ir import Tensor
from .build import Builder

#: Ops whose output lines along an axis come from lines of their inputs: cut there.
PRODUCTS = frozenset({"MatMul", "Einsum", "UnsortedSegmentSum", "Conv2DBackpropFilter"})


def gather_axis(b: Builder, params: Tensor, indices: Tensor, axis: int, suffix: str) -> Tensor:
    """`tf.gather(params, indices, axis=axis)` with a 1-D `indices`, shape inferred."""
    ir = b.ir
    dtype, shape = ir.dtype(params), ir.shape(params)
    n = ir.shape(indices)
    out_shape = None if shape is None or n is None else \
        tuple(shape[:axis]) + tuple(n) + tuple(shape[axis + 1:])
    axis_t = b.const(f"{suffix}_axis", axis, tf.int32)
    return b._add(suffix, "GatherV2", [params, indices, axis_t], dtype, out_shape,
                  {"Tparams": dtype, "Tindices": ir.dtype(indices), "Taxis": tf.int32,
                   "batch_dims": 0})


def slice_product(b: Builder, tensor: Tensor, axis: int, indices: Tensor,
                  sliced: tuple[int, ...]) -> Tensor | None:
    """The lines `indices` along `axis` of the product `tensor`, computed from a gathered
    operand; None when `tensor` is not such a product (then the caller gathers it)."""
    ir = b.ir
    node, k = tensor
    op = ir.op(node)
    if op not in PRODUCTS or k != 0 or len(ir.graph.nodes[node]["dtypes"]) != 1:
        return None
    attrs = ir.nodedef(node).attr
    if op == "Einsum":
        return _slice_einsum(b, node, axis, indices, sliced)
    if op == "UnsortedSegmentSum":
        return _slice_segment_sum(b, node, axis, indices, sliced)
    if op == "Conv2DBackpropFilter":
        return _slice_filter_gradient(b, node, axis, indices, sliced)
    a, c = ir.inputs(node)[:2]
    shape = ir.shape(tensor)
    if shape is None or len(shape) != 2:
        return None
    if axis == 0:  # rows of the output: rows of A, or its columns when transposed
        a = gather_axis(b, a, indices, 1 if attrs["transpose_a"].b else 0, "product_rows")
    else:  # columns of the output: columns of B, or its rows when transposed
        c = gather_axis(b, c, indices, 0 if attrs["transpose_b"].b else 1, "product_columns")
    return clone(b, node, [a, c], sliced)


def _slice_einsum(b: Builder, node: str, axis: int, indices: Tensor,
                  sliced: tuple[int, ...]) -> Tensor | None:
    """Einsum: the output subscript at `axis` is cut in every operand that has it (the
    tied projection's gradient `btv,btd->vd` gathers the trainable rows' logits)."""
    ir = b.ir
    equation = ir.nodedef(node).attr["equation"].s.decode()
    if "..." in equation or "->" not in equation:
        return None
    ins, out = equation.replace(" ", "").split("->")
    operands = ins.split(",")
    inputs = list(ir.inputs(node))
    if axis >= len(out) or len(operands) != len(inputs):
        return None
    letter = out[axis]
    for i, subscripts in enumerate(operands):
        if subscripts.count(letter) > 1:
            return None  # a diagonal: not a plain line of the operand
        if letter in subscripts:
            inputs[i] = gather_axis(b, inputs[i], indices, subscripts.index(letter), f"operand{i}")
    return clone(b, node, inputs, sliced)


def _slice_segment_sum(b: Builder, node: str, axis: int, indices: Tensor,
                       sliced: tuple[int, ...]) -> Tensor | None:
    """UnsortedSegmentSum (a sparse gradient made dense, e.g. a tied table's lookup part):
    the trainable rows are the sums over their own ids, renumbered 0..k-1; every other id
    becomes -1, which the op drops."""
    ir = b.ir
    data, ids = ir.inputs(node)[:2]
    full = ir.shape((node, 0))
    trainable = ir.const_value(indices)
    if axis != 0 or full is None or full[0] is None or trainable is None:
        return None
    dtype = ir.dtype(ids).as_numpy_dtype
    lookup = np.full(full[0], -1, dtype)
    lookup[trainable] = np.arange(len(trainable), dtype=dtype)
    renumbered = gather_axis(b, b.const("renumber", lookup, ir.dtype(ids)), ids, 0, "segment_ids")
    count = b.const("segments", np.asarray(len(trainable), ir.dtype(ir.inputs(node)[2]).as_numpy_dtype),
                    ir.dtype(ir.inputs(node)[2]))
    return clone(b, node, [data, renumbered, count], sliced)


def _slice_filter_gradient(b: Builder, node: str, axis: int, indices: Tensor,
                           sliced: tuple[int, ...]) -> Tensor | None:
    """Conv2DBackpropFilter [h, w, in, out]: the trainable output channels need only those
    channels of the output gradient."""
    ir = b.ir
    data_format = ir.nodedef(node).attr["data_format"].s.decode() or "NHWC"
    if axis != 3 or len(sliced) != 4:
        return None
    image, _, grad = ir.inputs(node)[:3]
    grad = gather_axis(b, grad, indices, 3 if data_format == "NHWC" else 1, "output_channels")
    sizes = b.const("filter_sizes", np.asarray(sliced, np.int32), tf.int32)
    return clone(b, node, [image, sizes, grad], sliced)


def clone(b: Builder, node: str, inputs: list[Tensor], shape: tuple[int, ...]) -> Tensor:
    """A copy of `node` (one output) on `inputs`, with output `shape`: the step's own op
    kind on a slice, so it is marked "cloned" and not held to INSERTED_OPS."""
    ir = b.ir
    new = ir.add_node(f"{b.prefix}/{node.rsplit('/', 1)[-1]}", ir.op(node), inputs,
                      dtypes=[ir.dtype((node, 0))], shapes=[shape], device=ir.device(node),
                      inserted_by=b.pass_name)
    with ir.edit(new) as nd:
        for key, value in ir.nodedef(node).attr.items():
            if key != "_class":
                nd.attr[key].CopyFrom(value)
    ir.graph.nodes[new]["cloned"] = node
    b.created.append(new)
    return (new, 0)


def slice_product_block(b: Builder, tensor: Tensor, cuts: list[tuple[int, Tensor]],
                        sliced: tuple[int, ...]) -> Tensor | None:
    """The block of the product `tensor` at lines `indices` along each `(axis, indices)` of
    `cuts` (one or two axes: rows x columns of a grown kernel), computed from operands
    gathered on every cut axis; None when `tensor` is not such a product."""
    ir = b.ir
    node, k = tensor
    op = ir.op(node)
    if op not in PRODUCTS or k != 0 or len(ir.graph.nodes[node]["dtypes"]) != 1:
        return None
    if op == "Conv2DBackpropFilter":  # input channels too, which slice_product leaves alone
        return _block_filter_gradient(b, node, cuts, sliced)
    if len(cuts) == 1:
        return slice_product(b, tensor, cuts[0][0], cuts[0][1], sliced)
    if op == "Einsum":
        return _block_einsum(b, node, cuts, sliced)
    shape = ir.shape(tensor)
    if op != "MatMul" or shape is None or len(shape) != 2:
        return None
    attrs = ir.nodedef(node).attr
    a, c = ir.inputs(node)[:2]
    (_, rows), (_, columns) = cuts
    a = take_lines(b, a, rows, 1 if attrs["transpose_a"].b else 0, "product_rows")
    c = take_lines(b, c, columns, 0 if attrs["transpose_b"].b else 1, "product_columns")
    return clone(b, node, [a, c], sliced)


def _block_einsum(b: Builder, node: str, cuts: list[tuple[int, Tensor]],
                  sliced: tuple[int, ...]) -> Tensor | None:
    """Einsum: each cut output subscript is cut in every operand that has it."""
    ir = b.ir
    equation = ir.nodedef(node).attr["equation"].s.decode()
    if "..." in equation or "->" not in equation:
        return None
    ins, out = equation.replace(" ", "").split("->")
    operands = ins.split(",")
    inputs = list(ir.inputs(node))
    if len(operands) != len(inputs) or any(axis >= len(out) for axis, _ in cuts):
        return None
    for axis, indices in cuts:
        letter = out[axis]
        for i, subscripts in enumerate(operands):
            if subscripts.count(letter) > 1:
                return None  # a diagonal: not a plain line of the operand
            if letter in subscripts:
                inputs[i] = take_lines(b, inputs[i], indices, subscripts.index(letter),
                                       f"operand{i}_{letter}")
    return clone(b, node, inputs, sliced)


def _block_filter_gradient(b: Builder, node: str, cuts: list[tuple[int, Tensor]],
                           sliced: tuple[int, ...]) -> Tensor | None:
    """Conv2DBackpropFilter [h, w, in, out] cut along input channels (the image's channels)
    and/or output channels (the output gradient's); not for grouped convolutions, whose
    filter input channels are not the image's."""
    ir = b.ir
    nhwc = (ir.nodedef(node).attr["data_format"].s.decode() or "NHWC") == "NHWC"
    full = ir.shape((node, 0))
    image, _, grad = ir.inputs(node)[:3]
    image_shape = ir.shape(image)
    if full is None or len(sliced) != 4 or any(axis not in (2, 3) for axis, _ in cuts):
        return None
    channel = 3 if nhwc else 1
    for axis, indices in cuts:
        if axis == 2:
            if image_shape is None or len(image_shape) != 4 or image_shape[channel] != full[2]:
                return None
            image = take_lines(b, image, indices, channel, "input_channels")
        else:
            grad = take_lines(b, grad, indices, channel, "output_channels")
    sizes = b.const("filter_sizes", np.asarray(sliced, np.int32), tf.int32)
    return clone(b, node, [image, sizes, grad], sliced)


def line_range(b: Builder, indices: Tensor) -> tuple[int, int] | None:
    """(start, stop) when the constant `indices` are consecutive lines, else None."""
    value = b.ir.const_value(indices)
    if value is None or value.ndim != 1 or not len(value):
        return None
    start = int(value[0])
    return (start, start + len(value)) if np.array_equal(value, np.arange(start, start + len(value))) \
        else None


def take_lines(b: Builder, params: Tensor, indices: Tensor, axis: int, suffix: str) -> Tensor:
    """`gather_axis`, as a StridedSlice when the lines are consecutive (new units are
    appended: the common case), which copies runs instead of gathering line by line."""
    ir = b.ir
    shape, lines = ir.shape(params), line_range(b, indices)
    if lines is None or shape is None:
        return gather_axis(b, params, indices, axis, suffix)
    rank, others = len(shape), (1 << len(shape)) - 1 - (1 << axis)
    begin, end = np.zeros(rank, np.int32), np.zeros(rank, np.int32)
    begin[axis], end[axis] = lines
    dtype = ir.dtype(params)
    inputs = [b.const(f"{suffix}_{name}", value, tf.int32)
              for name, value in (("begin", begin), ("end", end), ("strides", np.ones(rank, np.int32)))]
    out = tuple(shape[:axis]) + (lines[1] - lines[0],) + tuple(shape[axis + 1:])
    return b._add(suffix, "StridedSlice", [params, *inputs], dtype, out,
                  {"T": dtype, "Index": tf.int32, "begin_mask": others, "end_mask": others,
                   "ellipsis_mask": 0, "new_axis_mask": 0, "shrink_axis_mask": 0})
