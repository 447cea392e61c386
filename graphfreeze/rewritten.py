"""The `Rewritten` object: a runnable rewritten step plus everything needed to inspect it."""

from __future__ import annotations

from typing import Any

import networkx as nx
import tensorflow as tf

from .capture import Capture
from .diff import Diff, diff_graphs
from .emit import Emitted
from .errors import FreezeError
from .ir import IR
from .passes.strip_markers import remove_markers
from .plan import Plan
from .program import Program
from .render import Picture, graphviz_svg, picture, render_dot, to_dot, to_html
from .report import Report, build_report, removed_flops


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
        self._check_strategy()
        flat, literals = self._capture.canonical_args(args, kwargs)
        if literals != self._capture.literal_args:
            raise FreezeError(
                f"{self._capture.function_name} was rewritten for Python arguments "
                f"{self._capture.literal_args} but called with {literals}; use the gf.freeze "
                "decorator, which rewrites once per input signature, or call gf.rewrite again.")
        return self._emitted.function(*flat)

    def _check_strategy(self) -> None:
        """A step rewritten for one tf.distribute strategy is tied to its devices and
        collectives; running it under another strategy cannot be right."""
        traced = self._capture.strategy
        if not tf.distribute.has_strategy():
            return
        current = tf.distribute.get_strategy()
        if traced is not None and current is not traced:
            raise FreezeError(
                f"{self._capture.function_name} was rewritten under {type(traced).__name__} "
                f"but is called under {type(current).__name__}; rewrite it (or let gf.freeze "
                "rewrite it) under the strategy that runs it.")

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
            self._original_view = self._traced_ir().graph
        return self._original_view

    def _traced_ir(self) -> IR:
        traced = IR.from_graph_def(self._capture.graph_def, self._capture.meta)
        remove_markers(traced, [n for m in self._capture.markers if m.functions is None
                                for n in (m.values, m.indices)])
        return traced

    @property
    def ir(self) -> IR:
        return self._ir

    @property
    def graph_def(self) -> Any:
        """The rewritten GraphDef, with changed library functions under fresh names."""
        return self._emitted.graph_def

    def report(self) -> Report:
        """Per frozen variable: shape, frozen/total entries, rules, pruned optimizer state;
        totals: parameters frozen, ops removed, estimated FLOPs removed per step."""
        original = self.original_graph
        return build_report(self.plan, original.number_of_nodes(), self.graph.number_of_nodes(),
                            removed_flops(original, self.graph))

    def diff(self) -> Diff:
        """Ops added and removed by type, and the nodes the passes inserted."""
        return diff_graphs(self.original_graph, self.graph, self._emitted.renamed)

    def picture(self, budget: int = 40) -> Picture:
        frozen = {vf.variable.placeholder for vf in self.plan.freezes}
        return picture(self.graph, self.original_graph, frozen, budget)

    def to_dot(self, *, max_nodes: int = 40) -> str:
        """DOT text of the rewritten graph: frozen variables blue, inserted ops orange,
        removed regions grey and dashed; collapsed by name scope beyond `max_nodes` boxes."""
        return to_dot(self.picture(max_nodes), self._capture.function_name)

    def render(self, path: str, *, max_nodes: int = 40) -> str:
        """Draw the picture to `path` (.svg, .png, .pdf) with Graphviz's `dot`.

        >>> rw.render("step.svg")     # doctest: +SKIP
        """
        return render_dot(self.to_dot(max_nodes=max_nodes), path)

    def to_html(self, path: str, *, max_nodes: int = 40) -> str:
        """Write one self-contained HTML file: the report, the diff and the picture (an
        inline SVG, drawn by Graphviz when it is installed and by graphfreeze otherwise; no
        network needed to view it)."""
        title = f"graphfreeze: {self._capture.function_name}"
        pic = self.picture(max_nodes)
        svg = graphviz_svg(to_dot(pic, self._capture.function_name))  # None without Graphviz
        with open(path, "w", encoding="utf-8") as f:
            f.write(to_html(self.report(), self.diff(), pic, title, svg))
        return path

    def to_tensorboard(self, logdir: str, *, include_original: bool = False) -> list[str]:
        """Write the rewritten graph (and optionally the traced one) for TensorBoard's graph
        dashboard, as runs `rewritten` and `original` under `logdir`."""
        import os

        from .tensorboard import write_graph
        runs = [write_graph(self._emitted.graph_def, os.path.join(logdir, "rewritten"))]
        if include_original:
            runs.append(write_graph(self._traced_ir().to_graph_def(), os.path.join(logdir, "original")))
        return runs

    def __repr__(self) -> str:
        return (f"<Rewritten {self._capture.function_name} ({'training' if self.training else 'forward'}"
                f" mode): {len(self.plan.freezes)} variables frozen, "
                f"{self.original_graph.number_of_nodes()} -> {self.graph.number_of_nodes()} ops>")
