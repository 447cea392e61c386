"""The one exception family graphfreeze raises.

Every failure is raised before anything runs and leaves the user's function, model and
variables untouched (DESIGN S6), so callers can catch `FreezeError` and fall back to the
unmodified step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["FreezeError", "RuleError", "CaptureError", "UnsupportedGraphError", "stage"]


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
    """A rule is malformed or does not fit the variables it targets.

    >>> gf.plan(model, "no_such_layer/*")                               # doctest: +SKIP
    Traceback (most recent call last):
    graphfreeze.errors.RuleError: rule 'no_such_layer/*' matches no variable read by the function. ...
    """


class CaptureError(FreezeError):
    """The function could not be traced, or its trace has nothing to freeze.

    >>> gf.rewrite(lambda x: x * 2, ["*"], tf.constant(1.0))            # doctest: +SKIP
    Traceback (most recent call last):
    graphfreeze.errors.CaptureError: <lambda> reads no variable, so there is nothing to freeze; ...
    """


class UnsupportedGraphError(FreezeError):
    """The traced graph contains a construct the passes cannot rewrite safely.

    graphfreeze refuses rather than freezing partially: the message names the op. When the
    cause was an error the rewrite did not anticipate, `original` holds it (it is also the
    `__cause__`, except where Keras's traceback filtering drops that, as in `fit`).

    >>> try:                                                            # doctest: +SKIP
    ...     model.fit(dataset)                     # after gf.keras.freeze(model, ...)
    ... except gf.UnsupportedGraphError as e:
    ...     print(e, e.original)
    ...     gf.keras.unfreeze(model)               # train without graphfreeze
    """

    original: BaseException | None = None


# What the rewrite is doing right now, outermost first ("step 'train_step'", "pass
# 'guard_writes'", "function body 'cond_true_12'"), so that an error nobody anticipated
# can say where it happened.
_STAGES: ContextVar[tuple[str, ...]] = ContextVar("graphfreeze_stages", default=())


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """Run a part of the rewrite; the outermost stage turns any exception that is not a
    `FreezeError` into an `UnsupportedGraphError` naming every stage it happened in, with
    the original chained. A raw TensorFlow error from graph internals tells a user
    nothing; this says which step, pass and body failed and what to do instead.
    """
    outer = _STAGES.get()
    token = _STAGES.set((*outer, what))
    try:
        yield
    except FreezeError:
        raise
    except Exception as e:
        if getattr(e, "_graphfreeze_where", None) is None:
            with contextlib.suppress(AttributeError):  # the innermost stage records where
                e._graphfreeze_where = (*outer, what)  # type: ignore[attr-defined]
        if outer:
            raise
        error = UnsupportedGraphError(_unexpected(getattr(e, "_graphfreeze_where", (what,)), e))
        error.original = e  # also here: Keras's traceback filtering drops __cause__ in fit
        raise error from e
    finally:
        _STAGES.reset(token)


def _unexpected(where: tuple[str, ...], error: Exception) -> str:
    inner = f" in {', '.join(where[1:])}" if len(where) > 1 else ""
    return (f"graphfreeze could not rewrite {where[0]}: {type(error).__name__}{inner}: {error}. "
            "Nothing was rewritten and nothing ran. This is a construct graphfreeze does not "
            "handle; try @gf.freeze on a custom training step instead (with model.fit, "
            "gf.keras.unfreeze(model) trains without graphfreeze), and please report this "
            "message.")
