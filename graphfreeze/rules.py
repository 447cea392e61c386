"""Freeze rules and their resolution to one frozen-entry mask per variable.

Rules apply in order, entry by entry: a later rule overrides an earlier one where they
overlap, so ``["encoder/*", Unfreeze(Rows("encoder/embeddings", new_ids))]`` freezes the
encoder except the new embedding rows.

Index conventions (documented in the README; checked against each matched variable, so
errors name the variable, its shape and the offending value):
  * explicit indices must be non-negative and distinct; negative indices are refused
    because a rule written against one shape must not silently move to another row when a
    layer grows (seed 000), and duplicates usually mean the index list was built wrongly;
  * slices follow Python semantics against the axis length;
  * a 1-D boolean array selects along the axis and must have the axis length.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from .errors import RuleError
from .targets import Target, check_target, describe_target, match_target
from .variables import VariableInfo

__all__ = ["Rule", "Freeze", "Rows", "Columns", "Mask", "Unfreeze", "as_rule", "resolve",
           "VariableFreeze", "RuleLike"]

RuleLike = Union["Rule", str, Any]


# --------------------------------------------------------------------------- indices


def _where(rule: Rule, var: VariableInfo) -> str:
    return f"rule {rule.describe()} on {var.path!r} (shape {list(var.shape)})"


def _axis_selection(indices: Any, length: int, rule: Rule, var: VariableInfo, axis: int) -> np.ndarray:
    """A boolean vector of `length` from a slice, a range, a list or an array of indices."""
    where = f"{_where(rule, var)}, axis {axis} of length {length}"
    if isinstance(indices, slice):
        sel = np.zeros(length, dtype=bool)
        sel[indices] = True
        return sel
    arr = np.asarray(list(indices) if isinstance(indices, range) else indices)
    if arr.dtype == bool:
        if arr.shape != (length,):
            raise RuleError(f"{where}: boolean selection has shape {list(arr.shape)}, expected "
                            f"[{length}].")
        return arr.copy()
    sel = np.zeros(length, dtype=bool)
    if arr.size == 0:
        return sel
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise RuleError(f"{where}: indices must be a 1-D collection of integers, got a "
                        f"{arr.dtype} array of shape {list(arr.shape)}.")
    if (arr < 0).any():
        raise RuleError(f"{where}: negative index {int(arr[arr < 0][0])}; graphfreeze refuses "
                        "negative indices (a rule must not move when a layer grows); a slice such "
                        "as slice(-k, None) says 'the last k'.")
    if (arr >= length).any():
        raise RuleError(f"{where}: index {int(arr[arr >= length][0])} is out of range; valid "
                        f"indices are 0..{length - 1}.")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise RuleError(f"{where}: duplicate index {int(uniq[counts > 1][0])}; pass each index "
                        "once (e.g. sorted(set(ids))).")
    sel[arr] = True
    return sel


def _check_indices_type(indices: Any, rule_name: str) -> Any:
    """Early type check; values are checked against each variable at resolution."""
    if isinstance(indices, (bool, np.bool_)):
        raise RuleError(f"{rule_name}: indices must be integers, a range, a slice or an array, "
                        f"got {indices!r}.")
    if isinstance(indices, (int, np.integer)):
        return [int(indices)]
    if isinstance(indices, (slice, range, np.ndarray)):
        return indices
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise RuleError(f"{rule_name}: indices must be an int, range, slice, list or numpy array, "
                        f"got {type(indices).__name__} {indices!r}.")
    items = list(indices)
    bad = [i for i in items if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
    if bad:
        raise RuleError(f"{rule_name}: index {bad[0]!r} is not an integer.")
    return items


def _summarize_indices(indices: Any) -> str:
    if isinstance(indices, slice):
        return f"{indices.start if indices.start is not None else ''}:" \
               f"{indices.stop if indices.stop is not None else ''}" + \
               (f":{indices.step}" if indices.step not in (None, 1) else "")
    if isinstance(indices, range):
        return f"range({indices.start}, {indices.stop}" + (
            f", {indices.step})" if indices.step != 1 else ")")
    arr = np.asarray(indices)
    if arr.dtype == bool:
        return f"{int(arr.sum())} of {arr.size}"
    items = [int(i) for i in arr.ravel()]
    return repr(items) if len(items) <= 6 else f"{len(items)} indices"


# --------------------------------------------------------------------------- rules


class Rule:
    """Base class of freeze rules. `entries(var)` selects entries; `freezes` says which way.

    A string, a variable or a layer passed where a rule is expected becomes a `Freeze`; the
    others are built explicitly and may be mixed freely, later rules overriding earlier ones:

    >>> rules = ["*", gf.Unfreeze(gf.Rows("embedding/embeddings", range(16)))]  # doctest: +SKIP
    >>> print(gf.plan(model, *rules))                                   # doctest: +SKIP
    """

    freezes: bool = True

    def __init__(self, target: Target):
        check_target(target, type(self).__name__)
        self.target = target

    def entries(self, var: VariableInfo) -> np.ndarray:
        """A boolean array of `var`'s shape: True where this rule applies."""
        raise NotImplementedError

    def describe(self) -> str:
        """The rule as written (also its `repr`), for reports and error messages."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.describe()


class Freeze(Rule):
    """Freeze every entry of the target's variables. Strings, variables and layers become this.

    >>> import graphfreeze as gf
    >>> gf.Freeze("hidden1/*")
    'hidden1/*'
    """

    def entries(self, var: VariableInfo) -> np.ndarray:
        return np.ones(var.shape, dtype=bool)

    def describe(self) -> str:
        return describe_target(self.target)


class _AxisRule(Rule):
    axis_name = ""

    def __init__(self, target: Target, indices: Any):
        super().__init__(target)
        self.indices = _check_indices_type(
            indices, f"{type(self).__name__}({describe_target(target)})")

    def _axis(self, var: VariableInfo) -> int:
        raise NotImplementedError

    def entries(self, var: VariableInfo) -> np.ndarray:
        if len(var.shape) == 0:
            raise RuleError(f"{_where(self, var)}: a scalar has no {self.axis_name}; freeze the "
                            "whole variable instead.")
        axis = self._axis(var)
        sel = _axis_selection(self.indices, var.shape[axis], self, var, axis)
        view_shape = [1] * len(var.shape)
        view_shape[axis] = var.shape[axis]
        return np.broadcast_to(sel.reshape(view_shape), var.shape).copy()

    def describe(self) -> str:
        return f"{type(self).__name__}({describe_target(self.target)}, " \
               f"{_summarize_indices(self.indices)})"


class Rows(_AxisRule):
    """Freeze rows (axis 0) of the target variables.

    >>> import graphfreeze as gf
    >>> gf.Rows("emb/embeddings", [0, 3, 7])   # keep three domain-word embeddings fixed
    Rows('emb/embeddings', [0, 3, 7])
    """

    axis_name = "rows"

    def _axis(self, var: VariableInfo) -> int:
        return 0


class Columns(_AxisRule):
    """Freeze columns (last axis) of the target variables: output units of a Dense kernel.

    >>> import graphfreeze as gf
    >>> gf.Columns("dense/kernel", range(10))   # the 10 old units of a grown layer
    Columns('dense/kernel', range(0, 10))
    """

    axis_name = "columns"

    def _axis(self, var: VariableInfo) -> int:
        return len(var.shape) - 1


class Mask(Rule):
    """Freeze the entries where a boolean array of the variable's shape is True.

    >>> import numpy as np, graphfreeze as gf
    >>> gf.Mask("out/kernel", np.eye(2, dtype=bool))
    Mask('out/kernel', 2 of 4 entries)
    """

    def __init__(self, target: Target, mask: Any):
        super().__init__(target)
        self.mask = np.array(mask)

    def entries(self, var: VariableInfo) -> np.ndarray:
        if self.mask.dtype != bool:
            raise RuleError(f"{_where(self, var)}: the mask has dtype {self.mask.dtype}; it must "
                            "be boolean (True = frozen). Use np.asarray(m, bool) if that is meant.")
        if self.mask.shape != tuple(var.shape):
            raise RuleError(f"{_where(self, var)}: the mask has shape {list(self.mask.shape)}; "
                            f"it must equal the variable's shape {list(var.shape)}.")
        return self.mask  # read only: resolve() never writes to it

    def describe(self) -> str:
        if self.mask.dtype != bool:
            return f"Mask({describe_target(self.target)}, {self.mask.dtype} array)"
        return f"Mask({describe_target(self.target)}, {int(self.mask.sum())} of " \
               f"{self.mask.size} entries)"


class Unfreeze(Rule):
    """Undo earlier rules for a target (or for the entries a partial rule selects).

    >>> import graphfreeze as gf
    >>> rules = ["*", gf.Unfreeze("head/*")]      # freeze everything but the head
    >>> gf.Unfreeze(gf.Rows("emb/embeddings", [5]))
    Unfreeze(Rows('emb/embeddings', [5]))
    """

    freezes = False

    def __init__(self, target: Target | Rule):
        self.inner = target if isinstance(target, Rule) else Freeze(target)
        if isinstance(self.inner, Unfreeze):
            raise RuleError("Unfreeze(Unfreeze(...)) is ambiguous; write the freeze rule itself.")
        self.target = self.inner.target

    def entries(self, var: VariableInfo) -> np.ndarray:
        return self.inner.entries(var)

    def describe(self) -> str:
        return f"Unfreeze({self.inner.describe()})"


def as_rule(obj: RuleLike) -> Rule:
    """Normalize a rule argument: strings, variables and layers become `Freeze` rules."""
    if isinstance(obj, Rule):
        return obj
    if isinstance(obj, (list, tuple)):
        raise RuleError(f"rules are passed one per argument, got a {type(obj).__name__}; "
                        "unpack it: gf.freeze(*rules).")
    try:
        return Freeze(obj)
    except RuleError:
        raise RuleError(
            f"{obj!r} ({type(obj).__name__}) is not a freeze rule; pass a glob string such as "
            "'hidden1/*', a variable, a Keras layer, or gf.Rows / gf.Columns / gf.Mask / "
            "gf.Unfreeze.") from None


# --------------------------------------------------------------------------- resolution


def compress(mask: np.ndarray) -> np.ndarray:
    """The smallest array that broadcasts back to `mask`: every axis along which the mask
    does not change is collapsed to length 1 (a Rows mask of [1088, 1088] becomes
    [1088, 1], a Columns mask [1, 1088], a whole-variable mask all ones)."""
    out = mask
    for axis in range(mask.ndim):
        n = out.shape[axis]
        if n > 1:
            first = np.take(out, [0], axis=axis)
            # the last slice first: a random mask differs there, without a full pass
            if np.array_equal(np.take(out, [n - 1], axis=axis), first) and (out == first).all():
                out = first
    return out


@dataclass(eq=False)
class VariableFreeze:
    """The net effect of all rules on one variable: `frozen` is True where entries stay fixed.

    The mask is final once resolved; what the passes need of it (counts, the compact
    broadcastable form, which single axis it varies along) is computed once.
    """

    variable: VariableInfo
    frozen: np.ndarray
    rules: list[str] = field(default_factory=list)

    @functools.cached_property
    def n_frozen(self) -> int:
        return int(np.count_nonzero(self.frozen))

    @property
    def full(self) -> bool:
        return self.n_frozen == self.frozen.size

    @property
    def partial(self) -> bool:
        return 0 < self.n_frozen < self.frozen.size

    @functools.cached_property
    def compact(self) -> np.ndarray:
        """`frozen` with every constant axis collapsed to 1 (see `compress`); it broadcasts
        back to the variable's shape. The one form the passes store in a graph."""
        return compress(self.frozen)

    @property
    def varying_axes(self) -> tuple[int, ...]:
        """The axes along which the mask changes: (0,) for rows only, (rank - 1,) for
        columns only, () for a whole variable."""
        return tuple(a for a, n in enumerate(self.compact.shape) if n > 1)

    @property
    def axis(self) -> int | None:
        """The one axis a rows-only or columns-only mask varies along, else None."""
        axes = self.varying_axes
        return axes[0] if len(axes) == 1 else None

    def indices(self, *, frozen: bool) -> np.ndarray:
        """Frozen (or trainable) indices along `axis`; only for single-axis masks."""
        if self.axis is None:
            raise ValueError(f"the mask of {self.variable.path!r} varies along "
                             f"{len(self.varying_axes)} axes, not one")
        line = self.compact.reshape(-1)
        return np.flatnonzero(line if frozen else ~line)


def resolve(rules: Sequence[RuleLike], variables: Sequence[VariableInfo]) -> list[VariableFreeze]:
    """Apply `rules` in order to `variables`; return the variables with a frozen entry.

    Raises `RuleError` naming the rule for anything that does not fit; nothing is partial.
    """
    masks: dict[int, tuple[VariableInfo, np.ndarray, list[str]]] = {}
    for rule in (as_rule(r) for r in rules):
        for var in match_target(rule.target, variables, rule):
            sel = rule.entries(var)
            if id(var) not in masks:
                masks[id(var)] = (var, np.zeros(var.shape, dtype=bool), [])
            _, frozen, described = masks[id(var)]
            if rule.freezes:
                frozen |= sel
            else:
                frozen &= ~sel
            described.append(rule.describe())
    found = (VariableFreeze(var, frozen, described) for var, frozen, described in masks.values())
    return [vf for vf in found if vf.n_frozen]
