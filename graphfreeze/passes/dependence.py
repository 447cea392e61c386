"""Which gradients each tensor derives from: per-tensor, ignoring control edges.

Each gradient marker gets a bit. A tensor's bits are the union of its data inputs' bits,
with three refinements that make the answer mean "whose optimizer update is this part of":

* output k of IdentityN depends on input k only (Keras funnels all gradients through one);
* full reductions to a scalar and shape queries pass no bits on, so a frozen variable's
  zero gradient inside a global norm or an all-finite check does not tie it to every
  other variable's update;
* reading a resource yields the bits of every value written to it (to a fixpoint), so a
  slot read back after its update carries the gradient that produced it. Variables that
  have a gradient of their own are the exception: their value is model state, and their
  reads carry no bits. This also makes the bits of every surviving tensor the same before
  and after the passes (which only delete writes and change what flows into markers), so
  one analysis of the traced graph serves the whole pipeline.

Control edges are ignored: Keras chains all updates with control dependencies, and they
say nothing about values.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .. import opkinds
from ..ir import IR, Tensor
from .resources import resource_owner


def _is_full_reduction(ir: IR, node: str, inputs: list[Tensor]) -> bool:
    op = ir.op(node)
    if op in opkinds.SCALAR_REDUCTIONS:
        return True
    if op not in opkinds.REDUCTIONS or not inputs:
        return False
    out_shape, in_shape = ir.shape((node, 0)), ir.shape(inputs[0])
    return out_shape == () and in_shape != ()


def write_targets(ir: IR, node: str, inputs: list[Tensor]) -> list[str]:
    """Placeholders whose resources a write op modifies."""
    return [p for p in (resource_owner(ir, t) for t in inputs if ir.is_resource(t)) if p]


class Dependence:
    """Gradient bits per tensor and per written resource, for one IR."""

    def __init__(self, ir: IR, sources: dict[Tensor, int], model_state: set[str] = frozenset()):
        self.ir = ir
        self.sources = sources
        self.model_state = model_state
        self.order = ir.topological_order()
        self.inputs = {n: ir.inputs(n) for n in self.order}
        self.tensor_bits: dict[Tensor, int] = {}
        self.resource_bits: dict[str, int] = defaultdict(int)
        self._solve()

    def bits(self, tensor: Tensor) -> int:
        return self.tensor_bits.get(tensor, 0)

    def value_bits(self, node: str) -> int:
        """Bits of the non-resource inputs of `node` (the values a write stores)."""
        out = 0
        for t in self.inputs[node]:
            if not self.ir.is_resource(t):
                out |= self.bits(t)
        return out

    def _solve(self) -> None:
        ir = self.ir
        writes = [n for n in self.order if opkinds.is_write(ir.op(n))]
        while True:
            self._propagate()
            resource_bits: dict[str, int] = defaultdict(int)
            for w in writes:
                v = self.value_bits(w)
                for target in write_targets(ir, w, self.inputs[w]):
                    resource_bits[target] |= v
            if resource_bits == self.resource_bits:
                return
            self.resource_bits = resource_bits

    def _propagate(self) -> None:
        ir, bits = self.ir, {}
        for node in self.order:
            inputs = self.inputs[node]
            op = ir.op(node)
            n_out = max(len(ir.graph.nodes[node]["dtypes"]), 1)
            if (node, 0) in self.sources:
                b = self.sources[(node, 0)]
            elif op in opkinds.SHAPE_QUERIES or _is_full_reduction(ir, node, inputs):
                b = 0
            elif op == "IdentityN":
                for k, t in enumerate(inputs):
                    bits[(node, k)] = bits.get(t, 0)
                continue
            else:
                b = 0
                for t in inputs:
                    b |= bits.get(t, 0)
                if op in opkinds.RESOURCE_READS and inputs:
                    owner = resource_owner(ir, inputs[0])
                    if owner is not None and owner not in self.model_state:
                        b |= self.resource_bits.get(owner, 0)
            for k in range(n_out):
                bits[(node, k)] = b
        self.tensor_bits = bits



def analyze(ir: IR, markers: list, variables: dict) -> tuple[Dependence, dict[int, Any]]:
    """Gradient dependence of the traced graph: one bit per marker.

    Returns the analysis and, per bit, the variable its marker belongs to.
    """
    by_id = {id(v.variable): v for v in variables.values()}
    sources, owners = {}, {}
    for i, m in enumerate(markers):
        for name in (m.values, m.indices):
            if name:
                sources[(name, 0)] = 1 << i
        owners[1 << i] = by_id.get(id(m.variable))
    marked = {v.placeholder for v in owners.values() if v is not None}
    return Dependence(ir, sources, marked), owners


def optimizer_state(dep: Dependence, owners: dict[int, Any], variables: dict) -> set[str]:
    """Placeholders of variables that are optimizer state: written with gradient-derived
    values but without a gradient of their own (slots, accumulators)."""
    marked = {v.placeholder for v in owners.values() if v is not None}
    return {p for p, bits in dep.resource_bits.items()
            if bits and p in variables and p not in marked}
