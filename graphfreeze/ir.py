"""The intermediate representation: a traced graph as a networkx MultiDiGraph.

Granularity is the tensor: a data edge ``u -> v`` carries ``src_output`` (which output of
``u``) and ``dst_input`` (which input of ``v``) and is keyed by ``dst_input``; a control
edge carries ``control=True`` and is keyed ``"ctrl"``. Node attributes:

  op        op type (str)
  nodedef   the NodeDef as traced (its ``input`` list is ignored; edges are the truth)
  order     an exact key ``(position, sequence)``: the i-th traced node is ``(i, 0)``; an
            inserted node takes the position of the latest of its inputs (or `after`) and
            the next insertion sequence of its graph, so it sits after its inputs and
            before the next traced node. Sorting by it is a topological order that
            preserves program order (auto control dependencies rely on that at emit)
  dtypes    DataType enum per output;  shapes: per output a tuple (None = unknown dim)
            or None (unknown rank)
  inserted  name of the pass that created the node, or absent

The function library rides along on ``ir.library``. Passes are plain functions that
mutate an IR through the small editing API below (``add_node``, ``replace_uses``,
``remove_nodes``), in the spirit of torch.fx's Graph.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any

import networkx as nx
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, node_def_pb2

from .opkinds import NO_ORDERING
from .protos import attr_value, drop_missing_colocations, parse_input, tensor_proto

Tensor = tuple[str, int]
Order = tuple[int, int]  # a node's program-order key; see the module docstring
CTRL = "ctrl"
RETVAL = "_Retval"  # synthetic node standing for a function body's output k
_DT_RESOURCE = tf.resource.as_datatype_enum


class LintError(RuntimeError):
    """An IR broke a structural invariant: a bug in graphfreeze (a pass), not in user input."""


class IR:
    """A function graph plus its library; see the module docstring for the encoding."""

    def __init__(self, graph: nx.MultiDiGraph, library: Any, versions: Any):
        self.graph = graph
        self.library = library
        self.versions = versions
        self._uid = itertools.count()
        # For library function bodies (None for the traced function itself):
        self.name: str | None = None         # the FunctionDef's name
        self.args: list[str] = []            # argument placeholders, in signature order
        self.fdef: Any = None                # the FunctionDef it was built from
        self.changed = False                 # set by every edit; changed bodies get new names
        self.edits = 0                       # counts every edit (a pass's PassResult.changed)
        self._sequence = itertools.count(1)  # insertion sequence, the second part of `order`
        self.const_cache: dict = {}          # constants the passes share (see passes/masks.py)

    @property
    def rets(self) -> list[str]:
        """Return nodes (op _Retval, attr index) of a function body, in output order."""
        nodes = self.graph.nodes
        found = [(nodes[n]["index"], n) for n, op in nodes(data="op") if op == RETVAL]
        return [n for _, n in sorted(found)]

    # ------------------------------------------------------------------ conversion

    @classmethod
    def from_graph_def(cls, graph_def: Any, meta: dict[str, tuple[list, list]] | None = None) -> IR:
        """Build from a GraphDef; `meta` maps node name -> (output dtypes, output shapes)."""
        meta = meta or {}
        g = nx.MultiDiGraph()
        nodes: list[tuple[str, dict[str, Any]]] = []
        edges: list[tuple[str, str, str | int, dict[str, Any]]] = []
        for i, nd in enumerate(graph_def.node):
            dtypes, shapes = meta.get(nd.name, ((), ()))
            nodes.append((nd.name, {"op": nd.op, "nodedef": nd, "order": (i, 0),
                                    "dtypes": list(dtypes), "shapes": list(shapes)}))
            k = 0
            for text in nd.input:
                src, out, control = parse_input(text)
                if control:
                    edges.append((src, nd.name, CTRL, {"control": True}))
                else:
                    edges.append((src, nd.name, k, {"src_output": out, "dst_input": k,
                                                    "control": False}))
                    k += 1
        g.add_nodes_from(nodes)
        g.add_edges_from(edges)
        lib = graph_pb2.GraphDef().library
        lib.CopyFrom(graph_def.library)
        return cls(g, lib, graph_def.versions)

    def to_graph_def(self, library: Any = None) -> Any:
        """A GraphDef in topological, program-preserving order."""
        out = graph_pb2.GraphDef()
        out.versions.CopyFrom(self.versions)
        out.library.CopyFrom(self.library if library is None else library)
        present = self.graph
        for name in self.topological_order():
            nd = out.node.add()
            nd.CopyFrom(present.nodes[name]["nodedef"])
            del nd.input[:]
            nd.input.extend(self._input_strings(name))
            if "_class" in nd.attr:
                drop_missing_colocations(nd, present)
        return out

    def _input_strings(self, name: str) -> list[str]:
        data, control = [], []
        for src, _, key, attrs in self.graph.in_edges(name, keys=True, data=True):
            if attrs["control"]:
                if self.graph.nodes[src]["op"] not in NO_ORDERING:
                    control.append("^" + src)
            else:
                out = attrs["src_output"]
                data.append((key, src if out == 0 else f"{src}:{out}"))
        data.sort()
        return [t for _, t in data] + sorted(control)

    def topological_order(self) -> list[str]:
        nodes = self.graph.nodes
        order = sorted(nodes, key=lambda n: nodes[n]["order"])
        pos = {n: i for i, n in enumerate(order)}
        if all(pos[u] < pos[v] for u, v in self.graph.edges()):
            return order
        return list(nx.lexicographical_topological_sort(self.graph, key=lambda n: nodes[n]["order"]))

    def copy(self) -> IR:
        # NodeDefs are never mutated in place (edits replace them), so sharing is safe.
        clone = IR(self.graph.copy(), self.library, self.versions)
        clone._uid = itertools.count(next(self._uid))
        clone._sequence = itertools.count(next(self._sequence))
        clone.name, clone.args, clone.fdef = self.name, list(self.args), self.fdef
        return clone

    # ------------------------------------------------------------------ queries

    def __contains__(self, name: str) -> bool:
        return name in self.graph

    def __len__(self) -> int:
        return self.graph.number_of_nodes()

    def op(self, name: str) -> str:
        return self.graph.nodes[name]["op"]

    def nodedef(self, name: str) -> Any:
        return self.graph.nodes[name]["nodedef"]

    def attr(self, name: str, key: str) -> Any:
        return self.graph.nodes[name]["nodedef"].attr[key]

    def const_value(self, tensor: Tensor) -> np.ndarray | None:
        """The value of a tensor a Const produces (axes, sizes); None for anything else."""
        if self.op(tensor[0]) != "Const":
            return None
        return tf.make_ndarray(self.attr(tensor[0], "value").tensor)

    def inputs(self, name: str) -> list[Tensor]:
        """Data inputs in input order."""
        items = [(attrs["dst_input"], (src, attrs["src_output"]))
                 for src, _, attrs in self.graph.in_edges(name, data=True) if not attrs["control"]]
        items.sort()
        return [t for _, t in items]

    def control_inputs(self, name: str) -> list[str]:
        return [src for src, _, attrs in self.graph.in_edges(name, data=True) if attrs["control"]]

    def consumers(self, tensor: Tensor) -> list[tuple[str, int]]:
        """(node, input index) for every data use of `tensor`."""
        src, out = tensor
        return [(dst, attrs["dst_input"]) for _, dst, attrs in self.graph.out_edges(src, data=True)
                if not attrs["control"] and attrs["src_output"] == out]

    def dtype(self, tensor: Tensor) -> tf.DType:
        return tf.as_dtype(self.graph.nodes[tensor[0]]["dtypes"][tensor[1]])

    def is_resource(self, tensor: Tensor) -> bool:
        dtypes = self.graph.nodes[tensor[0]]["dtypes"]
        return tensor[1] < len(dtypes) and dtypes[tensor[1]] == _DT_RESOURCE

    def shape(self, tensor: Tensor) -> tuple | None:
        shapes = self.graph.nodes[tensor[0]]["shapes"]
        return shapes[tensor[1]] if tensor[1] < len(shapes) else None

    def device(self, name: str) -> str:
        return self.graph.nodes[name]["nodedef"].device

    def lint(self) -> None:
        """Check the encoding (see the module docstring), as torch.fx's `Graph.lint()`:
        no dangling inputs (an edge from a node that is not in the graph), every NodeDef
        named as its node, data inputs numbered 0..k-1 once each and keyed by their index,
        no output index beyond what its producer has, no cycle. Raises `LintError`."""
        g = self.graph
        where = f" in function {self.name!r}" if self.name else ""
        for node, data in g.nodes(data=True):
            if "op" not in data:
                users = sorted(dst for _, dst in g.out_edges(node))
                raise LintError(f"dangling input{where}: {users[:3]} read {node!r}, which is "
                                "not in the graph")
            if data["nodedef"].name != node:
                raise LintError(f"node {node!r}{where} carries the NodeDef of "
                                f"{data['nodedef'].name!r}")
            indices = []
            for src, _, key, attrs in g.in_edges(node, keys=True, data=True):
                if attrs["control"]:
                    continue
                if key != attrs["dst_input"]:
                    raise LintError(f"input {attrs['dst_input']} of {node!r}{where} is keyed {key!r}")
                indices.append(attrs["dst_input"])
                n_out = len(g.nodes[src].get("dtypes") or ())
                if n_out and attrs["src_output"] >= n_out:
                    raise LintError(f"{node!r}{where} reads output {attrs['src_output']} of "
                                    f"{src!r}, which has {n_out}")
            if sorted(indices) != list(range(len(indices))):
                raise LintError(f"data inputs of {node!r}{where} are numbered {sorted(indices)}")
        if not nx.is_directed_acyclic_graph(g):
            cycle = nx.find_cycle(g)
            raise LintError(f"cycle{where}: {[e[0] for e in cycle][:5]}")

    # ------------------------------------------------------------------ edits

    def _edited(self) -> None:
        self.changed = True
        self.edits += 1

    def add_node(self, name: str, op: str, inputs: Sequence[Tensor] = (), *,
                 attrs: dict[str, Any] | None = None, dtypes: Sequence[Any] = (),
                 shapes: Sequence[Any] = (), device: str = "", after: Order | None = None,
                 inserted_by: str = "", control_inputs: Sequence[str] = ()) -> str:
        """Insert a node; returns its (uniquified) name. `after` is an order lower bound."""
        self._edited()
        base, name = name, name
        while name in self.graph:
            name = f"{base}_{next(self._uid)}"
        nd = node_def_pb2.NodeDef(name=name, op=op, device=device)
        for key, value in (attrs or {}).items():
            nd.attr[key].CopyFrom(attr_value(value))
        lower = max([self.graph.nodes[s]["order"] for s, _ in inputs] +
                    [self.graph.nodes[s]["order"] for s in control_inputs] +
                    ([after] if after is not None else [(-1, 0)]))
        self.graph.add_node(name, op=op, nodedef=nd, order=self.order_after(lower),
                            dtypes=[tf.as_dtype(d).as_datatype_enum for d in dtypes],
                            shapes=[None if s is None else tuple(s) for s in shapes],
                            inserted=inserted_by)
        for k, (src, out) in enumerate(inputs):
            self.graph.add_edge(src, name, k, src_output=out, dst_input=k, control=False)
        for src in control_inputs:
            self.graph.add_edge(src, name, CTRL, control=True)
        return name

    def order_after(self, lower: Order) -> Order:
        """A fresh order key after `lower` and every key this graph handed out so far at
        `lower`'s position, before the next traced node."""
        return (lower[0], next(self._sequence))

    def add_const(self, name: str, value: np.ndarray, dtype: tf.DType, *, device: str = "",
                  after: Order | None = None, inserted_by: str = "") -> Tensor:
        proto = tensor_proto(np.asarray(value), dtype)
        node = self.add_node(name, "Const", attrs={"value": proto, "dtype": dtype},
                             dtypes=[dtype], shapes=[np.shape(value)], device=device,
                             after=after, inserted_by=inserted_by)
        return (node, 0)

    def set_input(self, node: str, index: int, tensor: Tensor) -> None:
        self._edited()
        self.graph.remove_edge(*self._data_edge(node, index))
        self.graph.add_edge(tensor[0], node, index, src_output=tensor[1], dst_input=index,
                            control=False)

    def replace_uses(self, old: Tensor, new: Tensor, *, exclude: Iterable[str] = ()) -> None:
        """Make every data use of `old` (except by nodes in `exclude`) read `new` instead."""
        skip = set(exclude)
        for dst, index in self.consumers(old):
            if dst not in skip:
                self.set_input(dst, index, new)

    def add_control_edge(self, src: str, dst: str) -> None:
        if not self.graph.has_edge(src, dst, CTRL):
            self._edited()
            self.graph.add_edge(src, dst, CTRL, control=True)

    def remove_nodes(self, names: Iterable[str]) -> None:
        """Delete nodes, keeping the ordering their control edges imposed on survivors.

        A survivor that had to wait for a removed node now waits for the removed node's
        nearest surviving ancestors instead (placeholders and constants excepted).
        """
        doomed = set(names)
        if not doomed:
            return
        self._edited()
        g = self.graph
        memo: dict[str, frozenset[str]] = {}

        def frontier(n: str) -> frozenset[str]:
            if n in memo:
                return memo[n]
            memo[n] = frozenset()  # cycle guard; graphs are acyclic
            found: set[str] = set()
            stack, seen = [n], {n}
            while stack:
                cur = stack.pop()
                for src in g.predecessors(cur):
                    if src in seen:
                        continue
                    seen.add(src)
                    if src in doomed:
                        stack.append(src)
                    elif g.nodes[src]["op"] not in NO_ORDERING:
                        found.add(src)
            memo[n] = frozenset(found)
            return memo[n]

        rewires: list[tuple[str, str]] = []
        for n in doomed:
            for _, dst, attrs in g.out_edges(n, data=True):
                if attrs["control"] and dst not in doomed:
                    rewires.extend((src, dst) for src in frontier(n) if src != dst)
        g.remove_nodes_from(doomed)
        for src, dst in rewires:
            self.add_control_edge(src, dst)

    def shrink_identity_n(self, node: str, keep: Collection[int]) -> None:
        """Keep only outputs `keep` (and their matching inputs) of an IdentityN node."""
        kept = set(keep)
        n = len(self.nodedef(node).attr["T"].list.type)  # inputs of dead outputs may be gone
        self.drop_inputs(node, [k for k in range(n) if k not in kept], list_attr="T")
        self.keep_outputs(node, keep)

    def keep_outputs(self, node: str, keep: Iterable[int]) -> None:
        """Renumber a node's outputs to `keep` (in order); dropped outputs must be unused."""
        keep = sorted(keep)
        new_index = {old: new for new, old in enumerate(keep)}
        data = self.graph.nodes[node]
        self._edited()
        data["dtypes"] = [data["dtypes"][k] for k in keep]
        data["shapes"] = [data["shapes"][k] for k in keep if k < len(data["shapes"])]
        for _, dst, attrs in self.graph.out_edges(node, data=True):
            if attrs["control"]:
                continue
            if attrs["src_output"] not in new_index:
                raise ValueError(f"{node}:{attrs['src_output']} is still used by {dst}")
            attrs["src_output"] = new_index[attrs["src_output"]]

    def set_shape(self, tensor: Tensor, shape: tuple | None) -> None:
        self.graph.nodes[tensor[0]]["shapes"][tensor[1]] = shape

    def set_nodedef(self, node: str, nodedef: Any) -> None:
        """Replace a node's NodeDef (never mutate the traced one: it is shared)."""
        self._edited()
        self.graph.nodes[node]["nodedef"] = nodedef
        self.graph.nodes[node]["modified"] = True

    @contextlib.contextmanager
    def edit(self, node: str) -> Iterator[Any]:
        """A private copy of a node's NodeDef to change; it replaces the node's on exit.

            with ir.edit(split) as nd:
                nd.attr["num_split"].i = 3
        """
        nd = node_def_pb2.NodeDef()
        nd.CopyFrom(self.nodedef(node))
        yield nd
        self.set_nodedef(node, nd)

    def drop_inputs(self, node: str, indices: Iterable[int], *, list_attr: str | None = None,
                    offset: int = 0) -> None:
        """Drop data inputs of a variadic op and keep its NodeDef true: the length attr `N`
        (when the op has one) shrinks by as many, and so does the type-list attr
        `list_attr`, whose entry k types input `offset + k` (e.g. a call op's "Tin")."""
        drop = set(indices)
        with self.edit(node) as nd:
            if "N" in nd.attr:
                nd.attr["N"].i -= len(drop)
            if list_attr is not None:
                types = list(nd.attr[list_attr].list.type)
                del nd.attr[list_attr].list.type[:]
                nd.attr[list_attr].list.type.extend(
                    t for k, t in enumerate(types) if offset + k not in drop)
        self.remove_inputs(node, drop)

    def remove_inputs(self, node: str, indices: Iterable[int]) -> None:
        """Drop some data inputs of `node`, renumbering the rest (attrs are the caller's job)."""
        drop = set(indices)
        self._edited()
        g = self.graph
        ins = [(src, key, attrs) for src, _, key, attrs in g.in_edges(node, keys=True, data=True)
               if not attrs["control"]]
        kept = sorted(attrs["dst_input"] for _, _, attrs in ins if attrs["dst_input"] not in drop)
        new_index = {old: new for new, old in enumerate(kept)}
        for src, key, _ in ins:
            g.remove_edge(src, node, key)
        for src, _, attrs in ins:
            k = attrs["dst_input"]
            if k in new_index:
                g.add_edge(src, node, new_index[k], src_output=attrs["src_output"],
                           dst_input=new_index[k], control=False)

    def _data_edge(self, node: str, index: int) -> tuple[str, str, int]:
        for src, _, key, attrs in self.graph.in_edges(node, keys=True, data=True):
            if not attrs["control"] and attrs["dst_input"] == index:
                return (src, node, key)
        raise KeyError(f"{node} has no input {index}")
