"""Moved to :mod:`efftheory.reports.plotting` (package layout, issue #24); this name stays importable."""

from ._alias import alias

alias(__name__, "efftheory.reports.plotting")
