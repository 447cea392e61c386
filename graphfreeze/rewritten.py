"""The `Rewritten` object: a runnable rewritten step plus everything needed to inspect it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import networkx as nx
import tensorflow as tf

from .bodies import Body, BodyChange, compare_all, program_bodies, traced_shapes
from .capture import Capture
from .diff import Diff, diff_program
from .emit import Emitted
from .errors import FreezeError
from .ir import IR
from .passes.strip_markers import remove_markers
from .plan import Plan, marker_sites
from .program import Program
from .render import Picture, graphviz_svg, picture, render_dot, to_dot, to_html
from .report import Report, build_report, detail_names


class Rewritten:
    """A training step (or forward function) rewritten by graphfreeze.

    Call it like the original function. It reads and writes the same variable objects.

    >>> rw = gf.rewrite(train_step, ["hidden1/*"], x, y)     # doctest: +SKIP
    >>> loss = rw(x, y)                                      # doctest: +SKIP
    >>> print(rw.report())                                   # doctest: +SKIP

    Inspection covers the whole program the rewrite edited: the step and every function
    body it calls (`StatefulPartitionedCall`, `If`/`While` branches; in `model.fit`, Keras's
    `one_step_on_data` and the `strategy.run` body). `graph` / `original_graph` are the
    step's own top-level graph; `bodies` / `original_bodies` are the bodies' graphs by name.
    """

    def __init__(self, capture: Capture, plan: Plan, rewritten: Program, emitted: Emitted):
        self._capture = capture
        self.plan = plan
        self.program = rewritten  # the rewritten Program (`program.main`, `program.bodies`)
        self._ir = rewritten.main
        self._emitted = emitted
        self._original_program: Program | None = None
        self._bodies: list[Body] | None = None
        self._changes: list[BodyChange] | None = None

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
        """The rewritten step's top-level graph (networkx; see `graphfreeze.ir` for the
        encoding). The bodies it calls are in `bodies`."""
        return self._ir.graph

    @property
    def original_graph(self) -> nx.MultiDiGraph:
        """The traced step's top-level graph before any pass, without graphfreeze's gradient
        markers. The bodies it calls are in `original_bodies`."""
        return self.original_program.main.graph

    @property
    def bodies(self) -> dict[str, nx.MultiDiGraph]:
        """Every function body the rewritten step calls, directly or not, by the name it was
        traced under (`diff().functions` gives the name a rewritten body runs under).

        In a body's graph, the arguments are Placeholder nodes (`program.bodies[name].args`
        in order) and output k is a synthetic `_Retval` node with attribute `index` k.

        >>> rw = gf.keras.rewritten(model)                             # doctest: +SKIP
        >>> {name: g.number_of_nodes() for name, g in rw.bodies.items()}  # doctest: +SKIP
        {'__inference_one_step_on_data_1112': 167}
        """
        return {b.name: b.rewritten.graph for b in self._program_bodies()
                if not b.is_step and b.rewritten is not None}

    @property
    def original_bodies(self) -> dict[str, nx.MultiDiGraph]:
        """Every function body the traced step called, before any pass (markers removed),
        by name; same encoding as `bodies`."""
        return {b.name: b.original.graph for b in self._program_bodies()
                if not b.is_step and b.original is not None}

    @property
    def original_program(self) -> Program:
        """The traced program before any pass (gradient markers removed): `.main` the step,
        `.bodies` every function body it calls. Loaded on first use, then kept."""
        if self._original_program is None:
            main = IR.from_graph_def(self._capture.graph_def, self._capture.meta)
            # The library as completed at rewrite time with functions TensorFlow registered
            # outside the step (where a later call may no longer find them); bodies the
            # passes changed were emitted under new names, so it still holds the traced ones.
            main.library.CopyFrom(self.program.main.library)
            traced = Program(main)
            for graph, marker, _ in marker_sites(self._capture, traced):  # as strip_markers does
                remove_markers(graph, [marker.values, marker.indices])
            self._original_program = traced
        return self._original_program

    def _program_bodies(self) -> list[Body]:
        if self._bodies is None:
            frozen = {vf.variable.placeholder for vf in self.plan.freezes}
            self._bodies = program_bodies(self.original_program, self.program, self._emitted.renamed,
                                          frozen, self._capture.function_name,
                                          traced_shapes(self._capture.concrete_function))
        return self._bodies

    def _program_changes(self) -> list[BodyChange]:
        if self._changes is None:
            known = set(self.original_program.fdefs) | set(self._emitted.renamed.values())
            self._changes = compare_all(self._program_bodies(), known)
        return self._changes

    @property
    def ir(self) -> IR:
        """The rewritten step's top level as graphfreeze's IR (`program.main`)."""
        return self._ir

    @property
    def graph_def(self) -> Any:
        """The rewritten GraphDef, with changed library functions under fresh names."""
        return self._emitted.graph_def

    def report(self, detail: str | Sequence[str] = "summary") -> Report:
        """Per frozen variable: shape, frozen/total entries, rules, pruned optimizer state;
        totals over the step and every body it calls: parameters frozen, ops before and
        after, op types removed and added, estimated FLOPs per step removed and added.

        `detail` adds sections to `str(report)`: "bodies" a row per function (the step and
        each body it calls). The numbers are on the report whatever `detail` says.

        >>> print(rw.report(detail="bodies"))     # doctest: +SKIP
        """
        return build_report(self.plan, self._program_changes(), detail_names(detail))

    def diff(self) -> Diff:
        """Ops and estimated FLOPs added and removed by type, over the step and every body
        it calls (`diff().bodies` per function), and the nodes the passes inserted."""
        return diff_program(self._program_changes(), self._emitted.renamed)

    def picture(self, budget: int = 40) -> Picture:
        """The whole program grouped into about `budget` boxes (see `graphfreeze.render`)."""
        return picture(self._program_bodies(), budget)

    def to_dot(self, *, max_nodes: int = 40) -> str:
        """DOT text of the rewritten program: frozen variables blue, inserted ops orange,
        removed regions grey and dashed; each function body a subgraph cluster inside its
        caller's; collapsed by name scope beyond `max_nodes` boxes."""
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
        """Write the rewritten program (and optionally the traced one) for TensorBoard's graph
        dashboard, as runs `rewritten` and `original` under `logdir`. Each function body is
        inlined under a name scope named after it (nested as the calls nest), fed from the
        op that calls it, so the dashboard shows it as a group to expand.

        >>> rw.to_tensorboard("logs", include_original=True)   # doctest: +SKIP
        """
        import os

        from .tensorboard import program_graph_def, write_graph
        bodies = self._program_bodies()
        runs = [write_graph(program_graph_def(bodies, rewritten=True), os.path.join(logdir, "rewritten"))]
        if include_original:
            runs.append(write_graph(program_graph_def(bodies, rewritten=False),
                                    os.path.join(logdir, "original")))
        return runs

    def __repr__(self) -> str:
        return (f"<Rewritten {self._capture.function_name} ({'training' if self.training else 'forward'}"
                f" mode): {len(self.plan.freezes)} variables frozen, "
                f"{self._ops(original=True):,} -> {self._ops(original=False):,} ops>")

    def _ops(self, original: bool) -> int:
        """Ops over the step and its bodies (as in the report, without estimating FLOPs)."""
        return sum(len(b.ops(b.original_graph if original else b.rewritten_graph))
                   for b in self._program_bodies())
