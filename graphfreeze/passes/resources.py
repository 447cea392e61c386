"""Classifying the ops that receive a frozen variable's handle."""

from __future__ import annotations

from .. import opkinds
from ..errors import UnsupportedGraphError
from ..ir import IR


def check_known_use(ir: IR, node: str, var_path: str) -> str:
    """'read' or 'write' for an op receiving a frozen variable's handle; refuse the rest."""
    op = ir.op(node)
    if op in opkinds.RESOURCE_READS:
        return "read"
    if opkinds.is_write(op):
        return "write"
    where = f" in function {ir.name!r}" if ir.name else ""
    raise UnsupportedGraphError(
        f"frozen variable {var_path!r} is used by {op} node {node!r}{where}, an op graphfreeze "
        "does not know how to guard; nothing was rewritten. Freeze other variables, or report "
        "the op type.")
