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

import tensorflow as tf

from ..ir import Tensor
from .build import Builder

#: Products cut along the axis of their output that one operand alone determines.
PRODUCTS = frozenset({"MatMul"})


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
    if op not in PRODUCTS or k != 0 or axis not in (0, 1) or len(ir.graph.nodes[node]["dtypes"]) != 1:
        return None
    attrs = ir.nodedef(node).attr
    a, c = ir.inputs(node)[:2]
    if axis == 0:  # rows of the output: rows of A, or its columns when transposed
        a = gather_axis(b, a, indices, 1 if attrs["transpose_a"].b else 0, "product_rows")
    else:  # columns of the output: columns of B, or its rows when transposed
        c = gather_axis(b, c, indices, 0 if attrs["transpose_b"].b else 1, "product_columns")
    return clone(b, node, [a, c], sliced)


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
