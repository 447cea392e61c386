"""The rewrite passes and the one place that orders them.

A pass is a plain function ``(ir, plan) -> ir``; it may edit the IR it is given (the
pipeline hands it a private copy) and records what it did in ``plan.notes``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..ir import IR
from ..plan import Plan
from .dead_code import eliminate_dead_code
from .guard_writes import guard_writes
from .mask_gradients import mask_gradients
from .prune_optimizer_state import prune_optimizer_state
from .stop_frozen_reads import stop_frozen_reads
from .strip_markers import strip_markers

Pass = Callable[[IR, Plan], IR]

#: A training step: gradients masked at their source, writes guarded, frozen work removed.
TRAINING_PIPELINE: Sequence[Pass] = (
    mask_gradients,
    guard_writes,
    prune_optimizer_state,
    eliminate_dead_code,
    strip_markers,
)

#: A forward function: frozen reads become constants for the caller's gradients; writes
#: (e.g. BatchNorm statistics in training mode) to frozen state are guarded too.
FORWARD_PIPELINE: Sequence[Pass] = (
    guard_writes,
    stop_frozen_reads,
    eliminate_dead_code,
)


def run_pipeline(ir: IR, plan: Plan) -> IR:
    """Run the pipeline that fits the traced function; edits `ir` in place."""
    for p in TRAINING_PIPELINE if plan.training else FORWARD_PIPELINE:
        ir = p(ir, plan)
    return ir


__all__ = ["TRAINING_PIPELINE", "FORWARD_PIPELINE", "run_pipeline", "Pass"]
