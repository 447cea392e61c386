"""The rewrite passes and the one place that orders them.

A pass is a plain function ``(program, plan) -> program``: it edits the traced step and the
bodies it calls (see graphfreeze/program.py) in place and records what it did in
``plan.notes``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import stage
from ..plan import Plan
from ..program import Program
from .batchnorm_inference import batchnorm_inference
from .dead_code import eliminate_dead_code
from .fold_zeros import fold_frozen_zeros
from .guard_writes import guard_writes
from .mask_gradients import mask_gradients
from .prune_optimizer_state import prune_optimizer_state
from .stop_frozen_reads import stop_frozen_reads
from .strip_markers import strip_markers

Pass = Callable[[Program, Plan], Program]

#: A training step: gradients masked at their source, writes guarded, frozen work removed.
TRAINING_PIPELINE: Sequence[Pass] = (
    batchnorm_inference,      # only with batchnorm_inference=True; needs the stat updates
    mask_gradients,
    guard_writes,
    prune_optimizer_state,
    fold_frozen_zeros,
    eliminate_dead_code,
    strip_markers,
)

#: A forward function: frozen reads become constants for the caller's gradients; writes
#: (e.g. BatchNorm statistics in training mode) to frozen state are guarded too.
FORWARD_PIPELINE: Sequence[Pass] = (
    batchnorm_inference,
    guard_writes,
    stop_frozen_reads,
    eliminate_dead_code,
)


def run_pipeline(program: Program, plan: Plan) -> Program:
    """Run the pipeline that fits the traced function; edits `program` in place."""
    for p in TRAINING_PIPELINE if plan.training else FORWARD_PIPELINE:
        with stage(f"pass {p.__name__!r}"):
            program = p(program, plan)
    program.refresh_read_only_inputs()
    return program


__all__ = ["TRAINING_PIPELINE", "FORWARD_PIPELINE", "run_pipeline", "Pass"]
