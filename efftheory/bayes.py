"""Moved to :mod:`efftheory.predict.bayes` (package layout, issue #24); this name stays importable."""

from ._alias import alias

alias(__name__, "efftheory.predict.bayes")
