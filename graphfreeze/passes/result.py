"""What a pass returns (in the spirit of torch.fx's ``PassResult``).

A pass reads ``program.edits`` on entry and returns ``PassResult(program, program.edits !=
start)``: the runner logs and verifies only after passes that changed something, and when
verifying checks that a pass reporting no change left every graph unedited.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..program import Program


@dataclass(frozen=True)
class PassResult:
    """The program a pass leaves and whether it edited it.

    Example::

        def my_pass(program: Program, plan: Plan) -> PassResult:
            start = program.edits
            ...  # edit program's graphs through the IR API
            return PassResult(program, program.edits != start)
    """

    program: Program
    changed: bool
