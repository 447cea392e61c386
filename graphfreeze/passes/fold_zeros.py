"""Fold the zero gradients of fully frozen variables out of the work they still reach.

After mask_gradients, a fully frozen variable's gradient is a Fill of zeros. Most of its
uses die with its optimizer state, but some survive in shared computations:

* sums: a global norm adds Sum(Square(0)) for every frozen variable; zero summands are
  dropped from AddN/AddV2, and from a Pack whose only use sums over the packed axis
  (Keras computes the global norm as Sum(Pack([Sum(Square(g)), ...])));
* all-finite checks: loss scaling tests All(IsFinite(g)) for every gradient, and
  IsFinite(0) is true, so those terms leave the Pack that All reduces;
* packed all-reduces: tf.distribute concatenates all gradients, all-reduces the
  concatenation and splits it again, so every step would ship the frozen zeros between
  replicas. Zero pieces are taken out of the ConcatV2 and the SplitV sizes, and the
  SplitV outputs they filled become local zeros. Every replica runs the same rewrite, so
  the collectives still agree on their shapes; a pack with nothing left is removed.

Zero-ness follows ops that map zeros to zeros (Reshape, Cast, Square, Mul by anything,
reductions, ...), so folding never changes a value: S2's "a frozen entry's gradient is
zero everywhere it is used", made literal.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from .. import opkinds
from ..ir import IR, Tensor
from ..plan import Plan
from ..program import Program
from .build import Builder
from .result import PassResult

PASS = "fold_frozen_zeros"


def fold_frozen_zeros(program: Program, plan: Plan) -> PassResult:
    start = program.edits
    for ir in program.graphs():
        zeros = _zero_tensors(ir)
        if zeros:
            _drop_zero_summands(ir, zeros)
            _drop_neutral_stacked_terms(ir, {"Sum": zeros, "All": _true_tensors(ir, zeros)})
            _unpack_collectives(ir, zeros, plan)
    return PassResult(program, program.edits != start)


def _true_tensors(ir: IR, zeros: set[Tensor]) -> set[Tensor]:
    """Boolean tensors that are all true because they test zeros for finiteness."""
    trues: set[Tensor] = set()
    for node in ir.topological_order():
        op, inputs = ir.op(node), ir.inputs(node)
        if op == "IsFinite" and inputs and inputs[0] in zeros or \
                op == "All" and inputs and inputs[0] in trues:
            trues.add((node, 0))
    return trues


def _zero_tensors(ir: IR) -> set[Tensor]:
    """Tensors that are all zeros: the frozen-gradient fills and what they flow into."""
    zeros: set[Tensor] = set()
    for node in ir.topological_order():
        data = ir.graph.nodes[node]
        op = data["op"]
        if data.get("inserted") == "mask_gradients" and op == "Fill":
            zeros.add((node, 0))
            continue
        inputs = ir.inputs(node)
        if not inputs:
            continue
        if op == "IdentityN":
            zeros.update((node, k) for k, t in enumerate(inputs) if t in zeros)
        elif op == "Mul" and any(t in zeros for t in inputs) or \
                op in opkinds.ZERO_PRESERVING and inputs[0] in zeros:
            zeros.add((node, 0))
        elif op == "AddN" and all(t in zeros for t in inputs):
            zeros.add((node, 0))
    return zeros


def _drop_zero_summands(ir: IR, zeros: set[Tensor]) -> None:
    for node in ir.topological_order():
        op = ir.op(node)
        if op not in ("AddN", "AddV2", "Add") or (node, 0) in zeros:
            continue
        inputs = ir.inputs(node)
        live = [k for k, t in enumerate(inputs) if t not in zeros]
        if len(live) == len(inputs):
            continue
        out_shape = ir.shape((node, 0))
        if len(live) == 1 and ir.shape(inputs[live[0]]) == out_shape and out_shape is not None:
            ir.replace_uses((node, 0), inputs[live[0]])
        elif op == "AddN":
            ir.drop_inputs(node, [k for k in range(len(inputs)) if k not in live])


def _drop_neutral_stacked_terms(ir: IR, neutral: dict[str, set[Tensor]]) -> None:
    """Pack(...) reduced over the packed axis by Sum (All): drop zero (true) entries."""
    for pack in [n for n, op in ir.graph.nodes(data="op") if op == "Pack"]:
        inputs = ir.inputs(pack)
        uses = ir.consumers((pack, 0))
        if len(uses) != 1 or ir.op(uses[0][0]) not in neutral:
            continue
        dead = [k for k, t in enumerate(inputs) if t in neutral[ir.op(uses[0][0])]]
        if not dead or len(dead) == len(inputs):
            continue
        axes = ir.const_value(ir.inputs(uses[0][0])[1])
        axis = ir.nodedef(pack).attr["axis"].i
        if axes is None or axis not in {int(a) for a in np.ravel(axes)}:
            continue
        ir.drop_inputs(pack, dead)
        shape = ir.shape((pack, 0))
        if shape is not None:
            ir.set_shape((pack, 0), tuple(len(inputs) - len(dead) if i == axis else d
                                          for i, d in enumerate(shape)))


def _pack_chain(ir: IR, concat: str) -> tuple[list[str], str] | None:
    """ConcatV2 -> position-preserving ops (the all-reduce) -> SplitV, one consumer each."""
    chain: list[str] = []
    node = concat
    while True:
        uses = ir.consumers((node, 0))
        if len(uses) != 1:
            return None
        nxt, index = uses[0]
        op = ir.op(nxt)
        if op == "SplitV" and index == 0:
            return chain, nxt
        if op not in opkinds.POSITION_PRESERVING or ir.is_resource((node, 0)):
            return None
        chain.append(nxt)
        node = nxt


def _unpack_collectives(ir: IR, zeros: set[Tensor], plan: Plan) -> None:
    for concat in [n for n, op in ir.graph.nodes(data="op") if op == "ConcatV2"]:
        if concat not in ir:
            continue
        inputs = ir.inputs(concat)
        pieces, axis = inputs[:-1], ir.const_value(inputs[-1])
        dead = [k for k, t in enumerate(pieces) if t in zeros]
        if axis is None or int(axis) != 0 or not dead:
            continue
        found = _pack_chain(ir, concat)
        if found is None:
            continue
        chain, split = found
        sizes = ir.inputs(split)[1]
        if ir.op(sizes[0]) not in ("Pack", "Const") or len(ir.graph.nodes[split]["dtypes"]) != len(pieces):
            continue
        lengths = [s[0] if (s := ir.shape(t)) else None for t in pieces]
        known = [n for n in lengths if n is not None]
        # Zeros need static shapes: with one unknown, leave the pack as it is (nothing edited yet).
        dead_shapes = [(k, s) for k in dead if (s := ir.shape((split, k))) is not None]
        if len(known) != len(lengths) or len(dead_shapes) != len(dead):
            continue
        b = Builder(ir, PASS, split, f"graphfreeze/{PASS}/{split.replace('/', '_')}")
        for k, shape in dead_shapes:  # the pieces the split handed out become local zeros
            ir.replace_uses((split, k), b.zeros(shape, ir.dtype((split, k)), f"zeros_{k}"))
        keep = [k for k in range(len(pieces)) if k not in dead]
        if not keep:  # nothing left to reduce: the whole pack goes
            ir.remove_nodes([concat, *chain, split])
        else:
            _shrink_pack(ir, concat, chain, split, sizes, dead, keep, known)
        plan.notes.inserted.extend(b.created)


def _shrink_pack(ir: IR, concat: str, chain: list[str], split: str, sizes: Tensor,
                 dead: list[int], keep: list[int], lengths: list[int]) -> None:
    total = sum(lengths[k] for k in keep)
    ir.drop_inputs(concat, dead)
    for node in [concat, *chain]:
        ir.set_shape((node, 0), (total,))
    if ir.op(sizes[0]) == "Pack":
        ir.drop_inputs(sizes[0], dead)
    else:
        value = np.asarray(ir.const_value(sizes))[keep]
        with ir.edit(sizes[0]) as nd:
            nd.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    ir.set_shape(sizes, (len(keep),))
    with ir.edit(split) as nd:
        nd.attr["num_split"].i = len(keep)
    ir.keep_outputs(split, keep)
