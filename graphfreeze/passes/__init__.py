"""The rewrite passes and the one place that orders them.

A pass is a plain function ``(program, plan) -> PassResult``: it edits the traced step and
the bodies it calls (see graphfreeze/program.py) in place, records what it did in
``plan.notes`` and returns the program with whether it changed it (passes/result.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from ..errors import stage
from ..ir import LintError
from ..plan import Plan
from ..program import Program
from .batchnorm_inference import batchnorm_inference
from .dead_code import eliminate_dead_code
from .fold_zeros import fold_frozen_zeros
from .guard_writes import guard_writes
from .lower_fused_apply import lower_fused_apply
from .mask_gradients import mask_gradients
from .prune_optimizer_state import prune_optimizer_state
from .read_without_copy import read_without_copy
from .result import PassResult
from .scale_writes import scale_writes
from .slice_updates import slice_updates
from .stop_frozen_reads import stop_frozen_reads
from .strip_markers import strip_markers
from .verify import lint

Pass = Callable[[Program, Plan], PassResult]

log = logging.getLogger(__name__)

#: A training step: gradients masked at their source, writes guarded, frozen work removed.
TRAINING_PIPELINE: Sequence[Pass] = (
    lower_fused_apply,        # partly frozen: fused kernels sparse or elementwise; adds writes
    batchnorm_inference,      # only with batchnorm_inference=True; needs the stat updates
    mask_gradients,
    scale_writes,             # gf.Scale factors; before the guards select frozen entries
    guard_writes,
    prune_optimizer_state,
    slice_updates,            # partly frozen: updates of variable and slots on trainable entries
    fold_frozen_zeros,
    eliminate_dead_code,
    read_without_copy,        # reads of sparsely written variables alias, not copy
    strip_markers,
)

#: A forward function: frozen reads become constants for the caller's gradients; writes
#: (e.g. BatchNorm statistics in training mode) to frozen state are guarded too.
FORWARD_PIPELINE: Sequence[Pass] = (
    batchnorm_inference,
    scale_writes,
    guard_writes,
    stop_frozen_reads,
    eliminate_dead_code,
)


#: Passes that read the dependence analysis (plan.dependence); until the last of them has
#: run, every pass must leave it valid (checked by lint when verifying).
READS_DEPENDENCE = frozenset({batchnorm_inference, prune_optimizer_state})

#: Run `lint` after every pass (the test suite sets it, as does GRAPHFREEZE_VERIFY=1).
VERIFY = False


def run_pipeline(program: Program, plan: Plan, *, verify: bool | None = None) -> Program:
    """Run the pipeline that fits the traced function; edits `program` in place.

    With `verify` (default: `VERIFY` or the environment variable GRAPHFREEZE_VERIFY=1),
    `lint` checks the program after every pass that changed it (and after `strip_markers`,
    whose invariant holds from then on) and names the pass that broke it; a pass reporting
    no change must have left every graph unedited.
    """
    if verify is None:
        verify = VERIFY or os.environ.get("GRAPHFREEZE_VERIFY") == "1"
    pipeline = list(TRAINING_PIPELINE if plan.training else FORWARD_PIPELINE)
    stripped = False
    for i, p in enumerate(pipeline):
        edits = program.edits
        with stage(f"pass {p.__name__!r}"):
            result = p(program, plan)
        program = result.program
        stripped |= p is strip_markers
        if result.changed:
            log.debug("pass %s changed the program", p.__name__)
        if verify and not result.changed and program.edits != edits:
            raise LintError(f"after pass {p.__name__!r}: it reported no change but edited "
                            f"the program ({program.edits - edits} edits)")
        if verify and (result.changed or p is strip_markers):
            lint(program, plan, after=p.__name__, markers_stripped=stripped,
                 dependence=any(q in READS_DEPENDENCE for q in pipeline[i + 1:]))
    program.refresh_read_only_inputs()
    return program


__all__ = ["TRAINING_PIPELINE", "FORWARD_PIPELINE", "run_pipeline", "Pass", "PassResult", "lint",
           "VERIFY"]
