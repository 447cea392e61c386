"""Gradual unfreezing in `fit` (ULMFiT): rule sets that change at epoch boundaries.

Keras's train function is a `tf.function` that bakes in the per-step function when it is
traced, so a new rule set needs a train function of its own. The callback builds one per
distinct rule set the first time that set comes into force (Keras builds it as usual and
graphfreeze routes its per-step function, exactly as `gf.keras.freeze` does), keeps it, and
at each epoch boundary sets `model.train_function`, which Keras's `fit` reads before every
step. Nothing is recompiled, the optimizer and its state are the model's own throughout,
and the test function (validation) is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import keras
import numpy as np

from .api import FrozenFunction
from .dryrun import variable_infos
from .errors import FreezeError, RuleError
from .optimizer_state import extend_model_optimizer, finalize_known
from .rules import Rule, RuleLike, as_rule, resolve
from .scale import resolve_scales
from .variables import is_keras_model

# What a rule set freezes, entry by entry: (variable path, SHA-256 of its frozen mask) pairs.
RuleSetKey: TypeAlias = tuple[tuple[str, str], ...]


def layers_with_weights(model: Any) -> list[Any]:
    """The model's layers that own weights, in the model's order; nested models (a
    backbone inside a Sequential or functional model) contribute their layers in order."""
    out = []
    for layer in getattr(model, "layers", []):
        if is_keras_model(layer):
            out.extend(layers_with_weights(layer))
        elif layer.weights:
            out.append(layer)
    return out


def _rule_list(rules: Any, epoch: Any) -> list[Rule]:
    if isinstance(rules, (str, Rule)) or not isinstance(rules, Sequence):
        rules = [rules]  # a single rule: a glob, a layer, a variable
    try:
        return [as_rule(r) for r in rules]
    except FreezeError as e:
        raise RuleError(f"schedule[{epoch!r}]: {e}") from None


def _check_schedule(schedule: Any) -> list[tuple[int, list[Rule]]]:
    if not isinstance(schedule, Mapping) or not schedule:
        raise RuleError("GradualUnfreezing needs a non-empty mapping from an epoch to the rules in "
                        "force from that epoch on, e.g. {0: ['*', gf.Unfreeze('head/*')], "
                        f"2: ['block1*'], 4: []}}; got {schedule!r}.")
    stages = []
    for epoch, rules in schedule.items():
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise RuleError(f"schedule key {epoch!r}: epochs are integers >= 0 (the first epoch "
                            "is 0, as in Keras callbacks).")
        stages.append((int(epoch), _rule_list(rules, epoch)))
    stages.sort(key=lambda s: s[0])
    if stages[0][0] != 0:
        raise RuleError(f"the schedule starts at epoch {stages[0][0]}; say what trains from epoch "
                        "0 as well (0: [] trains everything).")
    return stages


def _rule_set_key(model: Any, rules: list[Rule]) -> RuleSetKey:
    """What a rule set freezes, entry by entry: two rule sets that freeze the same entries
    share one train function (and one rewrite)."""
    infos = variable_infos(model)
    freezes = resolve(rules, infos)
    scales = resolve_scales(rules, infos, freezes)  # gf.Scale factors make rule sets differ too
    return tuple(sorted((vf.variable.path, hashlib.sha256(np.packbits(vf.frozen).tobytes()).hexdigest())
                        for vf in freezes)) + tuple(sorted(
        (vs.variable.path, hashlib.sha256(vs.factor.tobytes()).hexdigest()) for vs in scales))


class GradualUnfreezing(keras.callbacks.Callback):
    """A Keras callback: the rules in force change at epoch boundaries within one `fit`.

    `schedule` maps an epoch to the rules in force from that epoch on (a list of anything
    `gf.freeze` takes; an empty list trains everything). Each distinct rule set is
    rewritten once, the first time it comes into force, and reused when it comes back;
    nothing is recompiled and the optimizer keeps its state. Rules are checked against the
    model when `fit` starts, before the first batch. For the epochs of this `fit` the
    schedule replaces any `gf.keras.freeze` rules of the model; afterwards the model trains
    as before (unless `fit` was interrupted).

    >>> schedule = {0: ["*", gf.Unfreeze("head/*")], 2: ["block1*"], 4: []}  # doctest: +SKIP
    >>> model.fit(data, epochs=6, callbacks=[gf.keras.GradualUnfreezing(schedule)])  # doctest: +SKIP
    """

    def __init__(self, schedule: Mapping[int, Sequence[RuleLike]], *,
                 batchnorm_inference: bool = False, allow_opaque: bool = False):
        super().__init__()
        self.schedule = _check_schedule(schedule)
        self.batchnorm_inference = batchnorm_inference
        self.allow_opaque = allow_opaque
        self._steps: dict[RuleSetKey, FrozenFunction] = {}  # rule set -> its step (rewrites cached)
        self._functions: dict[RuleSetKey, Any] = {}        # rule set -> its train function
        self._keys: list[RuleSetKey] = []                  # per stage of the schedule
        self._keras_function: Any = None              # the train function fit built
        self._active: RuleSetKey | None = None

    @classmethod
    def top_down(cls, model: Any, groups: int | Sequence[Any], every: int = 1, *,
                 batchnorm_inference: bool = False, allow_opaque: bool = False) -> GradualUnfreezing:
        """Unfreeze one more group from the top every `every` epochs (ULMFiT).

        `groups` is either an int n, splitting the model's layers that own weights (in the
        model's order, nested models expanded) into n contiguous groups of near-equal size;
        or a list of groups, bottom first, each a layer, a glob, a variable or a list of
        those. In the first `every` epochs only the top group trains, then the top two, and
        so on; from epoch (n - 1) * every everything trains. Anything in no listed group
        trains from the first epoch.

        >>> cb = gf.keras.GradualUnfreezing.top_down(model, 3, every=2)  # doctest: +SKIP
        >>> cb = gf.keras.GradualUnfreezing.top_down(model, ["block1*", "block2*", head])  # doctest: +SKIP
        """
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise RuleError(f"every={every!r}: the number of epochs between two unfreezing steps "
                            "is an integer >= 1.")
        targets = _groups(model, groups)
        n = len(targets)
        schedule = {k * int(every): [t for group in targets[:n - 1 - k] for t in group]
                    for k in range(n)}
        return cls(schedule, batchnorm_inference=batchnorm_inference, allow_opaque=allow_opaque)

    @property
    def steps(self) -> list[FrozenFunction]:
        """The rewritten steps of the rule sets that froze something, in order of first use
        (each holds its rewrites, one per input signature: `step.latest.report()`)."""
        return list(self._steps.values())

    def rules_at(self, epoch: int) -> list[Rule]:
        """The rules in force during `epoch`."""
        return self.schedule[self._stage_at(epoch)][1]

    def _stage_at(self, epoch: int) -> int:
        return max(i for i, (start, _) in enumerate(self.schedule) if start <= epoch)

    # ------------------------------------------------------------------ Keras hooks

    def on_train_begin(self, logs: Any = None) -> None:
        model = self.model
        if not is_keras_model(model):
            raise RuleError(f"GradualUnfreezing needs a Keras model, got {type(model).__name__}.")
        if model.train_function is not self._keras_function:
            # compiled again, or gf.keras.freeze changed the model: train functions built
            # before hold the old optimizer and settings.
            self._functions.clear()
            self._steps.clear()
            self._keras_function = model.train_function
        keys = []
        for epoch, rules in self.schedule:  # every rule checked before the first batch
            try:
                keys.append(_rule_set_key(model, rules))
            except FreezeError as e:
                raise RuleError(f"GradualUnfreezing schedule at epoch {epoch}: {e}") from None
        self._keys = keys
        self._active = None
        self._rules: list[Rule] = []
        # fit's final EMA copy: per variable, never into what the stage in force freezes
        finalize = finalize_known(model.optimizer, lambda: self._rules)
        finalize.__enter__()
        self._finalize: contextlib.AbstractContextManager[None] | None = finalize

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        stage = self._stage_at(epoch)
        self._activate(self._keys[stage], self.schedule[stage][1])

    def on_train_end(self, logs: Any = None) -> None:
        self.model.train_function = self._keras_function
        self._active = None
        finalize: contextlib.AbstractContextManager[None] | None = getattr(self, "_finalize", None)
        self._finalize = None
        if finalize is not None:
            finalize.__exit__(None, None, None)

    # ------------------------------------------------------------------ switching

    def _activate(self, key: RuleSetKey, rules: list[Rule]) -> None:
        """Put the train function of one rule set in force: the only place rule sets switch."""
        if key == self._active:
            return
        function = self._functions.get(key)
        if function is None:
            function = self._functions[key] = self._build(key, rules)
        self.model.train_function = function
        self._active = key
        self._rules = rules
        # Keras's own train function (nothing frozen) refuses variables the optimizer holds
        # no state for: create it now, as a fresh build would.
        extend_model_optimizer(self.model, rules)

    def _build(self, key: RuleSetKey, rules: list[Rule]) -> Any:
        from .keras import route_train_function

        model = self.model
        if not key:  # nothing frozen: Keras's own train function, not rewritten
            type(model).make_train_function(model, force=True)
        else:
            self._steps[key] = route_train_function(
                model, lambda inner: FrozenFunction(inner, rules,
                                                    batchnorm_inference=self.batchnorm_inference,
                                                    allow_opaque=self.allow_opaque))
        return model.train_function

    # tf_keras's CallbackList asks every callback these (Keras 3's Callback has no such
    # methods); a schedule acts at epoch boundaries only.
    def _implements_train_batch_hooks(self) -> bool:
        return False

    def _implements_test_batch_hooks(self) -> bool:
        return False

    def _implements_predict_batch_hooks(self) -> bool:
        return False

    def __repr__(self) -> str:
        stages = ", ".join(f"{epoch}: [{', '.join(r.describe() for r in rules)}]"
                           for epoch, rules in self.schedule)
        return f"GradualUnfreezing({{{stages}}})"


def _groups(model: Any, groups: Any) -> list[list[Any]]:
    """`top_down`'s groups as lists of rule targets, bottom first."""
    if isinstance(groups, bool):
        raise RuleError(f"groups={groups!r}: give a number of groups or a list of groups.")
    if isinstance(groups, (int, np.integer)):
        layers = layers_with_weights(model)
        if not 1 <= groups <= len(layers):
            raise RuleError(f"groups={groups}: {getattr(model, 'name', 'the model')!r} has "
                            f"{len(layers)} layers with weights, so between 1 and {len(layers)} "
                            "groups.")
        return [[layers[i] for i in part] for part in np.array_split(np.arange(len(layers)), groups)]
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or not groups:
        raise RuleError(f"groups={groups!r}: give a number of groups, or a non-empty list of "
                        "groups (bottom first), each a layer, a glob or a list of those.")
    out = []
    for i, group in enumerate(groups):
        items = list(group) if isinstance(group, (list, tuple)) else [group]
        if not items:
            raise RuleError(f"groups[{i}] is empty; each group names at least one layer or glob.")
        out.append(items)
    return out
