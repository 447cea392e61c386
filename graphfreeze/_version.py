"""The one place graphfreeze's version is written (pyproject.toml reads it from here).

A development version (PEP 440 ``.devN``) between releases; CHANGELOG.md's "Unreleased"
section says what it adds to the last release.
"""

__version__ = "0.2.0.dev0"
