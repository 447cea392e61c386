"""The verifier run between passes (in the test suite; see `passes.run_pipeline`).

`lint(program, plan, after=...)` checks what every pass must leave true and names the pass
that broke it:

* every graph's encoding (`IR.lint`: no dangling inputs, NodeDefs named as their nodes,
  inputs numbered once each, acyclic);
* no gradient marker left once `strip_markers` ran;
* every mask constant (passes/masks.py) a bool that broadcasts to its variable's shape,
  at most one per graph and variable;
* the dependence analysis stays valid while a later pass still reads it: passes only
  delete writes and change what flows into the markers, so every tensor that was there
  when the analysis ran, and every written resource that is not frozen (the frozen ones'
  writes are what the passes delete or guard), has the same bits now; once a write was
  deleted, bits may only have gone (the analysis is then conservative), never come.
"""

from __future__ import annotations

import tensorflow as tf

from ..ir import IR, LintError
from ..plan import Plan
from ..program import Program


def lint(program: Program, plan: Plan, *, after: str, dependence: bool = False,
         markers_stripped: bool = False) -> None:
    """Raise `LintError` naming the pass `after` if the program breaks an invariant."""
    try:
        for ir in program.graphs():
            ir.lint()
            _lint_masks(ir, plan)
        if markers_stripped:
            _lint_no_markers(plan)
        if dependence and plan.dependence is not None:
            _lint_dependence(program, plan)
    except LintError as e:
        raise LintError(f"after pass {after!r}: {e}") from None


def _lint_no_markers(plan: Plan) -> None:
    for ir, marker, _ in plan.sites:
        for name in (marker.values, marker.indices):
            if name and name in ir:
                raise LintError(f"gradient marker {name!r} is still in the graph")


def _lint_masks(ir: IR, plan: Plan) -> None:
    freezes = {vf.variable.path: vf for vf in plan.freezes}
    seen: dict[str, str] = {}
    for node, data in ir.graph.nodes(data=True):
        if data.get("inserted") and data["op"] == "Const" and node.startswith("graphfreeze/frozen/"):
            path = next((p for p, t in ir.const_cache.items() if t[0] == node), None)
            if path is None:
                raise LintError(f"mask constant {node!r} is not registered in the graph's cache")
            if path in seen:
                raise LintError(f"{path[1]!r} has two mask constants: {seen[path]!r} and {node!r}")
            seen[path] = node
            vf = freezes.get(path[1])
            if vf is None:
                raise LintError(f"mask constant {node!r} belongs to no frozen variable")
            shape, var_shape = data["shapes"][0], tuple(vf.variable.shape)
            dtype = data["nodedef"].attr["dtype"].type
            if dtype == tf.uint8.as_datatype_enum and shape:  # bits packed along the last axis
                shape = tuple(shape[:-1]) + (8 * shape[-1],)
            elif dtype != tf.bool.as_datatype_enum:
                raise LintError(f"mask constant {node!r} is {tf.as_dtype(dtype).name}, not bool")
            if shape is None or len(shape) != len(var_shape) or \
                    any(d not in (1, n) for d, n in zip(shape, var_shape)):
                raise LintError(f"mask constant {node!r} of shape {data['shapes'][0]} does not "
                                f"broadcast to {vf.variable.path!r} of shape {list(var_shape)}")


def _lint_dependence(program: Program, plan: Plan) -> None:
    from ..analysis.dependence import analyze  # the analysis imports the program; keep this light

    before = plan.dependence
    now, _ = analyze(program, plan.sites, plan.capture.variable_by_placeholder)
    # Deleting a write (a frozen variable's fused ResourceApply* also wrote its
    # accumulator) may take bits away from what reads that resource; that only makes the
    # stored analysis conservative. Until a write is deleted the bits must be equal.
    exact = not plan.notes.removed_writes
    graphs = {id(g): g for g in program.graphs()}

    def check(what: str, old: int, new: int) -> None:
        if new & ~old or (exact and new != old):
            raise LintError(f"the dependence analysis went stale: {what} had bits {old:#x}, "
                            f"now {new:#x}")

    for (gid, node, out), bits in before.bits.items():
        ir = graphs.get(gid)
        if ir is not None and node in ir:
            where = f" in function {ir.name!r}" if ir.name else ""
            check(f"{node}:{out}{where}", bits, now.bits.get((gid, node, out), 0))
    frozen = {vf.variable.placeholder for vf in plan.freezes}
    for resource in (set(before.resource_bits) | set(now.resource_bits)) - frozen:
        check(f"resource {resource!r}", before.resource_bits.get(resource, 0),
              now.resource_bits.get(resource, 0))
