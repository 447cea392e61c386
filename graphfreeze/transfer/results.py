"""What a transfer returns and raises: matched pairs, unmatched layers with their reason,
the match report, the rule list, and the type aliases the other modules share."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import keras
import numpy as np

from ..errors import FreezeError
from ..text import format_shape, text_table

SourceLike: TypeAlias = keras.Model | str | os.PathLike[str]
Architecture: TypeAlias = keras.Model | Callable[[], keras.Model]
GraphMode: TypeAlias = Literal["auto", "keras", "traced"]
Ref: TypeAlias = tuple[str, int]   # (producer node key, producer output index)


class TransferError(FreezeError):
    """A transfer cannot be done: unreadable or incompatible source, no common layer, a
    checkpoint missing variables. Raised before any target weight changes.

    >>> gf.transfer("model.weights.h5", new_model)                      # doctest: +SKIP
    Traceback (most recent call last):
    graphfreeze.transfer.TransferError: ... it holds weights but no dataflow graph ... Pass architecture= ...
    """


@dataclass(frozen=True)
class LayerPair:
    """One transferred layer: `source`'s weights go to `target` (same shapes, in order)."""

    source: Any
    target: Any
    weights: tuple[tuple[str, tuple[int, ...], str], ...]   # (name, shape, dtype)

    @property
    def parameters(self) -> int:
        return sum(int(np.prod(shape)) for _, shape, _ in self.weights)

    def describe_weights(self) -> str:
        return ", ".join(f"{n} {format_shape(s)}" for n, s, _ in self.weights)


@dataclass(frozen=True)
class Unmatched:
    """A target layer (or the weightless node where the match stopped) and why."""

    target: str
    kind: str
    reason: str
    weighted: bool
    layer: Any = None


@dataclass
class MatchReport:
    """What matched between two models, and why the rest did not.

    `pairs` are the layers with weights whose call sites all matched; `structure` lists every
    matched call site as ``(source, target, kind)``, weightless ones included; `unmatched`
    holds each target layer with weights left out, plus the weightless nodes where the match
    stopped, with the reason.

    >>> report = gf.transfer_report("pretrained.keras", new_model)      # doctest: +SKIP
    >>> print(report.summary())                                         # doctest: +SKIP
    >>> [(p.source.name, p.target.name) for p in report.pairs]          # doctest: +SKIP
    """

    source: str
    target: str
    method: str
    pairs: list[LayerPair]
    structure: list[tuple[str, str, str]]
    unmatched: list[Unmatched]
    target_sites: int

    @property
    def parameters(self) -> int:
        """Parameters in the matched target layers."""
        return sum(p.parameters for p in self.pairs)

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def summary(self) -> str:
        """One sentence: how many layers with weights match, and how much structure."""
        weighted = len(self.pairs) + sum(u.weighted for u in self.unmatched)
        if not self.pairs:
            return (f"no common layer: none of the target's {weighted} layer(s) with weights "
                    f"matches the source ({self.method} graphs); see why below.")
        return (f"{len(self.pairs)} of {weighted} target layer(s) with weights match "
                f"({self.parameters:,} parameters); {len(self.structure)} of "
                f"{self.target_sites} target call sites are in the common structure.")

    def __str__(self) -> str:
        lines = [f"transfer: {self.source} -> target {self.target!r} ({self.method} graphs)",
                 self.summary()]
        if self.pairs:
            lines += ["", _table(("source", "target", "layer", "weights"), [
                (p.source.name, p.target.name, type(p.target).__name__, p.describe_weights())
                for p in self.pairs])]
        if self.unmatched:
            lines += ["", "not transferred:", _table(("target", "layer", "why"), [
                (u.target + ("" if u.weighted else " (no weights)"), u.kind, u.reason)
                for u in self.unmatched])]
        return "\n".join(lines)


class Transferred(list[Any]):
    """The rules `transfer` returns (target layers to freeze), plus what it did.

    A plain list for `gf.freeze(*rules)` / `gf.rewrite(fn, rules, ...)`; `.pairs` are the
    copied layers, `.report` the full `MatchReport`, `.source_model` the model the weights
    came from (loaded from the file when the source was a path). ``str()`` shows the table.

    >>> rules = gf.transfer("pretrained.keras", new_model)              # doctest: +SKIP
    >>> print(rules)                         # the match table          # doctest: +SKIP
    >>> train_step = gf.freeze(*rules)(train_step)                      # doctest: +SKIP
    """

    def __init__(self, rules: Iterable[Any], report: MatchReport, source_model: keras.Model):
        super().__init__(rules)
        self.report = report
        self.pairs = list(report.pairs)
        self.source_model = source_model

    def __str__(self) -> str:
        return str(self.report)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    return "\n".join(text_table(header, rows))
