"""Moved to :mod:`efftheory.predict.finite` (package layout, issue #24); this name stays importable."""

from ._alias import alias

alias(__name__, "efftheory.predict.finite")
