"""The two ways in: `gf.rewrite` (programmatic) and `gf.freeze` (decorator)."""

from __future__ import annotations

import contextlib
import functools
import gc
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from .analysis.dependence import Dependence, analyze
from .analysis.refusals import (
    custom_gradient_nodes,
    refuse_opaque_ops,
    refuse_undifferentiable,
    refuse_unmarked_writes,
    refuse_unplaced_markers,
)
from .analysis.state_roles import optimizer_state
from .capture import trace
from .emit import emit
from .errors import RuleError, stage
from .ir import IR
from .optimizer_state import Journal, trainable_only
from .passes import run_pipeline
from .plan import Plan, marker_sites
from .program import Program
from .rewritten import Rewritten
from .rules import Rule, RuleLike, as_rule, resolve
from .scale import resolve_scales
from .variables import module_variables


def _normalize(rules: RuleLike | Sequence[RuleLike]) -> list[Rule]:
    if isinstance(rules, (list, tuple)):
        return [as_rule(r) for r in rules]
    return [as_rule(rules)]


def rewrite(fn: Callable[..., Any], rules: RuleLike | Sequence[RuleLike], *example_args: Any,
            batchnorm_inference: bool = False, allow_opaque: bool = False,
            **example_kwargs: Any) -> Rewritten:
    """Trace `fn` with the example arguments and rewrite it so `rules` hold.

    A function that takes gradients is rewritten as a training step; one that takes none
    as a forward function. Raises `FreezeError` (and changes nothing) on any problem.

    `batchnorm_inference=True` runs BatchNorm layers whose moving statistics are frozen in
    inference mode (normalising with the stored statistics), as Keras `trainable=False`
    does; by default a frozen BatchNorm keeps normalising with batch statistics and only
    stops updating them.

    Ops whose effect on variables the graph cannot show (`tf.py_function`,
    `tf.numpy_function`, a handle made from a variable's name) are refused by name;
    `allow_opaque=True` states that they touch no frozen state, and the report lists them.

    >>> rw = gf.rewrite(train_step, ["hidden1/*", gf.Rows("emb/embeddings", ids)], x, y)  # doctest: +SKIP
    >>> rw(x, y)                                                                          # doctest: +SKIP
    """
    rule_list = _normalize(rules)
    journal = Journal()
    try:
        with trainable_only(rule_list, journal):
            capture = trace(fn, example_args, example_kwargs,
                            extra_objects=[getattr(r, "target", None) for r in rule_list])
        return _rewrite_captured(capture, rule_list, batchnorm_inference, allow_opaque)
    except BaseException:
        journal.rollback()  # an optimizer built or extended while tracing: as it was
        raise


def _rewrite_captured(capture: Any, rule_list: list[Rule], batchnorm_inference: bool,
                      allow_opaque: bool) -> Rewritten:
    with _gc_paused(), stage(f"step {capture.function_name!r}"):
        program = Program(IR.from_graph_def(capture.graph_def, capture.meta))
        variables = capture.variable_by_placeholder
        sites = marker_sites(capture, program)
        refuse_unplaced_markers(capture, sites)
        dep: Dependence | None = None
        owners: dict[int, Any] = {}
        if capture.training:
            with stage("the dependence analysis"):
                dep, owners = analyze(program, sites, variables)
                state = optimizer_state(program, dep, sites, variables)
            for p in state:
                variables[p].optimizer_state = True
        freezes = resolve(rule_list, capture.variables)
        plan = Plan(capture, freezes, sites, dep, owners, batchnorm_inference=batchnorm_inference,
                    scales=resolve_scales(rule_list, capture.variables, freezes))
        refuse_opaque_ops(program, plan, allow_opaque)
        refuse_unmarked_writes(program, plan)
        custom = [] if plan.training else custom_gradient_nodes(program)
        rewritten = run_pipeline(program, plan)
        with stage("emitting the rewritten function"):
            emitted = emit(rewritten, capture)
        if custom:
            refuse_undifferentiable(emitted.function, custom)
        return Rewritten(capture, plan, rewritten, emitted)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building large networkx graphs (it only adds pauses:
    nothing allocated here is garbage until the rewrite is done)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, (tf.Tensor, np.ndarray)):
        return ("tensor", str(leaf.dtype), tuple(leaf.shape))
    if isinstance(leaf, tf.Variable):
        return ("variable", id(leaf))
    try:
        hash(leaf)
        return ("value", type(leaf).__name__, leaf)
    except TypeError:
        return ("object", id(leaf))


def signature_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A hashable key: structure, tensor dtypes and shapes, and Python values."""
    structure = tf.nest.map_structure(lambda _: 0, (args, kwargs), expand_composites=True)
    leaves = tf.nest.flatten((args, kwargs), expand_composites=True)
    return repr(structure), tuple(_leaf_key(leaf) for leaf in leaves)


class FrozenFunction:
    """A training step with freeze rules; rewrites once per input signature.

    >>> @gf.freeze("hidden1/*", "hidden2/*")                   # doctest: +SKIP
    ... def train_step(x, y): ...
    >>> train_step(x, y); train_step.rewritten(x, y).report()  # doctest: +SKIP
    """

    def __init__(self, fn: Callable[..., Any], rules: Sequence[RuleLike], *,
                 batchnorm_inference: bool = False, allow_opaque: bool = False):
        self.python_function = fn
        self.rules = _normalize(list(rules))
        self.batchnorm_inference = batchnorm_inference
        self.allow_opaque = allow_opaque
        self._cache: dict[Any, Rewritten] = {}
        self.latest: Rewritten | None = None   # the rewrite used most recently
        self._lock = threading.Lock()
        self._bound: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        functools.update_wrapper(self, fn)

    def rewritten(self, *args: Any, **kwargs: Any) -> Rewritten:
        """The `Rewritten` used for these arguments (tracing and rewriting on first use)."""
        key = signature_key(args, kwargs)
        rw = self._cache.get(key)
        if rw is None:
            with self._lock:
                rw = self._cache.get(key)
                if rw is None:
                    rw = self._cache[key] = rewrite(
                        self.python_function, self.rules, *args,
                        batchnorm_inference=self.batchnorm_inference,
                        allow_opaque=self.allow_opaque, **kwargs)
        return rw

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rw = self.latest = self.rewritten(*args, **kwargs)
        return rw(*args, **kwargs)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        bound = self._bound.get(instance)
        if bound is None:
            bound = FrozenFunction(self.python_function.__get__(instance, owner), self.rules,
                                   batchnorm_inference=self.batchnorm_inference,
                                   allow_opaque=self.allow_opaque)
            self._bound[instance] = bound
        return bound

    @property
    def cache_size(self) -> int:
        """How many input signatures have been traced and rewritten so far."""
        return len(self._cache)


def freeze(*rules: RuleLike, batchnorm_inference: bool = False,
           allow_opaque: bool = False) -> Callable[[Callable[..., Any]], FrozenFunction]:
    """Decorator: the step runs with `rules` frozen. Rules are checked here and at first call.

    `batchnorm_inference=True`: frozen BatchNorm layers run in inference mode (see `rewrite`).
    `allow_opaque=True`: let `tf.py_function` and other opaque ops through (see `rewrite`).

    >>> @gf.freeze("hidden1/*", gf.Columns("out/kernel", [0]))   # doctest: +SKIP
    ... @tf.function
    ... def train_step(x, y): ...
    """
    if len(rules) == 1 and callable(rules[0]) and not isinstance(rules[0], (Rule, str)) and \
            module_variables(rules[0]) is None:
        raise RuleError("gf.freeze takes rules and returns a decorator: write "
                        "@gf.freeze('hidden1/*') above the step, not a bare @gf.freeze.")
    checked = _normalize(list(rules))

    def decorate(fn: Callable[..., Any]) -> FrozenFunction:
        return FrozenFunction(fn, checked, batchnorm_inference=batchnorm_inference,
                              allow_opaque=allow_opaque)

    return decorate
