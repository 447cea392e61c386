"""The one exception family graphfreeze raises.

Every failure is raised before anything runs and leaves the user's function, model and
variables untouched (DESIGN S6), so callers can catch `FreezeError` and fall back to the
unmodified step.
"""

from __future__ import annotations

__all__ = ["FreezeError", "RuleError", "CaptureError", "UnsupportedGraphError"]


class FreezeError(Exception):
    """Base class: something about the rules, the function or its graph cannot be frozen.

    >>> import graphfreeze as gf
    >>> try:
    ...     gf.Rows("emb/embeddings", "all")
    ... except gf.FreezeError as e:
    ...     print(type(e).__name__)
    RuleError
    """


class RuleError(FreezeError, ValueError):
    """A rule is malformed or does not fit the variables it targets."""


class CaptureError(FreezeError):
    """The function could not be traced, or its trace has nothing to freeze."""


class UnsupportedGraphError(FreezeError):
    """The traced graph contains a construct the passes cannot rewrite safely.

    graphfreeze refuses rather than freezing partially: the message names the op.
    """
