"""matplotlib for figures written to files: the one place that imports it (lazily, behind the `report` extra) and
selects the display-free Agg backend."""

from __future__ import annotations

import importlib

from .errors import require


def pyplot():
    """`matplotlib.pyplot` on the Agg backend, or `MissingExtraError` naming `pip install 'kvzap-eval[report]'`."""
    require("matplotlib", "report").use("Agg")
    return importlib.import_module("matplotlib.pyplot")
