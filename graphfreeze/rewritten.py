"""The `Rewritten` object: a runnable rewritten step plus everything needed to inspect it."""

from __future__ import annotations

from typing import Any

import networkx as nx

from .capture import Capture
from .emit import Emitted
from .errors import FreezeError
from .ir import IR
from .plan import Plan
from .program import Program
from .report import Report, build_report


class Rewritten:
    """A training step (or forward function) rewritten by graphfreeze.

    Call it like the original function. It reads and writes the same variable objects.

    >>> rw = gf.rewrite(train_step, ["hidden1/*"], x, y)     # doctest: +SKIP
    >>> loss = rw(x, y)                                      # doctest: +SKIP
    >>> print(rw.report())                                   # doctest: +SKIP
    """

    def __init__(self, capture: Capture, plan: Plan, rewritten: Program, emitted: Emitted):
        self._capture = capture
        self.plan = plan
        self.program = rewritten
        self._ir = rewritten.main
        self._emitted = emitted
        self._original_view: nx.MultiDiGraph | None = None

    # ------------------------------------------------------------------ running

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat, literals = self._capture.canonical_args(args, kwargs)
        if literals != self._capture.literal_args:
            raise FreezeError(
                f"{self._capture.function_name} was rewritten for Python arguments "
                f"{self._capture.literal_args} but called with {literals}; use the gf.freeze "
                "decorator, which rewrites once per input signature, or call gf.rewrite again.")
        return self._emitted.function(*flat)

    @property
    def concrete_function(self) -> Any:
        """The rewritten `ConcreteFunction` (flat tensor inputs, same captures)."""
        return self._emitted.concrete_function

    @property
    def function(self) -> Any:
        """The rewritten `tf.function` over the flat inputs."""
        return self._emitted.function

    @property
    def training(self) -> bool:
        """True for a training step, False for a forward function (DESIGN §2)."""
        return self.plan.training

    # ------------------------------------------------------------------ inspection

    @property
    def graph(self) -> nx.MultiDiGraph:
        """The rewritten graph (networkx; see `graphfreeze.ir` for the encoding)."""
        return self._ir.graph

    @property
    def original_graph(self) -> nx.MultiDiGraph:
        """The traced graph before any pass, without graphfreeze's gradient markers."""
        if self._original_view is None:
            from .passes.strip_markers import remove_markers
            traced = IR.from_graph_def(self._capture.graph_def, self._capture.meta)
            remove_markers(traced, [n for m in self._capture.markers if m.functions is None
                                    for n in (m.values, m.indices)])
            self._original_view = traced.graph
        return self._original_view

    @property
    def ir(self) -> IR:
        return self._ir

    @property
    def graph_def(self) -> Any:
        """The rewritten GraphDef, with changed library functions under fresh names."""
        return self._emitted.graph_def

    def report(self) -> Report:
        """What is frozen, by which rule, and how many ops the rewrite removed."""
        return build_report(self.plan, self.original_graph.number_of_nodes(),
                            self.graph.number_of_nodes())

    def to_dot(self, *, max_nodes: int = 400) -> str:
        """DOT text of the rewritten graph; removed nodes dashed, inserted ones orange."""
        from .render import to_dot
        frozen = {vf.variable.placeholder for vf in self.plan.freezes}
        return to_dot(self.graph, original=self.original_graph, frozen_placeholders=frozen,
                      max_nodes=max_nodes, title=self._capture.function_name)

    def __repr__(self) -> str:
        return (f"<Rewritten {self._capture.function_name} ({'training' if self.training else 'forward'}"
                f" mode): {len(self.plan.freezes)} variables frozen, "
                f"{self.original_graph.number_of_nodes()} -> {self.graph.number_of_nodes()} ops>")
