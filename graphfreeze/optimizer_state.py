"""Optimizer state only for what trains: Keras optimizers never see wholly frozen variables.

Keras `trainable=False` keeps no optimizer state for a frozen layer because the optimizer
is never told about it. graphfreeze does the same at the one place a Keras optimizer
learns its variables: while a step is traced, `Optimizer.apply` (hence `apply_gradients`)
drops every (gradient, variable) pair whose variable the rules freeze entirely, whose
gradient derives from that variable's marker (capture.py) and that it holds no state for
yet, before the optimizer builds, filters, clips (`global_clipnorm` then sees the trainable
gradients only, as under `trainable=False`), decays or averages anything. The frozen
gradient itself stays in the traced graph, so the rewrite still masks it to zero wherever
else the step uses it (a norm the user computes, a metric). Partly frozen variables keep
full-size state.

An unbuilt optimizer is then built by Keras's own `apply`, in the trace as usual, for
the trainable variables only. A built one that meets a variable it does not know (the
rules changed, a layer was unfrozen) is built again in place, eagerly (`tf.init_scope`),
over the old and new variables, keeping every value it had and creating the new state exactly as a fresh build
would (zeros for Adam's moments, `initial_accumulator_value` for Adagrad, ...). A variable
the optimizer already holds state for (built before freezing) stays in the update as
before: the rewrite masks its gradient and prunes its state's writes (S4: a pause).

The patch lives only for the trace (under capture's trace lock). Every optimizer changed
during a rewrite is journaled and restored if the rewrite fails, so nothing is
half-applied.

    >>> gf.extend_optimizer(optimizer, model.trainable_variables)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from .capture import _TRACE_LOCK
from .errors import RuleError
from .rules import Rule
from .targets import match_target
from .variables import VariableInfo, is_keras_variable, resource_variable, variable_path


def _keras_classes() -> tuple[type, type] | None:
    """(BaseOptimizer, LossScaleOptimizer) of the installed Keras 3, or None."""
    try:
        import keras
        base = next(c for c in keras.optimizers.Optimizer.__mro__ if c.__name__ == "BaseOptimizer")
        return base, keras.optimizers.LossScaleOptimizer
    except Exception:  # pragma: no cover - Keras 3 is a dependency
        return None


def _is_keras_optimizer(obj: Any) -> bool:
    classes = _keras_classes()
    return classes is not None and isinstance(obj, classes[0])


# --------------------------------------------------------------------------- which vars


def _info(var: Any) -> VariableInfo:
    tf_var = resource_variable(var)
    assert tf_var is not None, f"{var!r} holds no tf.Variable"
    return VariableInfo(path=variable_path(var), shape=tuple(tf_var.shape.as_list()),
                        dtype=tf_var.dtype, variable=tf_var,
                        keras_variable=var if is_keras_variable(var) else None,
                        placeholder="", trainable=bool(getattr(var, "trainable", True)))


def wholly_frozen(rules: Sequence[Rule]) -> Callable[[Any], bool]:
    """A predicate: do `rules` (applied in order, as `resolve` does) freeze every entry of
    this variable? Rules that match nothing here are simply not about this variable;
    the full resolution after the trace reports them."""
    cache: dict[int, bool] = {}

    def frozen(var: Any) -> bool:
        tf_var = resource_variable(var)
        if tf_var is None:
            return False
        key = id(tf_var)
        if key not in cache:
            info = _info(var)
            mask = np.zeros(info.shape, dtype=bool)
            for rule in rules:
                try:
                    match_target(rule.target, [info], rule)
                except RuleError:
                    continue
                try:
                    sel = rule.entries(info)
                except RuleError:  # reported by the full resolution, naming the rule
                    return False
                mask = mask | sel if rule.freezes else mask & ~sel
            cache[key] = bool(mask.all())
        return cache[key]

    return frozen


# --------------------------------------------------------------------------- journal


class Journal:
    """Snapshots of the optimizers a rewrite changes, to put them back if it fails."""

    def __init__(self) -> None:
        self._saved: dict[int, tuple[Any, dict, dict]] = {}

    def save(self, obj: Any) -> None:
        for o in (obj, getattr(obj, "inner_optimizer", None), getattr(obj, "_tracker", None),
                  getattr(getattr(obj, "inner_optimizer", None), "_tracker", None)):
            if o is None or id(o) in self._saved:
                continue
            attrs = dict(vars(o))
            contents = {k: _copy(v) for k, v in attrs.items()
                        if isinstance(v, (list, dict, set)) or type(v).__name__ == "ListWrapper"}
            if isinstance(attrs.get("stored_ids"), dict):  # Keras's Tracker: sets in a dict
                contents["stored_ids"] = {k: set(s) for k, s in attrs["stored_ids"].items()}
            self._saved[id(o)] = (o, attrs, contents)

    def rollback(self) -> None:
        """Best effort, and never raises: it runs while another error propagates."""
        for o, attrs, contents in self._saved.values():
            try:
                for name in [n for n in vars(o) if n not in attrs]:
                    object.__delattr__(o, name)
                for name, value in attrs.items():
                    object.__setattr__(o, name, value)
                    if name in contents:
                        _restore(value, contents[name])
            except Exception:  # pragma: no cover - the original error matters more
                continue
        self._saved.clear()


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else set(value) if isinstance(value, set) \
        else list(value)


def _restore(target: Any, saved: Any) -> None:
    if isinstance(target, list) or hasattr(target, "append"):
        # Element by element, by identity: TensorFlow's ListWrapper compares elements
        # (variables) by value on slice assignment.
        while len(target) > len(saved) and all(a is b for a, b in zip(target, saved)):
            target.pop()
        if len(target) != len(saved) or any(a is not b for a, b in zip(target, saved)):
            while len(target):
                target.pop()
            for item in saved:
                target.append(item)
    else:
        target.clear()
        target.update(saved)
    if isinstance(target, dict) and isinstance(saved, dict):
        for k, v in saved.items():  # the Tracker's sets were copied one level down
            if isinstance(v, set) and isinstance(target.get(k), set) and target[k] is not v:
                target[k] = v


# --------------------------------------------------------------------------- build


def _known(optimizer: Any, var: Any) -> bool:
    # A LossScaleOptimizer's inner optimizer holds the state (Keras < 3.4 leaves the
    # wrapper's own index empty).
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner._var_key(var) in inner._trainable_variables_indices


def _own_variables(optimizer: Any) -> set[int]:
    """The variables an optimizer creates in its constructor (kept across a rebuild)."""
    # Keras < 3.4 keeps the step counter in `iterations`, later ones in `_iterations`
    own = {id(vars(optimizer).get("_iterations", getattr(optimizer, "iterations", None)))}
    lr = getattr(optimizer, "_learning_rate", None)
    if lr is not None and hasattr(lr, "assign"):
        own.add(id(lr))
    return own


def _rebuild(optimizer: Any, variables: list[Any]) -> None:
    """Build a built optimizer again over `variables`, keeping the state it had."""
    classes: Any = _keras_classes()
    assert classes is not None, "only Keras 3 optimizers are rebuilt"
    base, lso = classes
    if isinstance(optimizer, lso):
        _rebuild(optimizer.inner_optimizer, variables)
        optimizer._trainable_variables_indices = {}
        base.build(optimizer, variables)  # the wrapper's own bookkeeping; it holds no slots
        return
    own = _own_variables(optimizer)
    old: dict[tuple, list[Any]] = {}
    for v in [v for v in optimizer._variables if id(v) not in own]:
        old.setdefault((v.path, tuple(v.shape), str(v.dtype)), []).append(v)
        optimizer._untrack_variable(v)
    optimizer.built = False
    optimizer._trainable_variables_indices = {}
    optimizer.build(variables)
    optimizer.built = True
    # Existing state keeps its variable objects: steps traced before (a cached rewrite,
    # a train function a schedule comes back to) capture them.
    fresh, replace = [], {}
    for v in optimizer._variables:
        previous = old.get((v.path, tuple(v.shape), str(v.dtype)))
        if id(v) not in own and previous:
            replace[id(v)] = previous.pop(0)
        elif id(v) not in own:
            fresh.append(id(v))
    _swap_back(optimizer, replace)
    # Keras sets an average to its variable on the first step (iterations == 0); a variable
    # that starts training later would otherwise average from zero and be dragged toward
    # it when the averages are copied in.
    averages = getattr(optimizer, "_model_variables_moving_average", None) or []
    for var, average in zip(optimizer._trainable_variables, averages):
        if average is not None and id(average) in fresh:
            average.assign(var)


def _swap_back(optimizer: Any, replace: dict[int, Any]) -> None:
    """Put the old variable objects back wherever the rebuild stored their new twins
    (slot lists, the tracked variable list, the tracker's ids)."""
    for value in list(vars(optimizer).values()):
        if isinstance(value, list) or type(value).__name__ == "ListWrapper":
            for i, item in enumerate(list(value)):
                if id(item) in replace:
                    value[i] = replace[id(item)]
    stored = getattr(getattr(optimizer, "_tracker", None), "stored_ids", None) or {}
    for ids in stored.values():
        for new_id, old in replace.items():
            if new_id in ids:
                ids.discard(new_id)
                ids.add(id(old))


def _eager_rebuild(optimizer: Any, variables: list[Any]) -> None:
    import keras
    with tf.init_scope(), keras.name_scope(optimizer.name, caller=optimizer):
        _rebuild(optimizer, variables)


def prepare(optimizer: Any, variables: Sequence[Any], journal: Journal | None = None) -> None:
    """Make `optimizer` know `variables` (build it, or build it again keeping its state).

    The layout equals a fresh build over `variables` followed by every variable it knew
    that `variables` leaves out (state of now-frozen variables is kept, untouched)."""
    variables = list(variables)
    if journal is not None and not optimizer.built:
        journal.save(optimizer)  # Keras's apply builds it, over `variables`
        return
    if all(_known(optimizer, v) for v in variables):
        return
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    listed = {inner._var_key(v) for v in variables}
    variables += [v for v in inner._trainable_variables if inner._var_key(v) not in listed]
    if journal is not None:
        journal.save(optimizer)
    _eager_rebuild(optimizer, variables)


def extend_optimizer(optimizer: Any, variables: Sequence[Any]) -> Any:
    """Create Keras optimizer state for `variables` it does not know yet; returns it.

    After training with rules, a Keras optimizer holds state only for what trained. Keras
    refuses to update a variable its optimizer was not built for ("Unknown variable"), so
    call this before training newly unfrozen variables without graphfreeze (`gf.keras`
    and `@gf.freeze` do it by themselves). New state is what a fresh build creates (zeros
    for Adam); existing state, the step counter and the learning rate are kept.

    >>> gf.extend_optimizer(optimizer, model.trainable_variables)   # doctest: +SKIP
    """
    if not _is_keras_optimizer(optimizer):
        raise RuleError(f"extend_optimizer needs a Keras 3 optimizer, got "
                        f"{type(optimizer).__name__}.")
    prepare(optimizer, variables)
    return optimizer


# --------------------------------------------------------------------------- the patch


def _optimizer_classes() -> list[type]:
    """Keras optimizer classes that define `apply` themselves (base, LossScaleOptimizer,
    user subclasses); MultiOptimizer splits variables among inner optimizers, whose own
    `apply` is filtered."""
    classes = _keras_classes()
    if classes is None:
        return []
    out, pending = [], [classes[0]]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "apply" in vars(cls) and cls.__name__ != "MultiOptimizer" and cls not in out:
            out.append(cls)
    return out


def _marked(grad: Any, var: Any, limit: int = 4096) -> bool:
    """Does `grad` derive from the gradient marker of `var`? Only then is the frozen
    gradient masked wherever else the step uses it; otherwise the pair stays in the
    update, where the rewrite refuses or masks it as before (S7: no silent gaps)."""
    from .capture import _RECORDERS
    tf_var = resource_variable(var)
    tensor = getattr(grad, "values", grad)
    if not hasattr(tensor, "op"):
        return False
    wanted = {m.values for r in _RECORDERS for g, m, _ in r.records
              if m.variable is tf_var and g is tensor.graph}
    if not wanted:
        return False
    pending, seen = [tensor.op], set[str]()
    while pending and len(seen) < limit:
        op = pending.pop()
        if op.name in wanted:
            return True
        if op.name in seen:
            continue
        seen.add(op.name)
        pending.extend(t.op for t in op.inputs)
    return False


def _filtered_apply(original: Callable, frozen: Callable[[Any], bool], journal: Journal) -> Callable:
    @functools.wraps(original)
    def apply(self: Any, grads: Any, trainable_variables: Any = None) -> Any:
        if trainable_variables is None or tf.executing_eagerly():
            return original(self, grads, trainable_variables)
        grads, variables = list(grads), list(trainable_variables)
        # State that exists already stays in the update (the rewrite masks its gradient
        # and prunes its writes, as for any frozen variable): only new state is avoided.
        keep = [i for i, (g, v) in enumerate(zip(grads, variables))
                if not frozen(v) or (self.built and _known(self, v)) or not _marked(g, v)]
        if not keep:  # everything frozen: leave it to the rewrite (masked, pruned)
            return original(self, grads, variables)
        kept = [variables[i] for i in keep]
        prepare(self, kept, journal)
        return original(self, [grads[i] for i in keep], kept)
    return apply


@contextlib.contextmanager
def trainable_only(rules: Sequence[Rule], journal: Journal) -> Iterator[None]:
    """While tracing: Keras optimizers skip wholly frozen variables (see the module)."""
    frozen = wholly_frozen(rules)
    with _TRACE_LOCK, contextlib.ExitStack() as stack:
        for cls in _optimizer_classes():
            original = vars(cls)["apply"]
            patched: Any = cls  # the classes are Keras's; mypy sees only `type`
            patched.apply = _filtered_apply(original, frozen, journal)
            stack.callback(setattr, cls, "apply", original)
        yield


@contextlib.contextmanager
def filtered_build(optimizer: Any, rules: Sequence[Rule]) -> Iterator[None]:
    """Keras's own `optimizer.build(model.trainable_variables)` (in `fit`'s symbolic build
    under a distribution strategy) builds for the trainable variables only."""
    if not _is_keras_optimizer(optimizer) or optimizer.built:
        yield
        return
    frozen = wholly_frozen(rules)
    build = type(optimizer).build

    def only_trainable(variables: Any) -> Any:
        kept = [v for v in variables if not frozen(v)]
        return build(optimizer, kept or list(variables))

    with _instance_patch(optimizer, "build", only_trainable):
        yield


@contextlib.contextmanager
def finalize_known(optimizer: Any, rules: Sequence[Rule] | Callable[[], Sequence[Rule]]
                   ) -> Iterator[None]:
    """`fit` ends with `optimizer.finalize_variable_values(model.trainable_weights)`, which
    copies EMA averages into variables by position. Copy each average into its own
    variable instead, and never into a wholly frozen one (S1), as `trainable=False` does."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not _is_keras_optimizer(inner):
        yield
        return
    finalize = type(inner).finalize_variable_values

    def by_variable(var_list: Any) -> Any:
        if not (inner.use_ema and inner.built):
            return finalize(inner, var_list)
        listed = {inner._var_key(v) for v in var_list}
        frozen = wholly_frozen(rules() if callable(rules) else rules)
        for var, average in zip(inner._trainable_variables, inner._model_variables_moving_average):
            if average is not None and inner._var_key(var) in listed and not frozen(var):
                var.assign(average)

    with _instance_patch(inner, "finalize_variable_values", by_variable):
        yield


@contextlib.contextmanager
def _instance_patch(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Shadow a method on one object (bypassing Keras's tracking); nests."""
    missing = object()
    previous = vars(obj).get(name, missing)
    object.__setattr__(obj, name, value)
    try:
        yield
    finally:
        if previous is missing:
            object.__delattr__(obj, name)
        else:
            object.__setattr__(obj, name, previous)


def extend_model_optimizer(model: Any, rules: Sequence[Rule] = ()) -> None:
    """Give a model's built Keras optimizer state for every trainable variable `rules`
    leave trainable, as a fresh build would (Keras refuses to update a variable its
    optimizer was not built for)."""
    optimizer = getattr(model, "optimizer", None)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if inner is None or not _is_keras_optimizer(inner) or not inner.built:
        return
    frozen = wholly_frozen(list(rules))
    prepare(optimizer, [v for v in model.trainable_variables if not frozen(v)])
