"""The version is written once (graphfreeze/_version.py) and reported the same everywhere."""

from __future__ import annotations

import platform
from importlib import metadata

import keras
import pytest
import tensorflow as tf

import graphfreeze as gf
from graphfreeze import cli


def test_installed_metadata_carries_the_package_version():
    # pyproject.toml reads graphfreeze._version.__version__; an installed copy whose metadata
    # disagrees was built from a different source than the one imported.
    assert metadata.version("graphfreeze") == gf.__version__


def test_version_flag_names_graphfreeze_tensorflow_keras_and_python(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out.strip()
    assert printed == (f"graphfreeze {gf.__version__} (TensorFlow {tf.__version__}, "
                       f"Keras {keras.__version__}, Python {platform.python_version()})")
