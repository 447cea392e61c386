"""The plan: what the rules resolved to for one trace, plus what the passes did.

Passes read the plan and record their effects in `notes` so that reports can say, for
example, which optimizer slots were pruned and on whose behalf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .capture import Capture, Marker
from .rules import VariableFreeze
from .variables import VariableInfo


@dataclass
class Notes:
    """Effects recorded by the passes."""

    inserted: list[str] = field(default_factory=list)           # nodes created by passes
    removed_writes: list[str] = field(default_factory=list)     # write nodes deleted
    guarded_writes: list[str] = field(default_factory=list)     # write nodes masked
    pruned_state: dict[str, list[str]] = field(default_factory=dict)  # slot path -> owners
    dead_nodes: int = 0


@dataclass
class Plan:
    capture: Capture
    freezes: list[VariableFreeze]
    dependence: Any = None                  # passes.dependence.Dependence of the trace
    gradient_owner: dict[int, VariableInfo] = field(default_factory=dict)  # index -> variable
    batchnorm_inference: bool = False       # run fully frozen BatchNorm in inference mode
    notes: Notes = field(default_factory=Notes)

    def __post_init__(self) -> None:
        self._by_placeholder = {vf.variable.placeholder: vf for vf in self.freezes}
        self._sites: list | None = None

    @property
    def training(self) -> bool:
        return self.capture.training

    def freeze_of(self, placeholder: str) -> VariableFreeze | None:
        return self._by_placeholder.get(placeholder)

    def marker_sites(self, program: Any) -> list[tuple[Any, Marker, VariableInfo]]:
        """(graph, marker, variable) for every gradient marker, in the step or in a body."""
        if self._sites is None:
            by_var = {id(v.variable): v for v in self.capture.variables}
            sites = []
            for m in self.capture.markers:
                var = by_var.get(id(m.variable))
                graphs = [program.main] if m.functions is None else \
                    [program.bodies[n] for n in sorted(m.functions) if n in program.bodies]
                sites.extend((g, m, var) for g in graphs if var is not None and m.values in g)
            self._sites = sites
        return self._sites
