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
    gradient_owner: dict[int, VariableInfo | None] = field(default_factory=dict)  # bit -> var
    notes: Notes = field(default_factory=Notes)

    def __post_init__(self) -> None:
        self._by_placeholder = {vf.variable.placeholder: vf for vf in self.freezes}

    @property
    def training(self) -> bool:
        return self.capture.training

    def freeze_of(self, placeholder: str) -> VariableFreeze | None:
        return self._by_placeholder.get(placeholder)

    def markers(self) -> list[tuple[Marker, VariableInfo]]:
        by_var = {id(v.variable): v for v in self.capture.variables}
        return [(m, by_var[id(m.variable)]) for m in self.capture.markers if id(m.variable) in by_var]
