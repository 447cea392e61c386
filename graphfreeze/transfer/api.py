"""The public entry points: ``match_layers``, ``transfer_report`` and ``transfer``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..variables import variable_path
from .matching import _match, _report
from .results import Architecture, GraphMode, LayerPair, MatchReport, SourceLike, TransferError, Transferred
from .sources import _as_model, _built, _resolve_source
from .tracer import _graphs


def _matched(source: SourceLike, target: keras.Model, architecture: Architecture | None,
             example_inputs: Any, graph: GraphMode, exclude: Iterable[Any]
             ) -> tuple[MatchReport, keras.Model]:
    if graph not in ("auto", "keras", "traced"):
        raise TransferError(f"graph={graph!r}: expected 'auto', 'keras' or 'traced'.")
    target = _built(_as_model(target, "target"), example_inputs, "target model")
    model, desc = _resolve_source(source, architecture, example_inputs)
    excluded = {id(_excluded_layer(target, e)) for e in exclude}
    src, tgt = _graphs(model, target, graph, example_inputs)
    return _report(src, tgt, _match(src, tgt, excluded), desc), model


def _excluded_layer(target: keras.Model, item: Any) -> Any:
    if isinstance(item, keras.layers.Layer):
        return item
    if not isinstance(item, str):
        raise TransferError(f"exclude: expected target layers or layer names, got "
                            f"{type(item).__name__} {item!r}.")
    try:
        return target.get_layer(item)
    except ValueError:
        raise TransferError(f"exclude: the target {target.name!r} has no layer named {item!r}; "
                            f"its layers: {[layer.name for layer in target.layers][:10]}.") from None


def match_layers(source: SourceLike, target: keras.Model, *,
                 architecture: Architecture | None = None, example_inputs: Any = None,
                 graph: GraphMode = "auto", exclude: Iterable[Any] = ()) -> list[tuple[Any, Any]]:
    """The ``(source_layer, target_layer)`` pairs of layers with weights the two models have
    in common, matched on their dataflow graphs (class, configuration that matters, variable
    shapes, and position from the inputs), not on names. Nothing is copied.

    `source` is a model or a file (see `transfer`). `graph`: ``"keras"`` uses the Keras layer
    graphs (functional and Sequential models), ``"traced"`` traces both models' forward
    functions (needed for subclassed models; `example_inputs` if a model has no
    ``model.inputs``), ``"auto"`` uses the layer graphs when both models have one.
    `exclude`: target layers (or names of its top-level layers) that must not match, such as
    a new head that happens to have the old head's shape; the match stops there.

    >>> pairs = gf.match_layers(pretrained, new_model)             # doctest: +SKIP
    >>> [(s.name, t.name) for s, t in pairs]                        # doctest: +SKIP
    [('hidden1', 'layer_a'), ('hidden2', 'layer_b')]
    """
    report, _ = _matched(source, target, architecture, example_inputs, graph, exclude)
    return [(p.source, p.target) for p in report.pairs]


def transfer_report(source: SourceLike, target: keras.Model, *,
                    architecture: Architecture | None = None, example_inputs: Any = None,
                    graph: GraphMode = "auto", exclude: Iterable[Any] = ()) -> MatchReport:
    """What `transfer` would copy, and why every other target layer would be left; copies
    nothing. Arguments as for `transfer`.

    >>> print(gf.transfer_report("pretrained.keras", new_model))   # doctest: +SKIP
    """
    report, _ = _matched(source, target, architecture, example_inputs, graph, exclude)
    return report


def transfer(source: SourceLike, target: keras.Model, freeze: bool = True, *,
             architecture: Architecture | None = None, example_inputs: Any = None,
             graph: GraphMode = "auto", exclude: Iterable[Any] = ()) -> Transferred:
    """Copy the weights of the layers `target` has in common with `source` (bitwise) and
    return the rules that freeze them: the matched target layers, or ``[]`` when
    ``freeze=False``. The returned list carries ``.pairs`` and ``.report``; ``str()`` shows
    each pair with its shapes and why the other target layers were left.

    `source` may be a Keras model, a ``.keras`` (or legacy ``.h5``) model file, a
    ``.weights.h5`` file, or a ``tf.train.Checkpoint`` directory or prefix. The last two hold
    no dataflow graph, so they need `architecture`: the model that saved them, or a
    zero-argument function building it. The weights are loaded into it (a model passed
    here has its weights overwritten) and its graph is matched against the target's. A
    checkpoint is searched for the object holding the whole architecture (saved as
    ``Checkpoint(model=...)``, any other name, or the root).

    Raises `TransferError` (a `FreezeError`) for an unreadable or wrong file, a checkpoint
    missing the architecture's variables, or - when ``freeze=True`` - no common layer;
    with ``freeze=False`` no common layer gives an empty result whose report says why.
    Every shape is checked before the first assignment: on an error no target weight
    changes. See `match_layers` for `graph`, `example_inputs` and `exclude`.

    >>> rules = gf.transfer("pretrained.keras", new_model)         # doctest: +SKIP
    >>> print(rules)                                                # doctest: +SKIP
    >>> train_step = gf.freeze(*rules)(train_step)                  # doctest: +SKIP
    """
    report, model = _matched(source, target, architecture, example_inputs, graph, exclude)
    if not report.pairs and freeze:
        raise TransferError(f"nothing to transfer from {report.source} to {target.name!r}, so "
                            f"nothing to freeze.\n{report}")
    _copy(report.pairs)
    return Transferred([p.target for p in report.pairs] if freeze else [], report, model)


def _copy(pairs: Sequence[LayerPair]) -> None:
    """Assign every source value to its target variable, all shapes checked first."""
    plan = []
    for pair in pairs:
        src, dst = list(pair.source.weights), list(pair.target.weights)
        if len(src) != len(dst):
            raise TransferError(f"layer {pair.target.name!r} has {len(dst)} weights, its source "
                                f"{pair.source.name!r} {len(src)}; nothing was copied.")
        for s, d in zip(src, dst):
            if tuple(s.shape) != tuple(d.shape) or tf.as_dtype(s.dtype) != tf.as_dtype(d.dtype):
                raise TransferError(f"cannot copy {variable_path(s)} {list(s.shape)} {s.dtype} to "
                                    f"{variable_path(d)} {list(d.shape)} {d.dtype}; nothing was "
                                    "copied.")
            plan.append((d, np.array(s.numpy(), copy=True)))
    backup = [np.array(d.numpy(), copy=True) for d, _ in plan]
    try:
        for d, value in plan:
            d.assign(value)
    except Exception as e:
        for (d, _), old in zip(plan, backup):
            d.assign(old)
        raise TransferError(f"copying the transferred weights failed ({type(e).__name__}: {e}); "
                            "the target's weights were restored.") from e
