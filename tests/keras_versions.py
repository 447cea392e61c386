"""Which tests need a newer Keras than the oldest supported one (pyproject: keras>=3.3.3).

graphfreeze itself works across the whole range; these marks skip only tests that exercise
something older Keras releases lack or get wrong without graphfreeze, and each reason names
the version and what it lacks, so a skip on the oldest CI job says why.
"""

from __future__ import annotations

import keras
import pytest


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())


KERAS = _release(keras.__version__)


def needs_keras(version: str, why: str) -> pytest.MarkDecorator:
    """Skip unless Keras >= `version`; `why` says what older releases lack."""
    return pytest.mark.skipif(KERAS < _release(version),
                              reason=f"needs Keras >= {version} (installed {keras.__version__}): {why}")


# Optimizers newer than the oldest supported Keras, with the release that added them.
OPTIMIZER_ADDED_IN = {"Lamb": "3.5.0", "Muon": "3.10.0", "ScheduleFreeAdamW": "3.14.0"}


def has_optimizer(name: str) -> bool:
    return hasattr(keras.optimizers, name)


def optimizer_param(name: str, *values: object) -> object:
    """A pytest.param for a test over optimizers, skipped where this Keras lacks `name`."""
    marks = ()
    if name in OPTIMIZER_ADDED_IN:
        marks = needs_keras(OPTIMIZER_ADDED_IN[name], f"keras.optimizers.{name} was added then")
    return pytest.param(name, *values, marks=marks)


# Keras before 3.5 does not all-reduce gradients under a tf.distribute strategy in the
# TensorFlow backend (its optimizer sums them only in a replica context it is never in:
# keras-team/keras#19969, fixed by #20051 in 3.5.0), with or without graphfreeze: replicas
# and workers then train on their own shard's gradient alone.
ALL_REDUCE_IN_KERAS = KERAS >= (3, 5, 0)
ALL_REDUCE = needs_keras("3.5.0", "older Keras applies each replica's own gradient without "
                                  "all-reducing it (keras-team/keras#20051)")
