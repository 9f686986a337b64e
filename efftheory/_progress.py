"""The progress bar class: ``tqdm.auto`` (a widget in Jupyter) when ipywidgets is installed, else the
plain text bar of ``tqdm.std``, which Jupyter shows as text -- instead of ``tqdm.auto``'s
``TqdmWarning: IProgress not found`` and the same text bar."""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

__all__ = ["tqdm"]
