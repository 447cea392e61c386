"""Layer-wise learning-rate decay (BEiT; timm's `param_groups_layer_decay`) as Scale rules."""

from __future__ import annotations

import math
from collections.abc import Iterator
from numbers import Real
from typing import Any

import numpy as np

from .errors import RuleError
from .scale import Scale

__all__ = ["layer_decay", "weighted_layers"]


def weighted_layers(model: Any) -> list[Any]:
    """The layers holding trainable weights, in the model's order; a nested model (a Keras
    functional or Sequential model inside another, a keras-hub backbone inside a task) is
    replaced by its own layers, so a backbone counts block by block. A layer that is not a
    model counts once, with its sublayers (a transformer block is one layer)."""
    seen: set[int] = set()
    out = []
    for layer in _walk(model):
        if id(layer) not in seen and layer.trainable_weights:
            seen.add(id(layer))
            out.append(layer)
    return out


def _walk(model: Any) -> Iterator[Any]:
    for layer in getattr(model, "layers", []):
        if _is_model(layer) and getattr(layer, "layers", None):
            yield from _walk(layer)
        else:
            yield layer


def _is_model(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.Model)


def layer_decay(model: Any, decay: float) -> list[Scale]:
    """One `gf.Scale` rule per layer with trainable weights: the last gets 1.0 and each
    earlier one `decay` times the next (layer-wise learning-rate decay, as BEiT and timm's
    `param_groups_layer_decay`), in the order of `weighted_layers`.

    `decay` is a number with 0 < decay <= 1. Compose with other rules as usual; later rules
    win entry by entry:

    >>> import graphfreeze as gf
    >>> step = gf.freeze(*gf.layer_decay(model, 0.75), "emb/*")(train_step)   # doctest: +SKIP
    >>> gf.keras.freeze(model, *gf.layer_decay(model, 0.9))                   # doctest: +SKIP
    """
    where = f"layer_decay({getattr(model, 'name', type(model).__name__)!r}, {decay!r})"
    if isinstance(decay, (bool, np.bool_)) or not isinstance(decay, (Real, np.integer, np.floating)):
        raise RuleError(f"{where}: decay must be a number with 0 < decay <= 1, got "
                        f"{type(decay).__name__}.")
    value = float(decay)
    if not (math.isfinite(value) and 0 < value <= 1):
        raise RuleError(f"{where}: decay must satisfy 0 < decay <= 1 (each earlier layer trains "
                        f"decay times as fast as the next), got {value!r}.")
    if not hasattr(model, "layers"):
        raise RuleError(f"{where}: expected a Keras model (something with .layers), got "
                        f"{type(model).__name__}.")
    layers = weighted_layers(model)
    if not layers:
        raise RuleError(f"{where}: the model has no layer with trainable weights (is it built, "
                        "and not trainable=False?).")
    n = len(layers)
    return [Scale(layer, value ** (n - 1 - i)) for i, layer in enumerate(layers)]
