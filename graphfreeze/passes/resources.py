"""Where a variable's resource handle flows: every op that reads or writes it."""

from __future__ import annotations

from .. import opkinds
from ..errors import UnsupportedGraphError
from ..ir import IR


def resource_uses(ir: IR, placeholder: str) -> list[tuple[str, int]]:
    """(node, input index) of every non-alias op receiving the handle of `placeholder`.

    Follows Identity/IdentityN forwarding. Control-flow and call ops receiving the handle
    are returned too; callers decide whether they can handle them.
    """
    uses: list[tuple[str, int]] = []
    pending = [(placeholder, 0)]
    seen = set()
    while pending:
        tensor = pending.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for node, index in ir.consumers(tensor):
            op = ir.op(node)
            if op == "Identity":
                pending.append((node, 0))
            elif op == "IdentityN":
                pending.append((node, index))
            else:
                uses.append((node, index))
    return uses


def resource_owner(ir: IR, tensor: tuple[str, int]) -> str | None:
    """The placeholder a resource tensor ultimately comes from, following aliases."""
    node, out = tensor
    while True:
        op = ir.op(node)
        if op == "Placeholder":
            return node
        if op == "Identity":
            node, out = ir.inputs(node)[0]
        elif op == "IdentityN":
            node, out = ir.inputs(node)[out]
        else:
            return None


def check_known_use(ir: IR, node: str, var_path: str) -> str:
    """Classify a use of a frozen variable's handle as 'read' or 'write', or refuse it."""
    op = ir.op(node)
    if op in opkinds.RESOURCE_READS:
        return "read"
    if opkinds.is_write(op):
        return "write"
    if op in opkinds.CALL_OPS:
        raise UnsupportedGraphError(
            f"frozen variable {var_path!r} reaches the body of {op} node {node!r}; rewriting "
            "reads and writes inside control flow and nested functions is not supported yet. "
            "Freeze a different set of variables or restructure the step without it.")
    raise UnsupportedGraphError(
        f"frozen variable {var_path!r} is used by {op} node {node!r}, an op graphfreeze does "
        "not know how to guard; nothing was rewritten. Please report the op type.")
