"""Dead-code elimination, per graph and across calls.

Roots are the outputs (of the step, or `_Retval` nodes of a body), placeholders, and every
op with a side effect. Control edges do not keep a node alive: in a traced step they only
order side effects (roots anyway) and reads (which matter only if their value is used).
`IR.remove_nodes` keeps the ordering that removed nodes imposed on survivors.

Keras passes all gradients through one IdentityN; node-level liveness would keep every
frozen gradient alive through it. In a training step (which nobody differentiates) an
IdentityN is live per output and unused outputs are cut off it. In a forward function it
may carry a custom gradient, so it is left whole.

Across calls: an argument that no callee of an If/Case/PartitionedCall uses any more (a
frozen gradient passed into a loss-scaling or accumulation branch) is removed from the
call and from the bodies, so its producers die too. Loop arguments are left alone.
"""

from __future__ import annotations

from collections import defaultdict

from tensorflow.core.framework import function_pb2

from .. import opkinds
from ..ir import IR, Tensor
from ..plan import Plan
from ..program import Program
from .result import PassResult


def eliminate_dead_code(program: Program, plan: Plan) -> PassResult:
    start = program.edits
    while True:
        for ir in program.graphs():
            _eliminate(ir, plan, program)
        if not _prune_call_arguments(program):
            return PassResult(program, program.edits != start)


def side_effect_roots(ir: IR) -> set[str]:
    """Nodes that stay whatever their outputs feed: placeholders and ops with side effects."""
    return {n for n, op in ir.graph.nodes(data="op")
            if op == "Placeholder" or opkinds.has_side_effect(op)}


def _eliminate(ir: IR, plan: Plan, program: Program) -> None:
    if ir is program.main:
        outputs = plan.capture.output_refs
        roots = {name for name, _ in outputs}
    else:
        outputs, roots = [], set(ir.rets)
    plan.notes.dead_nodes += remove_dead(ir, roots | side_effect_roots(ir), outputs,
                                         per_output=plan.training)


def remove_dead(ir: IR, roots: set[str], outputs: list[Tensor], *, per_output: bool) -> int:
    """Delete what neither `roots` (nodes) nor `outputs` (tensors) need; returns the count.
    `per_output` makes IdentityN live per output (safe only where nobody differentiates)."""
    g = ir.graph
    live: set[str] = set()
    used: dict[str, set[int]] = defaultdict(set)
    stack: list[str] = []

    def use(tensor: Tensor) -> None:
        node, out = tensor
        while per_output and g.nodes[node]["op"] == "IdentityN":
            if out in used[node]:
                return
            used[node].add(out)
            live.add(node)
            node, out = ir.inputs(node)[out]
        if node not in live:
            live.add(node)
            stack.append(node)

    for root in roots:
        if root not in live:
            live.add(root)
            stack.append(root)
    for t in outputs:
        use(t)
    while stack:
        node = stack.pop()
        for src, _, attrs in g.in_edges(node, data=True):
            if not attrs["control"]:
                use((src, attrs["src_output"]))
    dead = [n for n in g.nodes if n not in live]
    ir.remove_nodes(dead)
    for node, outs in used.items():
        if len(outs) < len(g.nodes[node]["dtypes"]):
            ir.shrink_identity_n(node, outs)
    return len(dead)


def _prune_call_arguments(program: Program) -> bool:
    changed = False
    for ir in program.graphs():
        for node in program.call_nodes(ir):
            op = ir.op(node)
            if op in opkinds.LOOPS or op not in opkinds.CALL_TARGETS:
                continue
            callees = program.callees(ir, node)
            if not callees or any(len(program.call_sites[c.name]) != 1 for c in callees):
                continue
            bodies = [program.bodies[c.name] for c in callees]
            offset = callees[0].offset
            n_args = len(ir.inputs(node)) - offset
            unused = [i for i in range(n_args)
                      if all(not b.consumers((b.args[i], 0)) for b in bodies)]
            if not unused:
                continue
            for body in bodies:
                _drop_arguments(body, unused)
            ir.drop_inputs(node, [offset + i for i in unused], list_attr="Tin", offset=offset)
            with ir.edit(node) as nd:
                if "_read_only_resource_inputs" in nd.attr:  # recomputed at emission
                    del nd.attr["_read_only_resource_inputs"].list.i[:]
            changed = True
    return changed


def _drop_arguments(body: IR, drop: list[int]) -> None:
    gone = set(drop)
    fdef = function_pb2.FunctionDef()
    fdef.CopyFrom(body.fdef)
    kept = [i for i in range(len(body.args)) if i not in gone]
    args = list(fdef.signature.input_arg)
    del fdef.signature.input_arg[:]
    fdef.signature.input_arg.extend(args[i] for i in kept)
    arg_attr = {i: body.fdef.arg_attr[i] for i in body.fdef.arg_attr}
    unique_id = dict(body.fdef.resource_arg_unique_id)
    fdef.arg_attr.clear()
    fdef.resource_arg_unique_id.clear()
    for new, i in enumerate(kept):
        if i in arg_attr:
            fdef.arg_attr[new].CopyFrom(arg_attr[i])
        if i in unique_id:
            fdef.resource_arg_unique_id[new] = unique_id[i]
    body.remove_nodes([body.args[i] for i in drop])
    body.args = [body.args[i] for i in kept]
    body.fdef = fdef
