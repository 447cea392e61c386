"""Every seed scenario runs and holds its own claim; the demo CLI runs them all."""

from __future__ import annotations

import importlib

import pytest
from graphfreeze.examples import SCENARIOS

from graphfreeze import cli


@pytest.mark.parametrize("name", SCENARIOS)
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
