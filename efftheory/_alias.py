"""Old import paths kept working: a module moved in the package layout of issue #24 stays importable
under its old name as the *same* module object (so attributes, monkeypatching and ``__all__`` agree)."""

from __future__ import annotations

import importlib
import sys


def alias(old: str, new: str) -> None:
    """Make ``import old`` give the module ``new`` (call it from the old module's file)."""
    sys.modules[old] = importlib.import_module(new)
