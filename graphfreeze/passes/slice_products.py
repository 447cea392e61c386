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
The same holds for a batched matmul (`tf.matmul` of a [batch, seq, d] input: the kernel's
gradient is a BatchMatMulV2 summed over the batch), a Conv2D filter gradient's input
channels (those channels of the input), a depthwise filter gradient (output
channel c * multiplier + m of the output gradient belongs to input channel c, multiplier m)
and a bias gradient (BiasAddGrad, or the Sum over the broadcast axes of `x + b`): the
trainable channels need only those channels of the output gradient. A cut passes through a
Reshape that keeps the line (Keras's Conv2D bias gradient is BiasAddGrad under two
Reshapes) and a Sum that does not reduce it; an operand that only the cut op reads is cut
where it is computed, any other operand is gathered (it is computed in full anyway).
`slice_updates` calls `slice_product` while cloning an update chain backwards.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..ir import Tensor
from .build import Builder

#: Ops whose output lines along an axis come from lines of their inputs: cut there.
PRODUCTS = frozenset({"MatMul", "Einsum", "UnsortedSegmentSum", "Conv2DBackpropFilter",
                      "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "BiasAddGrad",
                      "DepthwiseConv2dNativeBackpropFilter", "Sum", "Reshape"})


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
    if op == "Einsum":
        return _slice_einsum(b, node, axis, indices, sliced)
    if op == "UnsortedSegmentSum":
        return _slice_segment_sum(b, node, axis, indices, sliced)
    if op == "Conv2DBackpropFilter":
        return _block_filter_gradient(b, node, [(axis, indices)], sliced)
    if op in _MORE:
        return _MORE[op](b, node, axis, indices, sliced)
    return _matmul_lines(b, node, [(axis, indices)], sliced)


def _matmul_lines(b: Builder, node: str, cuts: list[tuple[int, Tensor]],
                  sliced: tuple[int, ...]) -> Tensor | None:
    """MatMul: rows of the output are rows of A (its columns when transposed), columns of
    the output columns of B (its rows when transposed)."""
    ir = b.ir
    shape = ir.shape((node, 0))
    if shape is None or len(shape) != 2:
        return None
    attrs = ir.nodedef(node).attr
    a, c = ir.inputs(node)[:2]
    for axis, indices in cuts:
        if axis == 0:
            a = take_lines(b, a, indices, 1 if attrs["transpose_a"].b else 0, "product_rows")
        else:
            c = take_lines(b, c, indices, 0 if attrs["transpose_b"].b else 1, "product_columns")
    return clone(b, node, [a, c], sliced)


def _slice_einsum(b: Builder, node: str, axis: int, indices: Tensor,
                  sliced: tuple[int, ...]) -> Tensor | None:
    """Einsum: the output subscript at `axis` is cut in every operand that has it (the
    tied projection's gradient `btv,btd->vd` gathers the trainable rows' logits)."""
    return _block_einsum(b, node, [(axis, indices)], sliced)


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


def _channel_axis(ir, node: str) -> int:
    """The channel axis of a 2-D convolution's input and output gradient."""
    return 1 if (ir.nodedef(node).attr["data_format"].s.decode() or "NHWC") == "NCHW" else 3


def _operand_lines(b: Builder, tensor: Tensor, axis: int, indices: Tensor, suffix: str) -> Tensor:
    """The lines `indices` along `axis` of an operand of a cut op: cut where it is computed
    when the cut op is its only reader (that full-size op then goes dead), else gathered."""
    ir = b.ir
    shape, n = ir.shape(tensor), ir.shape(indices)
    if shape is not None and n is not None and len(ir.consumers(tensor)) == 1:
        lines = tuple(shape[:axis]) + tuple(n) + tuple(shape[axis + 1:])
        out = slice_product(b, tensor, axis, indices, lines)
        if out is not None:
            return out
    return gather_axis(b, tensor, indices, axis, suffix)


def _slice_batch_matmul(b: Builder, node: str, axis: int, indices: Tensor,
                        sliced: tuple[int, ...]) -> Tensor | None:
    """BatchMatMul[V2, V3]: as MatMul for the last two axes (the batch axes are left to the
    caller); adj_x / adj_y say which axis of an operand holds the output's rows / columns."""
    ir = b.ir
    x, y = ir.inputs(node)[:2]
    shape, x_shape, y_shape = ir.shape((node, 0)), ir.shape(x), ir.shape(y)
    if shape is None or x_shape is None or y_shape is None or axis < len(shape) - 2:
        return None
    attrs = ir.nodedef(node).attr
    if axis == len(shape) - 2:
        x = _operand_lines(b, x, len(x_shape) - (1 if attrs["adj_x"].b else 2), indices, "product_rows")
    else:
        y = _operand_lines(b, y, len(y_shape) - (2 if attrs["adj_y"].b else 1), indices, "product_columns")
    return clone(b, node, [x, y], sliced)


def _slice_bias_gradient(b: Builder, node: str, axis: int, indices: Tensor,
                         sliced: tuple[int, ...]) -> Tensor | None:
    """BiasAddGrad [channels]: the sum of the output gradient's trainable channels (axis 1
    under NCHW, the last axis under NHWC)."""
    ir = b.ir
    grad = ir.inputs(node)[0]
    shape = ir.shape(grad)
    if axis != 0 or shape is None:
        return None
    data_format = ir.nodedef(node).attr["data_format"].s.decode() or "NHWC"
    channel = 1 if data_format.startswith("NC") else len(shape) - 1
    return clone(b, node, [_operand_lines(b, grad, channel, indices, "bias_channels")], sliced)


def _slice_depthwise_filter_gradient(b: Builder, node: str, axis: int, indices: Tensor,
                                     sliced: tuple[int, ...]) -> Tensor | None:
    """DepthwiseConv2dNativeBackpropFilter [h, w, in, multiplier]: output channel
    c * multiplier + m comes from input channel c and filter [..., c, m] alone, so trainable
    multipliers (axis 3) need those output-gradient channels of every input channel, and
    trainable input channels (axis 2) those input channels and their output-channel groups."""
    ir = b.ir
    full = ir.shape((node, 0))
    trainable = ir.const_value(indices)
    if axis not in (2, 3) or full is None or None in full or trainable is None:
        return None
    image, _, grad = ir.inputs(node)[:3]
    channel = _channel_axis(ir, node)
    inputs, multiplier = np.arange(full[2]), np.arange(full[3])
    if axis == 3:
        multiplier = trainable
    else:
        inputs = trainable
        image = _operand_lines(b, image, channel, indices, "input_channels")
    groups = (inputs[:, None] * full[3] + multiplier[None, :]).reshape(-1).astype(np.int32)
    grad = _operand_lines(b, grad, channel, b.const("depthwise_channels", groups, tf.int32),
                          "output_channels")
    sizes = b.const("filter_sizes", np.asarray(sliced, np.int32), tf.int32)
    return clone(b, node, [image, sizes, grad], sliced)


def _slice_sum(b: Builder, node: str, axis: int, indices: Tensor,
               sliced: tuple[int, ...]) -> Tensor | None:
    """Sum over axes other than the cut one: the sum of the operand's lines. The axes are a
    constant (a bias's `x + b` gradient) or, for a batched matmul's gradient, the broadcast
    batch axes BroadcastGradientArgs computes at run time: never one of the last two."""
    ir = b.ir
    x, reduction = ir.inputs(node)[:2]
    shape, out = ir.shape(x), ir.shape((node, 0))
    if shape is None or out is None:
        return None
    keep = ir.nodedef(node).attr["keep_dims"].b
    axes = ir.const_value(reduction)
    if axes is not None:
        reduced = {int(r) % len(shape) for r in np.ravel(axes)}
        kept = [a for a in range(len(shape)) if keep or a not in reduced]
        if axis >= len(kept) or kept[axis] in reduced:
            return None
        line = kept[axis]
    elif not keep and _batch_axes(ir, reduction, len(shape)) and axis >= len(out) - 2:
        line = axis + len(shape) - len(out)
    else:
        return None
    return clone(b, node, [_operand_lines(b, x, line, indices, "sum_operand"), reduction], sliced)


def _batch_axes(ir, reduction: Tensor, rank: int) -> bool:
    """True when `reduction` is an output of BroadcastGradientArgs over shapes of at most
    rank - 2 axes: every axis it names is a batch axis of a rank-`rank` matmul result."""
    if ir.op(reduction[0]) != "BroadcastGradientArgs":
        return False
    shapes = [ir.shape(t) for t in ir.inputs(reduction[0])[:2]]
    return all(s is not None and len(s) == 1 and s[0] is not None and s[0] <= rank - 2
               for s in shapes)


def _slice_reshape(b: Builder, node: str, axis: int, indices: Tensor,
                   sliced: tuple[int, ...]) -> Tensor | None:
    """A Reshape that keeps line `axis` whole (the same length, the same number of elements
    before it): the reshaped lines of its operand, when that operand's producer can be cut;
    else None (gathering after the Reshape costs the same as before it)."""
    ir = b.ir
    x = ir.inputs(node)[0]
    shape, out, n = ir.shape(x), ir.shape((node, 0)), ir.shape(indices)
    if shape is None or out is None or n is None or sum(d is None for d in sliced) > 1 \
            or len(ir.consumers(x)) != 1:
        return None
    line = _same_line(tuple(shape), tuple(out), axis)
    if line is None:
        return None
    lines = tuple(shape[:line]) + tuple(n) + tuple(shape[line + 1:])
    inner = slice_product(b, x, line, indices, lines)
    return None if inner is None else b.reshape(inner, sliced, "reshape_lines")


def _same_line(shape: tuple, out: tuple, axis: int) -> int | None:
    """The axis of `shape` whose lines are the lines of `out` along `axis` after a reshape
    (the same length and the same count of elements before, or after, it); None if none."""
    def count(dims):
        return None if None in dims else int(np.prod(dims, dtype=np.int64))
    length = out[axis]
    if length is None:
        return None
    before, after = count(out[:axis]), count(out[axis + 1:])
    for a, d in enumerate(shape):
        if d == length and ((before is not None and count(shape[:a]) == before)
                            or (after is not None and count(shape[a + 1:]) == after)):
            return a
    return None


_MORE = {"BatchMatMul": _slice_batch_matmul, "BatchMatMulV2": _slice_batch_matmul,
         "BatchMatMulV3": _slice_batch_matmul, "BiasAddGrad": _slice_bias_gradient,
         "DepthwiseConv2dNativeBackpropFilter": _slice_depthwise_filter_gradient,
         "Sum": _slice_sum, "Reshape": _slice_reshape}


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
    if len(cuts) == 1:
        return slice_product(b, tensor, cuts[0][0], cuts[0][1], sliced)
    if op == "Conv2DBackpropFilter":
        return _block_filter_gradient(b, node, cuts, sliced)
    if op == "Einsum":
        return _block_einsum(b, node, cuts, sliced)
    return _matmul_lines(b, node, cuts, sliced) if op == "MatMul" else None


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
    letters = [(out[axis], indices) for axis, indices in cuts]
    if any(subscripts.count(letter) > 1 for letter, _ in letters for subscripts in operands):
        return None  # a diagonal: not a plain line of the operand
    for letter, indices in letters:
        for i, subscripts in enumerate(operands):
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
    full = ir.shape((node, 0))
    image, _, grad = ir.inputs(node)[:3]
    image_shape = ir.shape(image)
    if full is None or len(sliced) != 4 or any(axis not in (2, 3) for axis, _ in cuts):
        return None
    channel = _channel_axis(ir, node)
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
