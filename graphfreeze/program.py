"""A traced function together with every library function it (transitively) calls.

Real training steps hide reads and writes in function bodies: Keras's LossScaleOptimizer,
gradient accumulation and EMA put optimizer updates in `If` branches, RNNs run in `While`
loops, nested `tf.function`s become `PartitionedCall`s. A `Program` loads each reachable
body as its own `IR` (args are Placeholders named after the FunctionDef's input args;
outputs are synthetic `_Retval` nodes, so rewrites that replace a returned tensor need no
special case), follows resource handles across call boundaries, and on emission gives
every body that changed, and every body that calls one, a fresh name.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, NamedTuple

import tensorflow as tf
from tensorflow.core.framework import function_pb2, graph_pb2
from tensorflow.python.eager import context
from tensorflow.python.framework import function_def_to_graph, importer, op_def_registry, ops

from . import opkinds
from .errors import UnsupportedGraphError, stage
from .ir import IR, RETVAL, Tensor
from .protos import drop_missing_colocations, graph_meta

_FRESH = itertools.count()


class Callee(NamedTuple):
    """One function a call op calls: call input k feeds argument k - offset."""

    name: str
    offset: int
    attr: str
    position: int | None  # index in a list-valued attr (Case branches), else None


class Use(NamedTuple):
    """A node receiving a resource handle at input `index`, in graph `ir`."""

    ir: IR
    node: str
    index: int  # type: ignore[assignment]  # shadows tuple.index(), never called on a Use


def _called_functions(node_defs: Iterable[Any]) -> set[str]:
    """Names of the library functions some node calls: through a func or list(func) attr
    (If branches, PartitionedCall), or as its op type."""
    names: set[str] = set()
    for nd in node_defs:
        if op_def_registry.get(nd.op) is None:
            names.add(nd.op)
        for value in nd.attr.values():
            if value.HasField("func"):
                names.add(value.func.name)
            names.update(f.name for f in value.list.func)
    names.discard("")
    return names


def _ambient_function_def(name: str) -> Any:
    """`name`'s FunctionDef as TensorFlow registered it outside the step: on a graph being
    traced around the rewrite, or in the eager context."""
    fdef = function_def_to_graph.get_function_def(name, ops.get_default_graph())
    if fdef is None and context.context().has_function(name):
        fdef = context.context().get_function_def(name)
    return fdef


def _complete_library(main: IR) -> None:
    """Add to the step's library every function reachable from it that TensorFlow
    registered elsewhere (an outer function's graph, the eager context), so that loading,
    rewriting and emitting never depend on where the trace happened."""
    have = {f.signature.name for f in main.library.function}
    pending = _called_functions(main.graph.nodes[n]["nodedef"] for n in main.graph)
    for f in main.library.function:
        pending |= _called_functions(f.node_def)
    while pending:
        name = pending.pop()
        if name in have:
            continue
        fdef = _ambient_function_def(name)
        if fdef is None:  # not a function after all (e.g. a custom op), or truly missing
            continue
        main.library.function.add().CopyFrom(fdef)
        have.add(name)
        pending |= _called_functions(fdef.node_def)


class Program:
    """The traced function (`main`) plus its reachable library function bodies."""

    def __init__(self, main: IR):
        self.main = main
        _complete_library(main)
        self.fdefs = {f.signature.name: f for f in main.library.function}
        self.signatures = {name: f.signature for name, f in self.fdefs.items()}
        self.bodies: dict[str, IR] = {}
        self.call_sites: dict[str | None, list[tuple[IR, str, Callee]]] = defaultdict(list)
        self._scope: tf.Graph | None = None
        self._load_reachable()
        self._scope = None  # only needed while loading; it holds a copy of the library

    # ------------------------------------------------------------------ structure

    def graphs(self) -> list[IR]:
        return [self.main, *self.bodies.values()]

    @property
    def edits(self) -> int:
        """Edits made so far to every graph (a pass compares it on entry and exit)."""
        return sum(ir.edits for ir in self.graphs())

    def callees(self, ir: IR, node: str) -> list[Callee]:
        op = ir.op(node)
        if op in opkinds.CALL_TARGETS:
            attrs, offset = opkinds.CALL_TARGETS[op]
            out = []
            for attr in attrs:
                value = ir.attr(node, attr)
                if value.HasField("func"):
                    out.append(Callee(value.func.name, offset, attr, None))
                else:
                    out.extend(Callee(f.name, offset, attr, i) for i, f in enumerate(value.list.func))
            return out
        if op in self.fdefs:  # a library function called directly as an op
            return [Callee(op, 0, "", None)]
        return []

    def remove_nodes(self, located: Iterable[tuple[IR, str]]) -> None:
        """Remove (graph, node) pairs, each graph's in one `IR.remove_nodes` call."""
        by_graph: dict[int, tuple[IR, list[str]]] = {}
        for ir, node in located:
            by_graph.setdefault(id(ir), (ir, []))[1].append(node)
        for ir, nodes in by_graph.values():
            ir.remove_nodes(nodes)

    def call_nodes(self, ir: IR) -> list[str]:
        return [n for n, op in ir.graph.nodes(data="op")
                if op in opkinds.CALL_TARGETS or op in self.fdefs]

    def _load_reachable(self) -> None:
        pending = [self.main]
        while pending:
            ir = pending.pop()
            for node in self.call_nodes(ir):
                for callee in self.callees(ir, node):
                    self.call_sites[callee.name].append((ir, node, callee))
                    if callee.name not in self.bodies:
                        body = self._load(callee.name)
                        self.bodies[callee.name] = body
                        pending.append(body)

    def _load(self, name: str) -> IR:
        fdef = self.fdefs.get(name)
        if fdef is None:
            raise UnsupportedGraphError(f"the traced graph calls function {name!r}, which is not "
                                        "in its library, in an enclosing function's or in the "
                                        "eager context; graphfreeze cannot follow it.")
        with stage(f"function body {name!r}"):
            return self._load_body(name, fdef)

    def _load_body(self, name: str, fdef: Any) -> IR:
        # TensorFlow resolves the functions a body calls (If branches, nested calls) in the
        # ambient context: the eager context, or the graph being traced when the step is
        # rewritten from inside another tf.function (Keras's train function calling
        # one_step_on_data). Neither need hold the step's own library, so load every body
        # in a private graph that holds exactly that library.
        with self._library_scope().as_default():
            graph = function_def_to_graph.function_def_to_graph(fdef)
        body = IR.from_graph_def(graph.as_graph_def(), graph_meta(graph))
        body.library, body.versions = self.main.library, self.main.versions
        body.name, body.fdef = name, fdef
        body.args = [t.op.name for t in graph.inputs]
        for k, t in enumerate(graph.outputs):
            ret = body.add_node(f"graphfreeze_ret_{k}", RETVAL, [(t.op.name, t.value_index)],
                                after=(len(body), 0))
            body.graph.nodes[ret]["index"] = k
        body.changed = False
        return body

    def _library_scope(self) -> tf.Graph:
        if self._scope is None:
            library_only = graph_pb2.GraphDef(versions=self.main.versions)
            library_only.library.CopyFrom(self.main.library)
            self._scope = tf.Graph()
            with self._scope.as_default():
                importer.import_graph_def(library_only, name="")
        return self._scope

    # ------------------------------------------------------------------ resources

    def resource_uses(self, ir: IR, tensor: Tensor) -> list[Use]:
        """Every non-forwarding op that receives the resource `tensor`, in any body."""
        uses: list[Use] = []
        pending = [(ir, tensor)]
        seen = set()
        while pending:
            g, t = pending.pop()
            if (id(g), t) in seen:
                continue
            seen.add((id(g), t))
            for node, index in g.consumers(t):
                op = g.op(node)
                if op == "Identity":
                    pending.append((g, (node, 0)))
                elif op == "IdentityN":
                    pending.append((g, (node, index)))
                elif op == RETVAL:
                    k = g.graph.nodes[node]["index"]
                    pending.extend((caller, (call, k)) for caller, call, _ in self.call_sites[g.name]
                                   if caller.op(call) not in opkinds.LOOPS)
                elif (callees := self.callees(g, node)):
                    for c in callees:
                        if index >= c.offset:
                            body = self.bodies[c.name]
                            pending.append((body, (body.args[index - c.offset], 0)))
                    if op in opkinds.LOOPS:  # the loop hands the same handle back out
                        pending.append((g, (node, index)))
                else:
                    uses.append(Use(g, node, index))
        return uses

    def resource_owners(self, ir: IR, tensor: Tensor, _seen: set | None = None) -> frozenset[str]:
        """The traced function's placeholders a resource tensor may stand for."""
        seen = _seen if _seen is not None else set()
        if (id(ir), tensor) in seen:
            return frozenset()
        seen.add((id(ir), tensor))
        node, out = tensor
        op = ir.op(node)
        if op == "Identity":
            return self.resource_owners(ir, ir.inputs(node)[0], seen)
        if op == "IdentityN":
            return self.resource_owners(ir, ir.inputs(node)[out], seen)
        if op == "Placeholder":
            if ir is self.main:
                return frozenset([node])
            i = ir.args.index(node)
            found: set[str] = set()
            for caller, call, callee in self.call_sites[ir.name]:
                inputs = caller.inputs(call)
                if i + callee.offset < len(inputs):
                    found |= self.resource_owners(caller, inputs[i + callee.offset], seen)
            return frozenset(found)
        if op in opkinds.LOOPS:
            return self.resource_owners(ir, ir.inputs(node)[out], seen)
        found = set()
        for c in self.callees(ir, node):
            body = self.bodies[c.name]
            ret = body.rets[out] if out < len(body.rets) else None
            if ret is not None:
                found |= self.resource_owners(body, body.inputs(ret)[0], seen)
        return frozenset(found)

    def refresh_read_only_inputs(self) -> None:
        """Keep `_read_only_resource_inputs` on call ops true after bodies changed."""
        for ir in self.graphs():
            for node in self.call_nodes(ir):
                nd = ir.nodedef(node)
                if "_read_only_resource_inputs" not in nd.attr:
                    continue
                read_only = []
                for index, t in enumerate(ir.inputs(node)):
                    if ir.is_resource(t) and not self._writes_through(ir, node, index):
                        read_only.append(index)
                if list(nd.attr["_read_only_resource_inputs"].list.i) != read_only:
                    with ir.edit(node) as new:
                        del new.attr["_read_only_resource_inputs"].list.i[:]
                        new.attr["_read_only_resource_inputs"].list.i.extend(read_only)

    def _writes_through(self, ir: IR, node: str, index: int) -> bool:
        for c in self.callees(ir, node):
            if index < c.offset:
                continue
            body = self.bodies[c.name]
            for use in self.resource_uses(body, (body.args[index - c.offset], 0)):
                if use.ir.op(use.node) not in opkinds.RESOURCE_READS:
                    return True
        return False

    # ------------------------------------------------------------------ emission

    def to_graph_def(self) -> tuple[Any, dict[str, str]]:
        """The main GraphDef with a library in which changed bodies have fresh names, and
        the renaming. Call once: call ops are retargeted in place."""
        renamed = self._renames()
        for ir in self.graphs():
            for node in self.call_nodes(ir):
                self._retarget(ir, node, renamed)
        library = function_pb2.FunctionDefLibrary()
        library.CopyFrom(self.main.library)
        for old, new in renamed.items():
            with stage(f"function body {old!r}"):
                library.function.append(self._to_function_def(self.bodies[old], new))
        return self.main.to_graph_def(library=library), renamed

    def _renames(self) -> dict[str, str]:
        changed = {name for name, body in self.bodies.items() if body.changed}
        grew = True
        while grew:  # a body that calls a renamed body changes too
            grew = False
            for name, body in self.bodies.items():
                if name not in changed and any(c.name in changed for n in self.call_nodes(body)
                                               for c in self.callees(body, n)):
                    changed.add(name)
                    grew = True
        return {name: f"{name}_graphfreeze_{next(_FRESH)}" for name in sorted(changed)}

    def _retarget(self, ir: IR, node: str, renamed: dict[str, str]) -> None:
        callees = self.callees(ir, node)
        if not any(c.name in renamed for c in callees):
            return
        with ir.edit(node) as nd:
            for c in callees:
                if c.name not in renamed:
                    continue
                if not c.attr:
                    nd.op = renamed[c.name]
                elif c.position is None:
                    nd.attr[c.attr].func.name = renamed[c.name]
                else:
                    nd.attr[c.attr].list.func[c.position].name = renamed[c.name]

    def _to_function_def(self, body: IR, name: str) -> Any:
        fdef = function_pb2.FunctionDef()
        fdef.CopyFrom(body.fdef)
        fdef.signature.name = name
        del fdef.node_def[:]
        fdef.ret.clear()
        fdef.control_ret.clear()
        arg_names = {p: a.name for p, a in zip(body.args, fdef.signature.input_arg)}

        def ref(tensor: Tensor) -> str:
            src, out = tensor
            if src in arg_names:
                return arg_names[src]
            return f"{src}:{opkinds.output_arg_names(body.nodedef(src), self.signatures)[out]}"

        for node in body.topological_order():
            op = body.op(node)
            if node in arg_names or op == RETVAL:
                continue
            nd = fdef.node_def.add()
            nd.CopyFrom(body.nodedef(node))
            del nd.input[:]
            nd.input.extend(ref(t) for t in body.inputs(node))
            nd.input.extend(sorted(f"^{s}" for s in body.control_inputs(node)
                                   if s not in arg_names))
            if "_class" in nd.attr:
                drop_missing_colocations(nd, body.graph)
        outputs = fdef.signature.output_arg
        for k, ret in enumerate(body.rets):
            fdef.ret[outputs[k].name] = ref(body.inputs(ret)[0])
        kept = [c for c in body.fdef.signature.control_output
                if body.fdef.control_ret[c] in body.graph]
        del fdef.signature.control_output[:]
        fdef.signature.control_output.extend(kept)
        for c in kept:
            fdef.control_ret[c] = body.fdef.control_ret[c]
        return fdef

