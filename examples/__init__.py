"""Seed scenarios, runnable as scripts (``python examples/<name>.py``) or through
``graphfreeze demo``. Each prints its freeze report and checks its own claim."""

SCENARIOS = [
    "seed001_reuse_lower_layers",
]
