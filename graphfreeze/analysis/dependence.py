"""What each tensor derives from, across the whole program (main graph and bodies).

Every variable that has a gradient marker gets an index i and two bits:

* gradient bit G_i: the tensor depends on variable i's gradient. It flows along data
  edges, with refinements that make it mean "part of variable i's update":
  output k of IdentityN depends on input k only (Keras funnels all gradients through one);
  full reductions to a scalar and shape queries pass nothing on, so a zero gradient inside
  a global norm or an all-finite check does not tie a frozen variable to every other
  update; reading a resource yields the bits of every value written to it, so a slot read
  back after its update carries the gradient that produced it. Reading a marked variable
  itself yields no G bit: its value is model state.
* ownership bit O_i: the tensor is, entry by entry, a function of variable i's value or
  gradient at that variable's shape. It flows only through elementwise ops from inputs of
  the output's own shape, so an exponential moving average of a weight is owned by the
  weight, while BatchNorm statistics (reductions of activations) are owned by nobody.

Control edges are ignored (Keras chains all updates with them; they say nothing about
values). Packed tensors are followed piece by piece: tf.distribute all-reduces gradients as
ConcatV2 of flattened gradients -> CollectiveReduceV2 -> SplitV; a ConcatV2 along axis 0
records its inputs' bits as segments, position-preserving ops (the collective, scaling)
keep them, and each SplitV output gets only the bits of the segments it covers.

Call ops connect to their bodies: call input k feeds argument k - offset, body output k
feeds call output k, and a While body's outputs feed its own arguments. The bits are solved
to a fixpoint over the program, so one analysis of the traced program serves the whole
pipeline (passes only delete writes and change what flows into markers, which leaves every
surviving tensor's bits unchanged; the one pass that adds writes, lower_fused_apply, runs
first and solves it again).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .. import opkinds
from ..ir import IR, RETVAL, Tensor
from ..program import Program


def _full_reduction(ir: IR, node: str, inputs: list[Tensor]) -> bool:
    op = ir.op(node)
    if op in opkinds.SCALAR_REDUCTIONS:
        return True
    if op not in opkinds.REDUCTIONS or not inputs:
        return False
    return ir.shape((node, 0)) == () and ir.shape(inputs[0]) != ()


class Dependence:
    """G and O bits per tensor and per written resource (a main-graph placeholder)."""

    def __init__(self, program: Program, sources: dict[tuple[int, Tensor], int],
                 reads: dict[str, int], n_vars: int):
        self.program = program
        self.sources = sources          # (id(ir), marker tensor) -> G_i | O_i
        self.reads = reads              # marked variable placeholder -> O_i
        self.n = n_vars
        self.g_mask = (1 << n_vars) - 1
        self.solve_again()

    def solve_again(self) -> None:
        """Solve over the program as it is now: for a pass that adds writes
        (passes/lower_fused_apply.py writes fused kernels out before any other pass runs)."""
        program = self.program
        self.graphs = program.graphs()
        self.orders = {id(g): g.topological_order() for g in self.graphs}
        self.inputs = {(id(g), n): g.inputs(n) for g in self.graphs for n in self.orders[id(g)]}
        self.arg_index = {(id(b), p): i for b in program.bodies.values() for i, p in enumerate(b.args)}
        self.bits: dict[tuple[int, str, int], int] = {}
        # (graph, node, output) -> [(length, bits), ...] along axis 0, for packed tensors
        self.segments: dict[tuple[int, str, int], list[tuple[int, int]]] = {}
        self.resource_bits: dict[str, int] = defaultdict(int)
        self._owners: dict[tuple[int, Tensor], frozenset[str]] = {}
        self.writes = [(g, n) for g in self.graphs for n in self.orders[id(g)] if opkinds.is_write(g.op(n))]
        self._solve()

    # ------------------------------------------------------------------ queries

    def owners(self, ir: IR, tensor: Tensor) -> frozenset[str]:
        key = (id(ir), tensor)
        if key not in self._owners:
            self._owners[key] = self.program.resource_owners(ir, tensor)
        return self._owners[key]

    def tensor_bits(self, ir: IR, tensor: Tensor) -> int:
        return self.bits.get((id(ir), tensor[0], tensor[1]), 0)

    def value_bits(self, ir: IR, node: str) -> int:
        """Bits of the non-resource inputs of `node` (the values a write stores)."""
        out = 0
        for t in self.inputs[(id(ir), node)]:
            if not ir.is_resource(t):
                out |= self.tensor_bits(ir, t)
        return out

    def write_targets(self, ir: IR, node: str) -> frozenset[str]:
        targets: set[str] = set()
        for t in self.inputs[(id(ir), node)]:
            if ir.is_resource(t):
                targets |= self.owners(ir, t)
        return frozenset(targets)

    def split(self, bits: int) -> tuple[int, int]:
        return bits & self.g_mask, bits >> self.n

    # ------------------------------------------------------------------ solving

    def _solve(self) -> None:
        while True:
            changed = False
            for g in self.graphs:
                changed |= self._propagate(g)
            resource_bits: dict[str, int] = defaultdict(int)
            for g, w in self.writes:
                v = self.value_bits(g, w)
                for target in self.write_targets(g, w):
                    resource_bits[target] |= v
            if resource_bits != self.resource_bits:
                self.resource_bits = resource_bits
                changed = True
            if not changed:
                return

    def _set(self, key: tuple[int, str, int], value: int) -> bool:
        if self.bits.get(key, 0) != value:
            self.bits[key] = value
            return True
        return False

    def _elementwise_o(self, ir: IR, node: str, inputs: list[Tensor]) -> int:
        out_shape = ir.shape((node, 0))
        o = 0
        if out_shape is None or None in out_shape:
            return 0
        for t in inputs:
            if ir.shape(t) == out_shape:
                o |= self.tensor_bits(ir, t) >> self.n
        return o

    def _propagate(self, ir: IR) -> bool:
        gid, changed = id(ir), False
        program, n = self.program, self.n
        for node in self.orders[gid]:
            inputs = self.inputs[(gid, node)]
            op = ir.op(node)
            n_out = max(len(ir.graph.nodes[node]["dtypes"]), 1)
            if (gid, (node, 0)) in self.sources:
                changed |= self._set((gid, node, 0), self.sources[(gid, (node, 0))])
                continue
            if op == "Placeholder":
                changed |= self._set((gid, node, 0), self._arg_bits(ir, node))
                continue
            if op == "IdentityN":
                for k, t in enumerate(inputs):
                    changed |= self._set((gid, node, k), self.tensor_bits(ir, t))
                continue
            callees = program.callees(ir, node)
            if callees:
                for k in range(n_out):
                    changed |= self._set((gid, node, k), self._call_output_bits(ir, node, k, callees))
                continue
            if self._packed(ir, node, op, inputs, n_out):
                if op in ("SplitV", "Split"):
                    changed |= self._split(ir, node, op, inputs, n_out)
                else:
                    changed |= self._set((gid, node, 0), self._segment_bits((gid, node, 0)))
                continue
            g = 0
            if op not in opkinds.SHAPE_QUERIES and not _full_reduction(ir, node, inputs):
                for t in inputs:
                    g |= self.tensor_bits(ir, t) & self.g_mask
            if op in ("Identity", RETVAL, "StopGradient", "Cast"):
                o = (self.tensor_bits(ir, inputs[0]) >> n) if inputs else 0
            elif op in opkinds.ELEMENTWISE:
                o = self._elementwise_o(ir, node, inputs)
            else:
                o = 0
            if op in opkinds.RESOURCE_READS and inputs:
                for owner in self.owners(ir, inputs[0]):
                    if owner in self.reads:
                        o |= self.reads[owner] >> n
                    else:
                        rb = self.resource_bits.get(owner, 0)
                        g |= rb & self.g_mask
                        o |= rb >> n
            value = g | (o << n)
            for k in range(n_out):
                changed |= self._set((gid, node, k), value)
        return changed

    def _segment_bits(self, key: tuple[int, str, int]) -> int:
        out = 0
        for _, b in self.segments.get(key, ()):
            out |= b
        return out

    def _segments_of(self, ir: IR, tensor: Tensor) -> list[tuple[int, int]] | None:
        key = (id(ir), tensor[0], tensor[1])
        if key in self.segments:
            return self.segments[key]
        shape = ir.shape(tensor)
        if shape and shape[0] is not None and len(shape) == 1:
            return [(shape[0], self.tensor_bits(ir, tensor))]
        return None

    def _packed(self, ir: IR, node: str, op: str, inputs: list[Tensor], n_out: int) -> bool:
        """Segments for packed tensors; True when `node` was handled piece by piece."""
        gid = id(ir)
        axis = ir.const_value(inputs[-1]) if op == "ConcatV2" and len(inputs) > 2 else None
        if axis is not None and int(axis) == 0:
            parts = [self._segments_of(ir, t) for t in inputs[:-1]]
            known = [p for p in parts if p is not None]
            if len(known) == len(parts):
                self.segments[(gid, node, 0)] = [seg for p in known for seg in p]
                return True
        elif op in opkinds.POSITION_PRESERVING and inputs:
            packed = [t for t in inputs if (gid, t[0], t[1]) in self.segments]
            if packed:
                extra = 0  # bits of the other inputs (a scale factor) reach every piece
                for t in inputs:
                    if t != packed[0] and not ir.is_resource(t):
                        extra |= self.tensor_bits(ir, t)
                base = self.segments[(gid, packed[0][0], packed[0][1])]
                self.segments[(gid, node, 0)] = [(n, b | extra) for n, b in base]
                return True
        elif op in ("SplitV", "Split") and inputs:
            value = inputs[0] if op == "SplitV" else inputs[1]
            return (gid, value[0], value[1]) in self.segments
        return False

    def _split(self, ir: IR, node: str, op: str, inputs: list[Tensor], n_out: int) -> bool:
        gid = id(ir)
        value = inputs[0] if op == "SplitV" else inputs[1]
        segments = self.segments[(gid, value[0], value[1])]
        changed, offset = False, 0
        for k in range(n_out):
            shape = ir.shape((node, k))
            length = shape[0] if shape and shape[0] is not None else None
            if length is None:  # sizes unknown: every piece may hold anything
                bits = self._segment_bits((gid, value[0], value[1]))
            else:
                bits, start = 0, 0
                for n, b in segments:
                    if start < offset + length and offset < start + n:
                        bits |= b
                    start += n
                offset += length
            changed |= self._set((gid, node, k), bits)
        return changed

    def _arg_bits(self, ir: IR, placeholder: str) -> int:
        i = self.arg_index.get((id(ir), placeholder))
        if i is None:
            return 0
        out = 0
        for caller, call, callee in self.program.call_sites[ir.name]:
            inputs = self.inputs.get((id(caller), call), [])
            if i + callee.offset < len(inputs):
                out |= self.tensor_bits(caller, inputs[i + callee.offset])
            if caller.op(call) in opkinds.LOOPS:  # loop-carried: the body's output k comes back
                body = self.program.bodies[self.program.callees(caller, call)[0].name]
                rets = body.rets
                if i < len(rets):
                    out |= self.tensor_bits(body, body.inputs(rets[i])[0])
        return out

    def _call_output_bits(self, ir: IR, node: str, k: int, callees) -> int:
        out = 0
        loop = ir.op(node) in opkinds.LOOPS
        for c in callees[:1] if loop else callees:
            body = self.program.bodies[c.name]
            rets = body.rets
            if k < len(rets):
                out |= self.tensor_bits(body, body.inputs(rets[k])[0])
        if loop:
            inputs = self.inputs[(id(ir), node)]
            if k < len(inputs):
                out |= self.tensor_bits(ir, inputs[k])
        return out


def analyze(program: Program, marker_sites: Sequence, variables: dict) -> tuple[Dependence, dict[int, Any]]:
    """Dependence of the traced program; returns it and, per variable index, the variable.

    `marker_sites` lists (ir, marker, variable) triples (`plan.sites`); `variables`
    maps placeholders to VariableInfo.
    The per-replica components of a distributed variable share its index.
    """
    components: dict[int, list[Any]] = {}
    for v in variables.values():
        components.setdefault(id(v.variable), []).append(v)
    index: dict[int, int] = {}
    owners: dict[int, Any] = {}
    for _, m, _ in marker_sites:
        group = components.get(id(m.variable))
        if group and id(m.variable) not in index:
            index[id(m.variable)] = len(index)
            owners[index[id(m.variable)]] = group[0]
    n = max(len(index), 1)
    sources, reads = {}, {}
    for ir, m, _ in marker_sites:
        if id(m.variable) not in index:
            continue
        i = index[id(m.variable)]
        for name in (m.values, m.indices):
            if name and name in ir:
                sources[(id(ir), (name, 0))] = (1 << i) | (1 << (i + n))
    for key, i in index.items():
        for v in components[key]:
            reads[v.placeholder] = 1 << (i + n)
    return Dependence(program, sources, reads, n), owners


def marked_placeholders(dep: Dependence) -> set[str]:
    """Placeholders of every component of every variable that has a gradient."""
    return set(dep.reads)


def optimizer_state(dep: Dependence, owners: dict[int, Any], variables: dict) -> set[str]:
    """Placeholders of variables written with gradient-derived values that have no gradient
    of their own: optimizer slots and accumulators."""
    marked = marked_placeholders(dep)
    return {p for p, bits in dep.resource_bits.items()
            if bits & dep.g_mask and p in variables and p not in marked}
