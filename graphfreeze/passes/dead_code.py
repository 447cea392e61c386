"""Dead-code elimination over data edges, per tensor where it matters.

Roots are the function's outputs, its placeholders and every op with a side effect.
Control edges do not keep a node alive: in a traced step they only order side effects
(which are roots anyway) and reads (which matter only if their value is used).
`IR.remove_nodes` keeps the ordering that removed nodes imposed on survivors.

Keras passes all gradients through one IdentityN; node-level liveness would keep every
frozen gradient alive through it. In a training step (which nobody differentiates) an
IdentityN is therefore live per output, and unused outputs are cut off it. In a forward
function it may carry a custom gradient, so it is left whole.
"""

from __future__ import annotations

from collections import defaultdict

from .. import opkinds
from ..ir import IR, Tensor
from ..plan import Plan


def eliminate_dead_code(ir: IR, plan: Plan) -> IR:
    g = ir.graph
    per_output = plan.training
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

    for t in plan.capture.output_tensors:
        name, _, idx = t.rpartition(":")
        use((name, int(idx)))
    for n, op in g.nodes(data="op"):
        if (op == "Placeholder" or opkinds.has_side_effect(op)) and n not in live:
            live.add(n)
            stack.append(n)
    while stack:
        node = stack.pop()
        for src, _, attrs in g.in_edges(node, data=True):
            if not attrs["control"]:
                use((src, attrs["src_output"]))

    dead = [n for n in g.nodes if n not in live]
    plan.notes.dead_nodes += len(dead)
    ir.remove_nodes(dead)
    for node, outs in used.items():
        if len(outs) < len(g.nodes[node]["dtypes"]):
            ir.shrink_identity_n(node, outs)
    return ir
