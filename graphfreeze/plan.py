"""The plan: what the rules resolved to for one trace, plus what the passes did.

Its inputs (the resolved rules, masks and scales, the located markers, the dependence
analysis) are fixed when the plan is made: the plan is a frozen dataclass holding tuples
and a read-only mapping. The one thing passes write is `notes`, a separate record of
their effects, so that reports can say, for example, which optimizer slots were pruned
and on whose behalf.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .capture import Capture, Marker
from .rules import VariableFreeze
from .scale import VariableScale
from .variables import VariableInfo


@dataclass
class Notes:
    """Effects recorded by the passes."""

    inserted: list[str] = field(default_factory=list)           # nodes created by passes
    removed_writes: list[str] = field(default_factory=list)     # write nodes deleted
    guarded_writes: list[str] = field(default_factory=list)     # write nodes masked
    scaled_writes: list[str] = field(default_factory=list)      # writes scaled (gf.Scale)
    pruned_state: dict[str, list[str]] = field(default_factory=dict)  # slot path -> owners
    dead_nodes: int = 0
    opaque_ops: list[str] = field(default_factory=list)  # allowed with allow_opaque=True
    sliced_writes: list[str] = field(default_factory=list)  # now scatter at trainable entries
    unsliced: list[str] = field(default_factory=list)  # "not sliced: <op> <node>"
    slicing: dict[str, str] = field(default_factory=dict)  # partly frozen path -> how sliced


MarkerSite = tuple[Any, Marker, VariableInfo]  # (the IR holding it, marker, its variable)


def marker_sites(capture: Capture, program: Any) -> list[MarkerSite]:
    """Every gradient marker with the graph it sits in (the step, or a body) and its variable."""
    by_var = {id(v.variable): v for v in capture.variables}
    sites: list[MarkerSite] = []
    for m in capture.markers:
        var = by_var.get(id(m.variable))
        graphs = [program.main] if m.functions is None else \
            [program.bodies[n] for n in sorted(m.functions) if n in program.bodies]
        sites.extend((g, m, var) for g in graphs if var is not None and m.values in g)
    return sites


@dataclass(frozen=True)
class Plan:
    """The passes' inputs for one trace (read-only) and `notes`, what the passes did."""

    capture: Capture
    freezes: Sequence[VariableFreeze]
    sites: Sequence[MarkerSite] = ()         # every gradient marker, located
    dependence: Any = None                  # analysis.dependence.Dependence of the trace
    gradient_owner: Mapping[int, VariableInfo] = field(default_factory=dict)  # index -> variable
    batchnorm_inference: bool = False       # run fully frozen BatchNorm in inference mode
    notes: Notes = field(default_factory=Notes)  # the one part passes write
    scales: Sequence[VariableScale] = ()     # gf.Scale factors
    _by_placeholder: dict[str, VariableFreeze] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Frozen: tuples and a read-only view, so a pass cannot edit another pass's inputs.
        object.__setattr__(self, "freezes", tuple(self.freezes))
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "scales", tuple(self.scales))
        object.__setattr__(self, "gradient_owner", MappingProxyType(dict(self.gradient_owner)))
        object.__setattr__(self, "_by_placeholder",
                           {vf.variable.placeholder: vf for vf in self.freezes})

    @property
    def training(self) -> bool:
        return self.capture.training

    def freeze_of(self, placeholder: str) -> VariableFreeze | None:
        return self._by_placeholder.get(placeholder)
