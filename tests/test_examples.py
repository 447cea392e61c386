"""Every seed scenario runs and holds its own claim; the demo CLI runs them all."""

from __future__ import annotations

import importlib

import pytest
from graphfreeze.examples import SCENARIOS

from graphfreeze import cli

# Scenarios on real keras.applications models are corpus-scale: marked slow like the corpus
# (the newest CI job runs them; the oldest job's subset and `-m "not slow"` leave them out).
ON_APPLICATIONS = {"conv_backbone_cache", "discriminative_finetuning", "keras_fit_transfer"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ON_APPLICATIONS
                                  else n for n in SCENARIOS])
def test_scenario_holds_its_claim(name, capsys):
    module = importlib.import_module(f"graphfreeze.examples.{name}")
    assert module.main() == 0
    out = capsys.readouterr().out
    assert "graphfreeze report" in out and "OK" in out


def test_demo_lists_and_rejects_unknown(capsys):
    assert cli.main(["demo", "--list"]) == 0
    assert capsys.readouterr().out.split() == SCENARIOS
    assert cli.main(["demo", "no_such_scenario"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("graphfreeze: error: unknown scenario") and "Traceback" not in err
