"""Keep TensorFlow's native logs off the `graphfreeze` command line (imports no TensorFlow).

TensorFlow's C++ runtime writes to file descriptor 2 while it loads and when it first
touches devices: absl's "All log messages before absl::InitializeLog() is called are
written to STDERR", oneDNN and CPU-feature notices, CUDA probing. Those lines are logged
before absl's logging is initialised, so TF_CPP_MIN_LOG_LEVEL does not hold them back. The
command points descriptor 2 at /dev/null while it runs (and while `import graphfreeze`
loads TensorFlow for it), and keeps Python's own stderr (its errors, warnings and
tracebacks) on the real one. `--verbose` leaves everything as TensorFlow prints it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

_VERBOSE_FLAGS = {"-v", "--verbose"}


def quiet_command_starting() -> bool:
    """True while the `graphfreeze` command (or `python -m graphfreeze`) is importing the
    package, unless it was given --verbose."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    as_script = script in ("graphfreeze", "graphfreeze.exe", "graphfreeze-script.py")
    as_module = "-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["graphfreeze"]
    return (as_script or as_module) and not _VERBOSE_FLAGS & set(argv)


def _writes_to_descriptor_2(stream: object) -> bool:
    try:
        return stream.fileno() == 2  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False  # captured (pytest, an IDE): Python's writes never reach descriptor 2


@contextlib.contextmanager
def native_stderr_silenced(active: bool = True) -> Iterator[None]:
    """Send what native code writes to descriptor 2 to /dev/null, Python's stderr not."""
    if not active:
        yield
        return
    python_stderr = sys.stderr
    with contextlib.suppress(Exception):
        python_stderr.flush()
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no descriptor 2 to begin with: nothing to silence
        yield
        return
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        if _writes_to_descriptor_2(python_stderr):
            # A stream on a copy of the real descriptor; never closed, because a logging
            # handler created meanwhile may keep writing to it.
            sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1,
                                   encoding=getattr(python_stderr, "encoding", None) or "utf-8",
                                   errors=getattr(python_stderr, "errors", None) or "backslashreplace")
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)
