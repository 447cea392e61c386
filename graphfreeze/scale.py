"""Learning-rate multipliers: `Scale(target, factor)` multiplies the update written to the
matched entries by `factor` (0 freezes them, like `Freeze`).

Freezing is the factor 0 of a multiplier, so a `Scale` rule takes part in the ordinary
resolution (rules apply in order, entry by entry; graphfreeze/rules.py): a factor of 0
freezes its entries, any other factor makes them trainable again, like `Unfreeze`. On top
of that, `resolve_scales` gives each trainable variable whose trainable entries do not all
keep the factor 1 its array of factors; the `scale_writes` pass turns every write
`v <- new` into `v <- old + factor * (new - old)` (an `AssignAdd`/`AssignSub` delta, a
scatter's rows, multiplied by the factor), before the write guards select frozen entries.

Only trainable variables are scaled: the updates an optimizer writes. Non-trainable state
a `Scale` rule matches (BatchNorm moving statistics) keeps its ordinary updates, so that a
`layer_decay` over a whole model matches the per-layer-optimizer reference; the factor 0
still freezes it, as `Freeze` does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np

from .errors import RuleError
from .rules import Freeze, Rule, RuleLike, Unfreeze, VariableFreeze, as_rule, compress
from .targets import Target, match_target
from .variables import VariableInfo

__all__ = ["Scale", "VariableScale", "resolve_scales", "check_factor"]


def check_factor(factor: Any, where: str) -> float:
    """`factor` as a float if it is a finite number >= 0; RuleError naming `where` otherwise."""
    if isinstance(factor, (bool, np.bool_)) or not isinstance(factor, (Real, np.integer, np.floating)):
        raise RuleError(f"{where}: the factor must be a number (a float >= 0), got "
                        f"{type(factor).__name__} {factor!r}.")
    value = float(factor)
    if not math.isfinite(value) or value < 0:
        raise RuleError(f"{where}: the factor must be a finite number >= 0 (0 freezes, 1 trains "
                        f"as usual, above 1 trains faster), got {value!r}.")
    return value


class Scale(Rule):
    """Multiply the update written to the target's entries by `factor` (a learning-rate
    multiplier). `factor` is a float >= 0: 0 freezes, 1 is the ordinary update, above 1 is
    allowed. `target` is anything a rule takes, or a Rows/Columns/Mask rule.

    >>> import graphfreeze as gf
    >>> gf.Scale("backbone/*", 0.1)
    Scale('backbone/*', 0.1)
    >>> gf.Scale(gf.Rows("emb/embeddings", [0, 3]), 0.5)
    Scale(Rows('emb/embeddings', [0, 3]), 0.5)
    """

    def __init__(self, target: Target | Rule, factor: float):
        if isinstance(target, (Unfreeze, Scale)):
            raise RuleError(f"Scale({target.describe()}, ...): give the entries to scale (a "
                            "target, or a Rows/Columns/Mask rule), not another Scale or Unfreeze.")
        self.inner = target if isinstance(target, Rule) else Freeze(target)
        self.target = self.inner.target
        self.factor = check_factor(factor, f"Scale({self.inner.describe()}, {factor!r})")
        self.freezes = self.factor == 0  # resolve(): 0 freezes, any other factor unfreezes

    def entries(self, var: VariableInfo) -> np.ndarray:
        return self.inner.entries(var)

    def describe(self) -> str:
        return f"Scale({self.inner.describe()}, {self.factor:g})"


@dataclass(eq=False)
class VariableScale:
    """The factors of one trainable variable: `factor[i]` multiplies the update written to
    entry i (0 where frozen). `rules` describes the rules that touched it, in order."""

    variable: VariableInfo
    factor: np.ndarray
    frozen: np.ndarray | None = None
    rules: list[str] = field(default_factory=list)

    @functools.cached_property
    def live(self) -> np.ndarray:
        """The factors of the entries that train (not frozen)."""
        return self.factor.ravel() if self.frozen is None else self.factor[~self.frozen]

    @functools.cached_property
    def uniform(self) -> float | None:
        """The one factor of every trainable entry, or None when they differ."""
        live = self.live
        return float(live[0]) if live.size and (live == live[0]).all() else None

    @functools.cached_property
    def compact(self) -> np.ndarray:
        """The factors as the graph stores them: a 0-d array when uniform over the trainable
        entries (frozen ones are selected by the write guards anyway), else every constant
        axis collapsed (see `rules.compress`)."""
        if self.uniform is not None:
            return np.asarray(self.uniform)
        full = self.factor.copy()
        if self.frozen is not None:
            full[self.frozen] = 1.0  # selected away; 1 keeps the array as compressible as can be
        return compress(full)

    def describe(self) -> str:
        """The factor for reports: '0.1', or 'min..max' when the entries differ."""
        if self.uniform is not None:
            return f"{self.uniform:g}"
        return f"{self.live.min():g}..{self.live.max():g}"


def resolve_scales(rules: Sequence[RuleLike], variables: Sequence[VariableInfo],
                   freezes: Sequence[VariableFreeze] = ()) -> list[VariableScale]:
    """The trainable variables whose trainable entries do not all keep the factor 1.

    Rules apply in order, entry by entry: a `Scale` sets its factor, any other rule resets
    the entries it selects to 1 (a `Freeze` freezes them through `freezes`, which are the
    resolved freeze masks of the same rules).
    """
    rule_list = [as_rule(r) for r in rules]
    scaled: dict[int, VariableInfo] = {}
    for rule in rule_list:
        if isinstance(rule, Scale) and rule.factor != 0:
            scaled.update((id(v), v) for v in match_target(rule.target, variables, rule)
                          if v.trainable)
    if not scaled:
        return []
    factors: dict[int, tuple[VariableInfo, np.ndarray, list[str]]] = {}
    for rule in rule_list:
        for var in match_target(rule.target, variables, rule):
            if id(var) not in scaled:
                continue
            _, factor, described = factors.setdefault(
                id(var), (var, np.ones(var.shape, dtype=np.float64), []))
            factor[rule.entries(var)] = rule.factor if isinstance(rule, Scale) else 1.0
            described.append(rule.describe())
    frozen = {id(vf.variable): vf.frozen for vf in freezes}
    out = []
    for var, factor, described in factors.values():
        mask = frozen.get(id(var))
        if mask is not None:
            factor[mask] = 0.0
        vs = VariableScale(var, factor, mask, described)
        if vs.live.size and (vs.live != 1).any():
            out.append(vs)
    return out
