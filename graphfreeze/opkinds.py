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

# Fused optimizer kernels with a ResourceSparseApply* counterpart: the same inputs with
# `indices` after the gradient (input `grad`, or `delta`), the same attrs plus `Tindices`.
# passes/lower_fused_apply.py runs them on a rows-frozen variable's trainable rows.
SPARSE_APPLY = {f"ResourceApply{k}": f"ResourceSparseApply{k}" for k in (
    "Momentum", "KerasMomentum", "RMSProp", "CenteredRMSProp", "Adagrad", "AdagradV2",
    "Adadelta", "Ftrl", "FtrlV2", "ProximalAdagrad", "ProximalGradientDescent", "AdagradDA")}
# Fused optimizer kernels that passes/lower_fused_apply.py writes out as elementwise ops
# and Assign* writes (the kernels' formulas in tensorflow/core/kernels/training_ops.cc).
LOWERED_APPLY = frozenset(f"ResourceApply{k}" for k in (
    "GradientDescent", "Momentum", "KerasMomentum", "Adam", "AdamWithAmsgrad", "AdaMax",
    "RMSProp", "CenteredRMSProp", "Adagrad", "AdagradV2", "Adadelta", "AddSign", "PowerSign"))

# Which attrs of a call op name the functions it calls, and where its inputs start in
# their argument lists (If/Case take a predicate or branch index first).
CALL_TARGETS = {
    "If": (("then_branch", "else_branch"), 1), "StatelessIf": (("then_branch", "else_branch"), 1),
    "While": (("body", "cond"), 0), "StatelessWhile": (("body", "cond"), 0),
    "Case": (("branches",), 1), "StatelessCase": (("branches",), 1),
    "PartitionedCall": (("f",), 0), "StatefulPartitionedCall": (("f",), 0),
}
LOOPS = frozenset({"While", "StatelessWhile"})

# Full reductions and shape queries: gradient ownership does not flow through them, so a
# frozen variable's zero gradient inside a global norm does not tie it to every other slot.
REDUCTIONS = frozenset({"Sum", "Mean", "Max", "Min", "Prod", "All", "Any", "EuclideanNorm"})
SCALAR_REDUCTIONS = frozenset({"L2Loss"})
SHAPE_QUERIES = frozenset({"Shape", "ShapeN", "Size", "Rank", "VariableShape", "BroadcastArgs",
                           "BroadcastGradientArgs"})


# Ops whose output is an entry-by-entry function of their inputs. Ownership (which
# variable's state a value is, see analysis/dependence.py) flows through these only.
ELEMENTWISE = frozenset({
    "Identity", "StopGradient", "PreventGradient", "Cast", "Neg", "Abs", "Square", "Sqrt",
    "Rsqrt", "Reciprocal", "Exp", "Log", "Log1p", "Sign", "Tanh", "Sigmoid", "Relu", "Floor",
    "Ceil", "Round", "Mul", "MulNoNan", "AddV2", "Add", "Sub", "RealDiv", "Div", "DivNoNan",
    "Maximum", "Minimum", "Pow", "SquaredDifference", "SelectV2", "Select", "ClipByValue",
    "Xdivy", "Xlogy", "IsFinite", "LogicalAnd", "LogicalOr", "LogicalNot", "Less", "Greater",
    "LessEqual", "GreaterEqual", "Equal", "NotEqual", "Atan2", "FloorDiv", "FloorMod",
})


# Ops that keep every element of a packed (concatenated) tensor in place, so that the
# dependence analysis can follow each packed piece through them: the all-reduce that
# tf.distribute runs on the concatenation of all gradients, and elementwise scaling.
POSITION_PRESERVING = frozenset({
    "CollectiveReduceV2", "CollectiveReduce", "NcclAllReduce", "Identity", "StopGradient",
    "Cast", "Mul", "RealDiv", "Div", "DivNoNan", "AddV2", "Sub", "Neg", "Reshape",
})


# Ops that draw random numbers or hold random state (their output changes between runs or
# epochs, so nothing below them can be cached). Explicit, so a new kernel is not guessed at.
RANDOM = frozenset({
    "RandomUniform", "RandomUniformInt", "RandomStandardNormal", "RandomGamma",
    "RandomGammaGrad", "RandomPoisson", "RandomPoissonV2", "RandomShuffle", "RandomCrop",
    "RandomIndexShuffle", "RandomShuffleQueue", "RandomShuffleQueueV2", "RandomDataset",
    "RandomDatasetV2", "ExperimentalRandomDataset", "AnonymousRandomSeedGenerator",
    "DeleteRandomSeedGenerator", "RiscRandomUniform", "TruncatedNormal",
    "ParameterizedTruncatedNormal", "Multinomial", "RngReadAndSkip", "RngSkip",
    "XlaRngBitGenerator", "StatefulRandomBinomial", "StatefulStandardNormal",
    "StatefulStandardNormalV2", "StatefulTruncatedNormal", "StatefulUniform",
    "StatefulUniformFullInt", "StatefulUniformInt", "StatelessRandomBinomial",
    "StatelessRandomGammaV2", "StatelessRandomGammaV3", "StatelessRandomGetAlg",
    "StatelessRandomGetKeyCounter", "StatelessRandomGetKeyCounterAlg", "StatelessRandomNormal",
    "StatelessRandomNormalV2", "StatelessRandomPoisson", "StatelessRandomUniform",
    "StatelessRandomUniformFullInt", "StatelessRandomUniformFullIntV2",
    "StatelessRandomUniformInt", "StatelessRandomUniformIntV2", "StatelessRandomUniformV2",
    "StatelessTruncatedNormal", "StatelessTruncatedNormalV2", "StatelessMultinomial",
    "StatelessParameterizedTruncatedNormal",
})

# Ops whose output is zero wherever their first (data) input is zero, so a frozen
# variable's zero gradient stays zero through them (passes/fold_zeros.py).
ZERO_PRESERVING = frozenset({
    "Identity", "Reshape", "Cast", "StopGradient", "Neg", "Square", "Squeeze", "ExpandDims",
    "Transpose", "Sum", "Mean", "Max", "Min", "L2Loss", "UnsortedSegmentSum", "Abs", "Sqrt",
    "CollectiveReduceV2", "CollectiveReduce", "NcclAllReduce", "Relu", "Sign",
})

# Reads that yield the variable's value (or rows of it), as opposed to its shape.
VALUE_READS = frozenset({"ReadVariableOp", "ResourceGather"})

# Ops that pass their input through unchanged for the forward value.
PASS_THROUGH = frozenset({"Identity", "StopGradient"})

# Name scopes of the backward pass (GradientTape, tf.gradients): a node's first scope.
BACKWARD_SCOPES = ("gradient_tape", "gradients")

# Ops that keep a value, up to its dtype.
CASTS = frozenset({"Identity", "Cast"})

# Nodes that need no ordering: control edges from them carry nothing.
NO_ORDERING = frozenset({"Placeholder", "Const"})

# BatchNorm: the fused kernels, and the arithmetic of a moving-average update
# (passes/batchnorm_inference.py follows statistics through these only).
FUSED_BATCH_NORMS = frozenset({"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"})
UPDATE_ARITHMETIC = frozenset({"Mul", "AddV2", "Add", "Sub", "Cast", "Identity"})
SUMS = frozenset({"AddN", "AddV2", "Add"})

# The cost model (flops.py): ops that move or describe data but compute nothing, reductions
# (cost: one operation per input entry) and convolutions.
COST_FREE = frozenset({
    "Const", "Placeholder", "Identity", "IdentityN", "NoOp", "Reshape", "Squeeze", "ExpandDims",
    "Shape", "ShapeN", "Size", "Rank", "ReadVariableOp", "VarHandleOp", "StopGradient",
    "PreventGradient", "_Retval", "BroadcastGradientArgs", "StridedSlice", "ConcatV2", "Pack",
    "Unpack", "Fill", "ZerosLike", "OnesLike", "Cast", "Transpose", "Tile", "GatherV2",
})
COST_REDUCTIONS = frozenset({"Sum", "Mean", "Max", "Min", "Prod", "BiasAddGrad", "L2Loss",
                             "UnsortedSegmentSum", "EuclideanNorm", "All", "Any"})
CONVOLUTIONS = frozenset({"Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "Conv3D",
                          "DepthwiseConv2dNative", "DepthwiseConv2dNativeBackpropInput",
                          "DepthwiseConv2dNativeBackpropFilter"})


def is_write(op: str) -> bool:
    return (op in ASSIGN_OPS or op in OTHER_WRITES or op.startswith(SCATTER_PREFIXES)
            or op.startswith(FUSED_APPLY_PREFIXES))


@cache
def is_stateful(op: str) -> bool:
    """Registry statefulness; an op the registry does not know (a library function called
    as an op) is assumed stateful, so it is never deleted as dead code."""
    op_def = op_def_registry.get(op)
    return op_def is None or bool(op_def.is_stateful)


def output_arg_names(nodedef, signatures: dict) -> list[str]:
    """FunctionDef names ("arg:k") of each flat output of a node, in output order.

    `signatures` maps library function names to their OpDef-like signatures, for nodes that
    call a library function directly by op type.
    """
    op_def = signatures.get(nodedef.op) or op_def_registry.get(nodedef.op)
    if op_def is None:
        raise KeyError(nodedef.op)
    names: list[str] = []
    for arg in op_def.output_arg:
        if arg.number_attr:
            count = nodedef.attr[arg.number_attr].i
        elif arg.type_list_attr:
            count = len(nodedef.attr[arg.type_list_attr].list.type)
        else:
            count = 1
        names.extend(f"{arg.name}:{k}" for k in range(count))
    return names


def has_side_effect(op: str) -> bool:
    """Whether removing an op whose outputs nobody uses could change behaviour."""
    return is_stateful(op) and op not in RESOURCE_READS and op != "VarHandleOp"
