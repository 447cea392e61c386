"""What the passes need to know about TensorFlow op types, in one place.

Kept as explicit tables rather than heuristics so that an op the passes do not understand
is refused by name (UnsupportedGraphError) instead of being guessed at.
"""

from __future__ import annotations

from functools import cache

from tensorflow.python.framework import op_def_registry

# Ops that read a resource variable and have no side effect.
RESOURCE_READS = frozenset({
    "ReadVariableOp", "ResourceGather", "ResourceGatherNd", "VariableShape",
    "VarIsInitializedOp", "_ReadVariablesOp",
})

# Ops that forward a resource handle unchanged (output k aliases input k).
RESOURCE_ALIASES = frozenset({"Identity", "IdentityN"})

# Writes whose target is input 0 and whose other inputs are plain values.
ASSIGN_OPS = frozenset({"AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp"})
SCATTER_PREFIXES = ("ResourceScatter",)  # ResourceScatter{Add,Sub,Mul,Div,Min,Max,Update}, Nd*
FUSED_APPLY_PREFIXES = ("ResourceApply", "ResourceSparseApply")
OTHER_WRITES = frozenset({"ResourceStridedSliceAssign", "DestroyResourceOp"})

# Function-calling ops: resources reaching their bodies are followed in a later issue.
CALL_OPS = frozenset({
    "If", "StatelessIf", "While", "StatelessWhile", "Case", "StatelessCase",
    "PartitionedCall", "StatefulPartitionedCall",
})

# Full reductions and shape queries: gradient ownership does not flow through them, so a
# frozen variable's zero gradient inside a global norm does not tie it to every other slot.
REDUCTIONS = frozenset({"Sum", "Mean", "Max", "Min", "Prod", "All", "Any", "EuclideanNorm"})
SCALAR_REDUCTIONS = frozenset({"L2Loss"})
SHAPE_QUERIES = frozenset({"Shape", "ShapeN", "Size", "Rank", "VariableShape", "BroadcastArgs",
                           "BroadcastGradientArgs"})


def is_write(op: str) -> bool:
    return (op in ASSIGN_OPS or op in OTHER_WRITES or op.startswith(SCATTER_PREFIXES)
            or op.startswith(FUSED_APPLY_PREFIXES))


@cache
def is_stateful(op: str) -> bool:
    """Registry statefulness; an op the registry does not know (a library function called
    as an op) is assumed stateful, so it is never deleted as dead code."""
    op_def = op_def_registry.get(op)
    return op_def is None or bool(op_def.is_stateful)


def has_side_effect(op: str) -> bool:
    """Whether removing an op whose outputs nobody uses could change behaviour."""
    return is_stateful(op) and op not in RESOURCE_READS and op != "VarHandleOp"
