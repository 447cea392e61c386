"""Frozen-prefix activation cache: compute what frozen layers produce once, train the rest.

When the lowest layers of a model are frozen and deterministic, their output for a batch
never changes, so computing it every epoch is waste (seed 001; TF Hub's retrain.py cached
"bottlenecks" by hand). `gf.cache_frozen_prefix` finds that frontier on the rewritten
training step's graph (analysis/frontier.py), splits the step there, precomputes the
frontier activations of a `tf.data.Dataset` once, through `Dataset.cache` (in memory, or in
a file for large datasets), and trains the rest of the step on them. The suffix is the
original step's own graph from the frontier on, so it updates the original model's
variables: after training, the full model is trained, with nothing to copy back.

    >>> trainer = gf.cache_frozen_prefix(train_step, ["hidden1/*", "hidden2/*"], dataset)  # doctest: +SKIP
    >>> print(trainer.report())                                                           # doctest: +SKIP
    >>> history = trainer.fit(epochs=10)                                                  # doctest: +SKIP

The cache holds batches as the dataset yields them (so per-batch quantities such as the
batch size stay exact); `fit(shuffle=True)` reorders whole batches between epochs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from .analysis.frontier import Frontier, find_frontier
from .api import _normalize, rewrite
from .emit import identifier, import_as_function
from .errors import FreezeError
from .passes.dead_code import remove_dead, side_effect_roots
from .rewritten import Rewritten
from .rules import RuleLike
from .variables import VariableInfo, is_keras_model

__all__ = ["cache_frozen_prefix", "FrozenPrefixCache", "CacheError"]


class CacheError(FreezeError):
    """The frozen prefix of this step cannot be cached; the message names the op.

    >>> gf.cache_frozen_prefix(step, ["hidden1/*"], dataset)            # doctest: +SKIP
    Traceback (most recent call last):
    graphfreeze.cache.CacheError: the frozen prefix of step cannot be cached whole: ... strict=False ...
    """


@dataclass
class _Split:
    prefix: Any             # tf.function: step inputs -> frontier tensors
    suffix: Any             # tf.function: frontier tensors -> the step's outputs (and updates)
    frontier: Frontier
    prefix_ops: int
    suffix_ops: int


class FrozenPrefixCache:
    """Trains the part of a step above its frozen prefix on cached activations.

    Built by `gf.cache_frozen_prefix`; `fit` / `run_epoch` train, `report()` explains what
    is cached, `dataset` is the cached `tf.data.Dataset` of frontier activations.

    >>> trainer = gf.cache_frozen_prefix(model, ["*", gf.Unfreeze("head/*")], dataset)  # doctest: +SKIP
    >>> print(trainer.report())                                         # doctest: +SKIP
    >>> history = trainer.fit(epochs=10)                                # doctest: +SKIP
    """

    def __init__(self, rewritten: Rewritten, split: _Split, dataset: tf.data.Dataset, model: Any,
                 verbose: int):
        self.rewritten = rewritten
        self._split = split
        self._model = model
        self.dataset = dataset
        self.batches = 0
        self._fill(verbose)

    # ------------------------------------------------------------------ building the cache

    def _fill(self, verbose: int) -> None:
        """Run the prefix over the dataset once; tf.data's cache keeps the results."""
        start, seen = time.perf_counter(), 0
        for seen, _ in enumerate(self.dataset, 1):
            if verbose and (seen % 10 == 0):
                print(f"\rcaching frozen-prefix activations: {seen} batches", end="", file=sys.stderr)
        self.batches = seen
        self.cache_seconds = time.perf_counter() - start
        if verbose:
            print(f"\rcaching frozen-prefix activations: {seen} batches in "
                  f"{self.cache_seconds:.1f} s", file=sys.stderr)

    # ------------------------------------------------------------------ training

    def step(self, *frontier_values: Any) -> Any:
        """Run the step's suffix on one cached batch (updates the model's variables)."""
        return self._split.suffix(*frontier_values)

    def run_epoch(self, shuffle: bool = False, seed: int | None = None) -> list[Any]:
        """One pass over the cached batches; returns every step's outputs."""
        data = self.dataset.shuffle(self.batches, seed=seed) if shuffle else self.dataset
        return [self._split.suffix(*batch) for batch in data]

    def fit(self, epochs: int = 1, shuffle: bool = False, seed: int | None = None,
            verbose: int = 0) -> Any:
        """Train for `epochs` over the cache.

        For a Keras model: returns a Keras-style history dict (metric -> value per epoch),
        metrics reset at each epoch as `model.fit` does. For a custom step: a list, per
        epoch, of the outputs of every step.
        """
        history: Any = {} if self._model is not None else []
        for epoch in range(epochs):
            if self._model is not None:
                self._model.reset_metrics()
            outputs = self.run_epoch(shuffle=shuffle, seed=None if seed is None else seed + epoch)
            if self._model is not None:
                for key, value in (outputs[-1] if outputs else {}).items():
                    history.setdefault(key, []).append(float(value))
            else:
                history.append(outputs)
            if verbose:
                print(f"epoch {epoch + 1}/{epochs}: {len(outputs)} steps from the cache")
        return history

    # ------------------------------------------------------------------ inspection

    @property
    def frontier(self) -> Frontier:
        """Where the cached prefix ends: the tensors cached per batch, and why it stops."""
        return self._split.frontier

    def report(self) -> str:
        """What is cached, what it costs, and where caching stops."""
        f = self._split.frontier
        graph = self.rewritten.graph
        lines = [f"frozen-prefix cache for {self.rewritten.plan.capture.function_name}: "
                 f"{self._split.prefix_ops:,} ops computed once per batch, "
                 f"{self._split.suffix_ops:,} ops per training step "
                 f"(the rewritten step has {graph.number_of_nodes():,})",
                 f"cached per batch ({self.batches} batches):"]
        for node, out in f.tensors:
            data = graph.nodes[node]
            shape = data["shapes"][out] if out < len(data["shapes"]) else None
            dtype = tf.as_dtype(data["dtypes"][out]).name
            lines.append(f"  {node}:{out}  {dtype}{list(shape) if shape is not None else '[?]'}")
        if f.stoppers:
            lines.append("caching stops at:")
            lines += [f"  {s}" for s in f.stoppers[:5]]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<FrozenPrefixCache {len(self._split.frontier.tensors)} frontier tensors, "
                f"{self.batches} batches>")


# --------------------------------------------------------------------------- building


def _path_of(variables: dict[str, VariableInfo]) -> dict[str, str]:
    return {p: v.path for p, v in variables.items()}


def _split_step(rw: Rewritten, strict: bool) -> _Split:
    capture, plan, program = rw._capture, rw.plan, rw.program
    frozen = {vf.variable.placeholder: vf.variable.path for vf in plan.freezes if vf.full}
    outputs = capture.output_refs
    frontier = find_frontier(program, capture.input_placeholders, frozen,
                             _path_of(capture.variable_by_placeholder), outputs)
    computed = [t for t in frontier.tensors if t[0] not in capture.input_placeholders]
    first = f" Caching stops at {frontier.stoppers[0]}." if frontier.stoppers else ""
    if not computed:
        raise CacheError(f"nothing to cache in {capture.function_name}: no frozen computation "
                         f"depends only on the inputs.{first}")
    if strict and frontier.frozen_reads_after:
        raise CacheError(
            f"the frozen prefix of {capture.function_name} cannot be cached whole: frozen "
            f"{', '.join(repr(p) for p in frontier.frozen_reads_after[:3])} would still be "
            f"computed every step.{first} Pass strict=False to cache up to there.")
    library = rw.graph_def.library

    prefix_ir = program.main.copy()
    remove_dead(prefix_ir, set(capture.input_placeholders), frontier.tensors, per_output=False)
    prefix_def = prefix_ir.to_graph_def(library=library)
    prefix = import_as_function(prefix_def, capture, capture.input_placeholders,
                                [f"{n}:{k}" for n, k in frontier.tensors],
                                f"graphfreeze_prefix_{identifier(capture.function_name)}")

    suffix_ir = program.main.copy()
    feeds, specs = [], {}
    for k, t in enumerate(frontier.tensors):
        dtype, shape = suffix_ir.dtype(t), suffix_ir.shape(t)
        ph = suffix_ir.add_node(f"graphfreeze/frontier_{k}", "Placeholder",
                                attrs={"dtype": dtype}, dtypes=[dtype], shapes=[shape],
                                device=suffix_ir.device(t[0]), after=(-1, 0), inserted_by="cache")
        suffix_ir.replace_uses(t, (ph, 0), exclude={ph})
        feeds.append(ph)
        specs[ph] = tf.TensorSpec(shape, dtype, name=f"frontier_{k}")
    remove_dead(suffix_ir, side_effect_roots(suffix_ir), outputs, per_output=True)
    suffix = import_as_function(suffix_ir.to_graph_def(library=library), capture, feeds,
                                capture.structured_outputs,
                                f"graphfreeze_suffix_{identifier(capture.function_name)}",
                                input_specs=specs)
    prefix_ops = sum(1 for n in prefix_ir.graph if prefix_ir.op(n) not in ("Const", "Placeholder"))
    return _Split(prefix, suffix, frontier, prefix_ops, len(suffix_ir))


def cache_frozen_prefix(step_or_model: Callable[..., Any] | Any, rules: RuleLike | Sequence[RuleLike],
                        dataset: tf.data.Dataset, *, cache: str = "",
                        batchnorm_inference: bool = False, strict: bool = True,
                        verbose: int = 1) -> FrozenPrefixCache:
    """Precompute a step's frozen-prefix activations over `dataset` and train from them.

    `step_or_model` is a training step (called as `step(*element)` for each dataset
    element, or `step(element)` when elements are not tuples) or a compiled Keras model
    (its `train_step`, with the compiled loss, optimizer and metrics). `cache=""` keeps the
    activations in memory; a file path stores them on disk (tf.data's `Dataset.cache`).
    `strict=True` refuses (naming the op) when something stops caching before all frozen
    work is cached: a random op, BatchNorm in training mode (`batchnorm_inference=True`
    fixes that), or a trainable variable below the frozen layers; `strict=False` caches
    up to there.

    >>> trainer = gf.cache_frozen_prefix(model, ["backbone/*"], train_ds,  # doctest: +SKIP
    ...                                  batchnorm_inference=True)
    >>> trainer.fit(epochs=5)                                              # doctest: +SKIP
    """
    rule_list = _normalize(rules)
    spec = dataset.element_spec
    model: Any = step_or_model if is_keras_model(step_or_model) else None  # a Keras model
    if model is not None:
        fn, unpack = model.train_step, False
        if getattr(model, "optimizer", None) is None:
            raise CacheError("the Keras model is not compiled; call model.compile(...) first.")
    else:
        fn, unpack = step_or_model, isinstance(spec, tuple)
    example = tuple(spec) if unpack else (spec,)
    rw = rewrite(fn, rule_list, *example, batchnorm_inference=batchnorm_inference)
    if not rw.training:
        raise CacheError(f"{rw.plan.capture.function_name} takes no gradients: there is nothing to train "
                         "from a cache; pass the training step.")
    split = _split_step(rw, strict)
    capture = rw._capture

    def prefix(*element: Any) -> Any:
        args = element if unpack else (element[0] if len(element) == 1 else element,)
        flat, _ = capture.canonical_args(args, {})
        return tuple(split.prefix(*flat))

    cached = dataset.map(prefix).cache(cache)
    return FrozenPrefixCache(rw, split, cached, model, verbose)
