"""graphfreeze: train only part of a TensorFlow 2 model, by rewriting its traced graph.

>>> import graphfreeze as gf
>>> @gf.freeze("hidden1/*", "hidden2/*")          # doctest: +SKIP
... def train_step(x, y): ...

See README.md for the rules, the semantics (S1-S6) and the inspection tools.
"""

from __future__ import annotations

from .quiet import native_stderr_silenced as _silenced
from .quiet import quiet_command_starting as _quiet_command_starting

# The `graphfreeze` command keeps TensorFlow's native start-up logs off the terminal
# (graphfreeze/quiet.py); imported as a library, nothing is silenced.
with _silenced(_quiet_command_starting()):
    try:
        import tensorflow as _tf  # noqa: F401
    except ImportError as _e:  # pragma: no cover - exercised only without TensorFlow
        raise ImportError(
            "graphfreeze needs TensorFlow 2, which is an optional extra so you can choose the "
            "build: pip install 'graphfreeze[cpu]' (tensorflow-cpu) or 'graphfreeze[gpu]' "
            "(tensorflow[and-cuda])."
        ) from _e
    from . import keras  # noqa: E402  (gf.keras.freeze / unfreeze / rewritten)

from ._version import __version__ as __version__  # explicit re-export (typed package)
from .api import FrozenFunction, freeze, rewrite
from .cache import CacheError, FrozenPrefixCache, cache_frozen_prefix
from .diff import Diff
from .dryrun import plan
from .errors import CaptureError, FreezeError, RuleError, UnsupportedGraphError
from .layer_decay import layer_decay
from .optimizer_state import extend_optimizer
from .render import RenderError
from .report import Report
from .rewritten import Rewritten
from .rules import Columns, Freeze, Mask, Rows, Rule, Unfreeze
from .scale import Scale
from .trainable_io import load_trainable, save_trainable
from .transfer import MatchReport, TransferError, Transferred, match_layers, transfer, transfer_report

__all__ = [
    "freeze", "rewrite", "plan", "keras", "layer_decay", "extend_optimizer", "save_trainable",
    "load_trainable",
    "cache_frozen_prefix", "FrozenPrefixCache", "CacheError", "transfer", "transfer_report", "match_layers",
    "MatchReport", "Transferred", "TransferError", "FrozenFunction", "Rewritten", "Report", "Diff",
    "Rule", "Freeze", "Rows", "Columns", "Mask", "Unfreeze", "Scale",
    "FreezeError", "RuleError", "CaptureError", "UnsupportedGraphError", "RenderError",
]
